"""Every shipped preset parses, validates and builds; the 7b preset has the released parameter count."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig, abstract_model, count_params
from emoqwen_jax.parallel import DEFAULT_RULES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import emotion_qwen  # noqa: E402

PRESETS = emotion_qwen.PRESETS  # demo, demo_rl, tiny, small, gpu, 7b


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_abstract_model(preset):
    config = emotion_qwen.get_config(preset)
    mcfg = ModelConfig.from_run_config(config)
    model = abstract_model(mcfg)  # shapes only: no memory, no compute
    assert count_params(model) > 0
    assert mcfg.compressor.num_experts == 2 and mcfg.expert_names == ("general", "emotion")
    assert config.data.tokenizer_vocab_size == mcfg.text.vocab_size
    assert config.preset == preset and tuple(config.mesh.rules) == DEFAULT_RULES


def test_runlocal_shrinks_the_run_and_keeps_the_model():
    """``7b,runlocal``: the 7b model with the shrink block (a few steps of batch 2, one-device mesh, float32);
    the small presets take the same block without asking."""
    full, local = emotion_qwen.get_config("7b"), emotion_qwen.get_config("7b, runlocal")
    assert local.preset == "7b" and local.model.text == full.model.text and local.model.vision == full.model.vision
    assert (full.model.dtype, full.mesh.tensor, full.stages.stage3_video.max_length) == ("bfloat16", 4, 16384)
    assert (local.model.dtype, local.mesh.tensor, local.mesh.fsdp) == ("float32", 1, 1)
    for name in emotion_qwen.STAGES:
        assert (local.stages[name].num_steps, local.stages[name].batch_size) == (3, 2)
        assert emotion_qwen.get_config("small").stages[name].num_steps == 3
    assert emotion_qwen.get_config("small").mesh == local.mesh
    with pytest.raises(ValueError, match=r"unknown config option.*'fast'.*runlocal"):
        emotion_qwen.get_config("7b,fast")


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


# Qwen/Qwen2.5-VL-7B-Instruct's config.json as published on the Hugging Face Hub (flat transformers-4 layout),
# written out here rather than derived from our config, so the count below is an outside figure.
RELEASED_7B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_7b_matches_released_qwen25vl_plus_one_merger_and_gate():
    """eval_shape of our 7b == HF Qwen2.5-VL-7B built on torch's meta device from the published config.json
    + 1 extra merger (HF's module) + our gate."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ours = abstract_model(ModelConfig.from_run_config(emotion_qwen.get_config("7b")))
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(RELEASED_7B_CONFIG))
    hf_count = sum(p.numel() for p in hf.parameters())
    merger = sum(p.numel() for p in hf.model.visual.merger.parameters())
    gate = sum(x.size for x in jax.tree.leaves(nnx.state(ours.compressor.gate, nnx.Param)))
    total = count_params(ours)
    print(f"7b preset: {total:,} parameters = Qwen2.5-VL-7B {hf_count:,} + merger {merger:,} + gate {gate:,}")
    # The Hub's safetensors index of the release: total_size 16,584,333,312 bytes of bfloat16 = 8,292,166,656.
    assert hf_count == 16_584_333_312 // 2
    assert total == hf_count + merger + gate


def test_tiny_model_runs_text_only():
    mcfg = ModelConfig.from_run_config(emotion_qwen.get_config("tiny"))
    model = EmotionQwen(mcfg, rngs=nnx.Rngs(0))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    out = model(ids)
    assert out.logits.shape == (2, 6, mcfg.text.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()


def test_larger_presets_have_no_default_data(tmp_path):
    """small, gpu and 7b read no data unless told: a run without a mixture stops before any work, naming the
    fields to set; demo data only where the preset is about it (demo, demo_rl, tiny)."""
    from emoqwen_jax.train.trainer import train_and_evaluate

    for preset in PRESETS:
        config = emotion_qwen.get_config(preset)
        has_data = [bool(config.stages[name].mixture) for name in config.stages]
        assert has_data == [preset in ("demo", "demo_rl", "tiny")] * len(has_data), preset
    config = emotion_qwen.get_config("7b")
    with pytest.raises(ValueError, match="no default data") as err:
        train_and_evaluate(config, str(tmp_path / "run"))  # refused before any work
    assert all(f"--config.stages.{name}.mixture=" in str(err.value) for name in config.run_stages)
    assert not (tmp_path / "run").exists()


def test_the_demo_set_needs_allow_demo_data_outside_the_demo_presets(tmp_path):
    """A demo manifest left in a larger preset's stage must not train it on the bundled cartoons."""
    from emoqwen_jax.data import check_demo_data
    from emoqwen_jax.train.trainer import train_and_evaluate

    for preset in ("demo", "tiny"):
        check_demo_data(emotion_qwen.get_config(preset))  # the demo set is what these presets are for
    config = emotion_qwen.get_config("small")
    own = ({"manifest": "/data/train.jsonl", "data_root": "/data"},)
    config.stages.stage1_align.mixture = config.stages.stage3_video.mixture = own
    config.stages.stage2_emotion.mixture = emotion_qwen.DEMO_MIXTURE
    with pytest.raises(ValueError, match=r"\['stage2_emotion'\].*allow_demo_data=True") as err:
        train_and_evaluate(config, str(tmp_path / "run"))
    assert "stages.stage1_align.mixture" not in str(err.value)
    config.allow_demo_data = True
    check_demo_data(config)
