"""RL stage config files for tests, written as users write them (a user reward registered in the file)."""

from pathlib import Path

from config_files import write_config_file

VOWELS_REWARD = """
from emoqwen_jax.rl.rewards import REWARDS, register_reward

if "vowels" not in REWARDS:
    @register_reward("vowels")
    def vowels(sample):
        return sum(ch in "aeiou" for ch in sample.text) / max(len(sample.text), 1)

"""


def write_rl_config(path: Path, demo_dir: Path, *, steps=4, every=2, extra: str = "") -> Path:
    """The tiny preset running only ``stage4_rl`` on the demo set with the rewards ``format`` and ``vowels``
    (a user reward: the share of vowels in the completion, which differs between an untrained policy's
    completions, so its groups have non-zero advantages and the updates move the weights)."""
    return write_config_file(path, f"""
        c.run_stages = ("stage4_rl",)
        s = c.stages.stage4_rl
        s.num_steps = {steps}
        s.mixture = ({{"manifest": {str(demo_dir / 'train.jsonl')!r}, "data_root": {str(demo_dir)!r}}},)
        s.rl.rewards = {{"format": 1.0, "vowels": 1.0}}
        s.rl.num_iterations = 2
        s.optimizer.learning_rate = 3e-3
        """, preamble=VOWELS_REWARD, every=every, extra=extra)
