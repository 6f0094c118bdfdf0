"""Run config files written as users write them (a ``get_config`` on top of the tiny preset), and loaded as
``--config=FILE`` loads them. The trainer tests (``tests/train/train_configs.py``) and the RL tests
(``tests/rl/rl_configs.py``) write theirs with ``write_config_file``."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_config_file(path: Path, body: str, *, preamble: str = "", every: int = 2, extra: str = "") -> Path:
    """A config module at ``path``: ``preamble`` at module level, then ``get_config`` = the tiny preset changed by
    ``body`` and ``extra`` (indented code on ``c``), checkpointing every ``every`` steps synchronously, on one
    device (the same single-device program in-process and in subprocesses)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'configs')!r})
        import emotion_qwen
        """) + textwrap.dedent(preamble) + textwrap.dedent("""
        def get_config(arg=None):
            c = emotion_qwen.get_config("tiny")
        """) + textwrap.indent(textwrap.dedent(body) + textwrap.dedent(f"""
        c.checkpoint.every_steps = {every}
        c.checkpoint.async_save = False
        c.mesh.num_devices = 1
        """) + textwrap.dedent(extra), "    ") + "\n    return c\n"
    path.write_text(code)
    return path


def load_config(path: Path, arg: str | None = None):
    """``get_config(arg)`` of the config module at ``path``."""
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def optimizer_config(**fields) -> dict:
    """A stage's optimiser settings (``stages.<name>.optimizer``: the run config's defaults, where every field
    has its default) with ``fields`` changed."""
    import sys

    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    return dict(emotion_qwen.stage_config("stage1_align").optimizer.to_dict(), **fields)
