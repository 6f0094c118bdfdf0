"""emoqwen-plan for stage4_rl: each part's bytes per device against arithmetic on the model's shapes (parameter
counts of the abstract model, the config's layer/head sizes), on one device and on the 7b preset's mesh."""

import sys

import jax
import numpy as np
import pytest
from config_files import ROOT
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.rl.plan import rl_plan

sys.path.insert(0, str(ROOT / "configs"))
import emotion_qwen  # noqa: E402

pytestmark = pytest.mark.slow  # compiles 7b plans


def param_counts(config) -> tuple[int, int]:
    """(all parameters, the LLM's parameters) of the preset's model."""
    model = nnx.eval_shape(lambda: EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(0)))
    sizes = {jax.tree_util.keystr(path): int(np.prod(x.shape))
             for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    return sum(sizes.values()), sum(n for k, n in sizes.items() if k.startswith("['language_model']"))


def kv_cache_bytes(config, bytes_per_value: int) -> int:
    """Every layer's k and v for every completion slot of a round, prompt + completion long (all devices)."""
    t, s = config.model.text, config.stages.stage4_rl
    head_dim = t.hidden_size // t.num_heads
    return (t.num_layers * 2 * s.batch_size * (s.max_length + s.rl.max_new_tokens) * t.num_kv_heads * head_dim
            * bytes_per_value)


def test_one_device_plan_equals_the_shapes_arithmetic():
    config = emotion_qwen.get_config("tiny")
    s = config.stages.stage4_rl
    s.trainable, s.trainable_roles = (r"^language_model/",), ()  # Adam moments for the LLM alone
    total, llm = param_counts(config)
    report = rl_plan(config, num_devices=1)
    assert report["policy_bytes"] == 4 * total  # float32 master weights
    assert report["reference_bytes"] == report["policy_bytes"] and s.rl.beta > 0
    assert 0 <= report["optimizer_bytes"] - 2 * 4 * llm < 64  # m and v per trainable weight (+ step counters)
    assert report["kv_cache_bytes"] == kv_cache_bytes(config, 4)  # the tiny model computes in float32
    b, n = s.batch_size, s.rl.max_new_tokens
    assert report["rollout_bytes"] == b * n * (4 + 4 + 1 + 4 + 4) + 4 * b  # tokens, positions, mask, 2 logp; adv
    parts = ("policy", "optimizer", "reference", "kv_cache", "rollout")
    assert report["per_device_bytes"] == sum(report[f"{p}_bytes"] for p in parts)
    s.rl.beta = 0.0
    assert rl_plan(config, num_devices=1)["reference_bytes"] == 0  # beta = 0 keeps no reference


def test_7b_plan_on_eight_devices():
    config = emotion_qwen.get_config("7b")  # tensor=4, fsdp over the rest: fsdp=2 on 8 devices
    total, _ = param_counts(config)
    report = rl_plan(config, num_devices=8, device_memory_gb=80)
    assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 4}
    # 64 slots split over fsdp=2, the 4 KV heads over tensor=4; bfloat16 cache
    assert report["kv_cache_bytes"] == kv_cache_bytes(config, 2) // (2 * 4)
    assert abs(report["policy_bytes"] * 8 - 4 * total) <= 0.01 * 4 * total  # all but the small leaves split
    assert report["reference_bytes"] == report["policy_bytes"]
    assert report["headroom"] == 1 - report["per_device_bytes"] / 80e9
