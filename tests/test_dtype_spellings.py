"""Every public ``dtype`` argument takes the JAX/numpy spellings as well as the names.

``from_hf(path, dtype=jnp.float32)`` used to raise; configs keep the canonical name so they stay JSON.
"""

import hf_oracle as O
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from emoqwen_jax.convert import from_hf
from emoqwen_jax.convert.hf_export import hf_config
from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model.config import dtype_name
from emoqwen_jax.model.layers import as_dtype
from emoqwen_jax.model.lora import LoRAConfig, apply_lora
from emoqwen_jax.model_dir import load_model, load_weights, save_model

SPELLINGS = {
    "float32": ["float32", jnp.float32, np.float32, np.dtype("float32"), jnp.dtype("float32")],
    "bfloat16": ["bfloat16", jnp.bfloat16, ml_dtypes.bfloat16, np.dtype("bfloat16"), jnp.dtype(jnp.bfloat16)],
    "float16": ["float16", jnp.float16, np.float16, np.dtype("float16")],
}
CASES = [(name, s) for name, spellings in SPELLINGS.items() for s in spellings]


@pytest.mark.parametrize("name,spelling", CASES, ids=lambda v: repr(v))
def test_model_config_normalises_every_spelling(name, spelling):
    cfg = ModelConfig(dtype=spelling, param_dtype=spelling)
    assert (cfg.dtype, cfg.param_dtype) == (name, name)
    assert type(cfg.dtype) is str  # the config stays JSON-serialisable
    assert ModelConfig.from_dict({**cfg.to_dict(), "dtype": spelling}).dtype == name
    assert jnp.dtype(as_dtype(spelling)) == jnp.dtype(name)


@pytest.mark.parametrize("bad", ["float64", "bf16", np.int32, jnp.float64, 3])
def test_bad_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"model\.dtype=.*choose one of \('float32', 'bfloat16', 'float16'\)"):
        ModelConfig(dtype=bad)
    with pytest.raises(ValueError, match="choose one of"):
        dtype_name(bad)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_base")
    O.build_hf_model("base", seed=1).save_pretrained(path)
    return str(path)


def _logits(model):
    ids, mask = O.pad_batch([[7, 8, 9, 10, 11]])
    return np.asarray(model(ids, attention_mask=mask).logits, np.float32)


def test_from_hf_load_model_and_export_take_jax_dtypes(hf_dir, tmp_path):
    by_name = from_hf(hf_dir, dtype="float32")
    by_jnp = from_hf(hf_dir, dtype=jnp.float32)
    assert by_jnp.config == by_name.config
    np.testing.assert_array_equal(_logits(by_jnp), _logits(by_name))

    bf = from_hf(hf_dir, dtype=jnp.bfloat16)
    assert (bf.config.dtype, bf.config.param_dtype) == ("bfloat16", "bfloat16")
    assert bf.language_model.embed_tokens[...].dtype == jnp.bfloat16
    mixed = from_hf(hf_dir, dtype=np.dtype("bfloat16"), param_dtype=np.float32)
    assert (mixed.config.dtype, mixed.config.param_dtype) == ("bfloat16", "float32")
    assert mixed.language_model.embed_tokens[...].dtype == jnp.float32

    save_model(by_name, str(tmp_path / "m"))
    for spelling in ("bfloat16", jnp.bfloat16, np.dtype("bfloat16")):
        loaded = load_model(str(tmp_path / "m"), dtype=spelling)
        assert loaded.config.dtype == "bfloat16"
        assert loaded.language_model.embed_tokens[...].dtype == jnp.float32  # storage kept
        assert np.isfinite(_logits(loaded)).all()

    for source in (hf_dir, str(tmp_path / "m")):  # load_weights: an HF directory or one of ours
        assert load_weights(source, dtype=jnp.bfloat16).config.dtype == "bfloat16"
    assert hf_config(by_name.config, dtype=jnp.bfloat16)["dtype"] == "bfloat16"
    assert hf_config(by_name.config, dtype=np.dtype("float32"))["dtype"] == "float32"


def test_lora_on_a_model_built_with_a_jnp_dtype(hf_dir):
    model = from_hf(hf_dir, dtype=jnp.bfloat16)
    names = apply_lora(model, LoRAConfig(rank=2, alpha=4.0, dropout=0.0))
    assert names
    q = model.language_model.layers[0].self_attn.q_proj
    assert q.lora_a[...].dtype == jnp.bfloat16
    assert np.isfinite(_logits(model)).all()
