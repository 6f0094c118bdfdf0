"""Every shipped preset parses, validates and builds; the 7b preset has the released parameter count."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig, abstract_model, count_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import emotion_qwen  # noqa: E402

PRESETS = ("demo", "tiny", "small", "7b")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_abstract_model(preset):
    config = emotion_qwen.get_config(preset)
    mcfg = ModelConfig.from_run_config(config)
    model = abstract_model(mcfg)  # shapes only: no memory, no compute
    assert count_params(model) > 0
    assert mcfg.compressor.num_experts == 2 and mcfg.expert_names == ("general", "emotion")
    assert config.data.tokenizer_vocab_size == mcfg.text.vocab_size


def test_unknown_preset_and_bad_fields_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        emotion_qwen.get_config("13b")
    config = emotion_qwen.get_config("tiny")
    config.model.text.mrope_section = (4, 4, 4)
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig.from_run_config(config)
    config = emotion_qwen.get_config("tiny")
    config.model.vision.num_heads = 3
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig.from_run_config(config)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"text": {"hidden": 3}})


def test_7b_matches_released_qwen25vl_plus_one_merger_and_gate():
    """eval_shape of our 7b == HF Qwen2.5-VL-7B (built on torch's meta device) + 1 extra merger + the gate."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    mcfg = ModelConfig.from_run_config(emotion_qwen.get_config("7b"))
    ours = abstract_model(mcfg)
    v, t = mcfg.vision, mcfg.text
    hf_cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                         num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                         intermediate_size=t.intermediate_size,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": list(t.mrope_section)}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                           intermediate_size=v.intermediate_size, out_hidden_size=t.hidden_size,
                           window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes)))
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    merger = sum(p.numel() for p in hf.model.visual.merger.parameters())
    gate = sum(x.size for x in jax.tree.leaves(nnx.state(ours.compressor.gate, nnx.Param)))
    total = count_params(ours)
    print(f"7b preset: {total:,} parameters = Qwen2.5-VL-7B {hf_count:,} + merger {merger:,} + gate {gate:,}")
    assert 8.2e9 < hf_count < 8.4e9
    assert total == hf_count + merger + gate


def test_tiny_model_runs_text_only():
    mcfg = ModelConfig.from_run_config(emotion_qwen.get_config("tiny"))
    model = EmotionQwen(mcfg, rngs=nnx.Rngs(0))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    out = model(ids)
    assert out.logits.shape == (2, 6, mcfg.text.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()
