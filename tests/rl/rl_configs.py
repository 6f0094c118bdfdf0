"""RL stage config files for tests, written as users write them (a user reward registered in the file)."""

import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_rl_config(path: Path, demo_dir: Path, *, steps=4, every=2, extra: str = "") -> Path:
    """The tiny preset running only ``stage4_rl`` on the demo set with the rewards ``format`` and ``vowels``
    (a user reward: the share of vowels in the completion, which differs between an untrained policy's
    completions, so its groups have non-zero advantages and the updates move the weights)."""
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'configs')!r})
        import emotion_qwen
        from emoqwen_jax.rl.rewards import REWARDS, register_reward

        if "vowels" not in REWARDS:
            @register_reward("vowels")
            def vowels(sample):
                return sum(ch in "aeiou" for ch in sample.text) / max(len(sample.text), 1)

        def get_config(arg=None):
            c = emotion_qwen.get_config("tiny")
            c.run_stages = ("stage4_rl",)
            s = c.stages.stage4_rl
            s.num_steps = {steps}
            s.mixture = ({{"manifest": {str(demo_dir / 'train.jsonl')!r}, "data_root": {str(demo_dir)!r}}},)
            s.rl.rewards = {{"format": 1.0, "vowels": 1.0}}
            s.rl.num_iterations = 2
            s.optimizer.learning_rate = 3e-3
            c.checkpoint.every_steps = {every}
            c.checkpoint.async_save = False
            c.mesh.num_devices = 1  # the same single-device program in-process and in subprocesses
        """) + textwrap.indent(textwrap.dedent(extra), "    ") + "\n    return c\n")
    return path



def load_rl_config(path: Path):
    """``get_config()`` of a config file written by ``write_rl_config``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rl_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
