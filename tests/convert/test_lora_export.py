"""PEFT adapter export (``to-hf --lora_adapter``): transformers + peft reproduce our adapter logits.

The model is test_hf_export's tiny random Qwen2.5-VL (tokenizer-consistent special ids) imported with
``from_hf``, with adapters on the LLM's q/k/v/o (the recipe), the ViT's fused qkv and the gate's fc1, and
random ``lora_b`` (as after training). The base export is loaded with ``trust_remote_code`` and the adapter
with ``PeftModel.from_pretrained``; logits must match on text, image, video and mixed inputs within 1e-4.
"""

import json

import hf_oracle as O
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from test_hf_export import CASES, TOL, _perturb, src_dir, type_ids  # noqa: F401 — src_dir is a fixture
from transformers import AutoModelForImageTextToText

from emoqwen_jax.cli.convert import main as convert_main
from emoqwen_jax.convert import from_hf
from emoqwen_jax.convert.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_hf, peft_tensors
from emoqwen_jax.model.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, merge_lora
from emoqwen_jax.model_dir import save_model

TARGETS = DEFAULT_TARGETS + (r"^visual/blocks/\d+/attn/qkv$", r"^compressor/gate/fc1$")


def _with_adapters(model, seed):
    from flax import nnx

    apply_lora(model, LoRAConfig(rank=3, alpha=5.0, dropout=0.05, targets=TARGETS), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "lora_b":
            var[...] = jnp.asarray(rng.standard_normal(var.shape).astype(np.float32) * 0.3)
    return model


@pytest.fixture(scope="module")
def exported(src_dir, tmp_path_factory):  # noqa: F811
    model = _with_adapters(_perturb(from_hf(str(src_dir), compressor=dict(num_experts=2), seed=1), seed=0), seed=4)
    root = tmp_path_factory.mktemp("lora")
    summary = export_hf(model, str(root / "hf"), lora_adapter="", overwrite=True)
    base = AutoModelForImageTextToText.from_pretrained(root / "hf", trust_remote_code=True, local_files_only=True,
                                                       dtype=torch.float32, attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(base, summary["adapter"]["adapter_dir"]).eval()
    return model, root, summary, peft


def _peft_logits(peft, ids, mask, **vision):
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items()}
    peft.get_base_model().model.rope_deltas = None
    with torch.no_grad():
        return peft(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    mm_token_type_ids=torch.as_tensor(type_ids(ids)), **kwargs).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_reproduces_jax_logits(exported, case):
    model, _, _, peft = exported
    rows, vision = CASES[case]
    ids, mask = O.pad_batch(rows)
    got = np.asarray(model(ids, mask, **vision).logits)
    assert O.rel_err(got, _peft_logits(peft, ids, mask, **vision), mask) <= TOL
    with peft.disable_adapter():  # the adapters matter: without them the logits are the base model's
        assert O.rel_err(got, _peft_logits(peft, ids, mask, **vision), mask) > 1e-2


def test_adapter_layout_names_and_config(exported):
    model, root, summary, peft = exported
    adapter_dir = root / "hf-lora"  # next to the base export by default
    assert summary["adapter"]["adapter_dir"] == str(adapter_dir)
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 5.0 and cfg["lora_dropout"] == 0.05
    assert cfg["base_model_name_or_path"] == str(root / "hf")
    n_text, n_vit = model.config.text.num_layers, model.config.vision.depth
    assert len(cfg["target_modules"]) == 4 * n_text + n_vit + 1
    assert "model.language_model.layers.1.self_attn.o_proj" in cfg["target_modules"]
    assert "model.visual.blocks.0.attn.qkv" in cfg["target_modules"]
    assert "model.visual.compressor.gate.fc1" in cfg["target_modules"]
    # Our tensor names are exactly the ones PEFT itself saves for this model.
    from peft import get_peft_model_state_dict

    theirs = get_peft_model_state_dict(peft)
    ours = load_file(adapter_dir / ADAPTER_WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key].numpy())
    # The base export has no adapter tensors and no adapter effect (the weights are the unmerged ones).
    names = sorted(k for f in (root / "hf").glob("*.safetensors") for k in load_file(f))
    assert not [k for k in names if "lora" in k]


def test_cli_to_hf_merged_and_adapter(exported, tmp_path):
    model, _, _, _ = exported
    ckpt = save_model(model, str(tmp_path / "ckpt"))
    assert convert_main(["to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "a"), "--lora-adapter",
                         str(tmp_path / "adapter"), "--no_tokenizer"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    np.testing.assert_array_equal(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)[
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"],
        peft_tensors(model, "emotion_qwen")["base_model.model.model.language_model.layers.0.self_attn.q_proj"
                                            ".lora_B.weight"])
    # Without --lora_adapter a LoRA checkpoint is exported merged: q_proj = (kernel + scale A B)^T.
    assert convert_main(["to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "m"), "--no_tokenizer"]) == 0
    merged = {k: v for f in (tmp_path / "m").glob("*.safetensors") for k, v in load_file(f).items()}
    from flax import nnx

    want = np.asarray(merge_lora(nnx.clone(model)).language_model.layers[0].self_attn.q_proj.kernel[...]).T
    np.testing.assert_array_equal(merged["model.layers.0.self_attn.q_proj.weight"], want)
    assert np.abs(want - np.asarray(model.language_model.layers[0].self_attn.q_proj.kernel[...]).T).max() > 1e-3


def test_plain_to_hf_refuses_a_model_with_adapters(tmp_path):
    """Exporting adapters' base weights alone would silently drop the fine-tuning."""
    import sys
    from pathlib import Path

    from flax import nnx

    from emoqwen_jax.convert.hf_export import to_hf
    from emoqwen_jax.model import EmotionQwen, ModelConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
    import emotion_qwen

    model = EmotionQwen(ModelConfig.from_run_config(emotion_qwen.get_config("tiny")), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig.from_dict({"enabled": True, "rank": 2, "alpha": 2, "dropout": 0.0,
                                            "targets": DEFAULT_TARGETS}), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="LoRA adapters"):
        to_hf(model, str(tmp_path / "out"), tokenizer=False)
