"""Config files for trainer tests, written as users write them (a module of its own: with several test
folders, only the first ``conftest`` imported is reachable by that name)."""

import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, demo_dir: Path, *, stages=("stage1_align", "stage2_emotion"), steps=4, every=2,
                 extra: str = "") -> Path:
    """A config file (as users write them) on top of the tiny preset, reading the shared demo set."""
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'configs')!r})
        import emotion_qwen

        def get_config(arg=None):
            c = emotion_qwen.get_config("tiny")
            c.run_stages = {tuple(stages)!r}
            for name in c.run_stages:
                c.stages[name].num_steps = {steps}
                c.stages[name].mixture = ({{"manifest": {str(demo_dir / 'train.jsonl')!r},
                                            "data_root": {str(demo_dir)!r}}},)
            c.checkpoint.every_steps = {every}
            c.checkpoint.async_save = False
            c.mesh.num_devices = 1  # the same single-device program in-process and in subprocesses
        """) + textwrap.indent(textwrap.dedent(extra), "    ") + "\n    return c\n")
    return path


def load_config(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
