"""Config files for trainer tests, written as users write them (a module of its own: with several test
folders, only the first ``conftest`` imported is reachable by that name)."""

from pathlib import Path

from config_files import write_config_file


def write_config(path: Path, demo_dir: Path, *, stages=("stage1_align", "stage2_emotion"), steps=4, every=2,
                 extra: str = "") -> Path:
    """A config file (as users write them) on top of the tiny preset, reading the shared demo set."""
    return write_config_file(path, f"""
        c.run_stages = {tuple(stages)!r}
        for name in c.run_stages:
            c.stages[name].num_steps = {steps}
            c.stages[name].mixture = ({{"manifest": {str(demo_dir / 'train.jsonl')!r},
                                        "data_root": {str(demo_dir)!r}}},)
        """, every=every, extra=extra)
