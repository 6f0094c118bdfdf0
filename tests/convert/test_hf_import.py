"""from_hf: sharded files, both config formats, our model directory round trip, and clear errors."""

import json
import shutil

import hf_oracle as O
import jax
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_rel

from emoqwen_jax.convert import config_from_hf, from_hf
from emoqwen_jax.model_dir import load_model, save_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_base")
    O.build_hf_model("base", seed=5).save_pretrained(path)
    return path


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same(a, b):
    la, lb = jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sharded_checkpoint_loads_identically(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    O.build_hf_model("base", seed=5).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    _assert_same(from_hf(str(hf_dir)), from_hf(str(sharded)))


def test_every_expert_is_the_hf_merger(hf_dir):
    from safetensors.numpy import load_file

    model = from_hf(str(hf_dir), compressor={"num_experts": 3, "expert_names": ("a", "b", "c")})
    w = load_file(str(hf_dir / "model.safetensors"))["visual.merger.mlp.0.weight"]
    kernels = np.asarray(model.compressor.experts.mlp_0_kernel[...])
    assert kernels.shape[0] == 3
    for e in range(3):
        np.testing.assert_array_equal(kernels[e], w.T)


def test_bfloat16_import(hf_dir):
    model = from_hf(str(hf_dir), dtype="bfloat16")
    assert model.language_model.embed_tokens[...].dtype == jax.numpy.bfloat16


def test_flat_release_config_format(hf_dir):
    """The released Qwen2.5-VL config.json keeps text fields at the top level with rope_scaling."""
    nested = json.loads((hf_dir / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = nested["text_config"]
    flat.update({k: text[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "intermediate_size", "rms_norm_eps")})
    flat["rope_theta"] = text["rope_parameters"]["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]}
    flat["vision_config"] = dict(nested["vision_config"], in_chans=3)
    assert config_from_hf(flat) == config_from_hf(nested)


def test_model_directory_round_trip(hf_dir, tmp_path):
    model = from_hf(str(hf_dir))
    save_model(model, str(tmp_path / "m"))
    restored = load_model(str(tmp_path / "m"))
    assert restored.config == model.config
    _assert_same(model, restored)
    with pytest.raises(FileExistsError):
        save_model(model, str(tmp_path / "m"))


def test_clear_errors(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(str(tmp_path / "empty"))

    def variant(name, edit_config=None, drop_weights=False):
        path = tmp_path / name
        shutil.copytree(hf_dir, path)
        if edit_config:
            cfg = json.loads((path / "config.json").read_text())
            edit_config(cfg)
            (path / "config.json").write_text(json.dumps(cfg))
        if drop_weights:
            (path / "model.safetensors").unlink()
        return str(path)

    with pytest.raises(ValueError, match="unknown architecture.*llava"):
        from_hf(variant("arch", lambda c: c.update(model_type="llava")))
    with pytest.raises(ValueError, match="does not fit"):
        from_hf(variant("shape", lambda c: c["text_config"].update(intermediate_size=96)))
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        from_hf(variant("depth", lambda c: c["vision_config"].update(depth=3)))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_hf(variant("noweights", drop_weights=True))


def test_scale_mode_import_initialises_router_and_perturbs_experts(hf_dir):
    plain = from_hf(str(hf_dir), compressor={"routing": "token", "num_experts": 4, "expert_names": (), "top_k": 2,
                                             "capacity_factor": 0.0})
    noisy = from_hf(str(hf_dir), compressor={"routing": "token", "num_experts": 4, "expert_names": (), "top_k": 2,
                                             "init_noise_std": 0.01})
    assert plain.compressor.router.kernel[...].shape == (4 * 32, 4)
    k_plain = np.asarray(plain.compressor.experts.mlp_0_kernel[...])
    k_noisy = np.asarray(noisy.compressor.experts.mlp_0_kernel[...])
    np.testing.assert_array_equal(k_noisy[0], k_plain[0])  # expert 0 stays the exact merger
    for e in range(1, 4):
        rel = np.abs(k_noisy[e] - k_plain[e]).std() / k_plain[e].std()
        assert 0.005 < rel < 0.02
    # With identical experts and no drops (dropless), token routing reproduces the merger (weights sum to 1).
    ids, mask = O.pad_batch([[7] + O.image_tokens((1, 4, 4)) + [9]])
    vision = dict(pixel_values=O.pixels((1, 4, 4), 0), image_grid_thw=np.array([(1, 4, 4)]))
    base = from_hf(str(hf_dir), compressor={"num_experts": 1, "expert_names": ()})
    assert_close_rel(plain(ids, mask, **vision).logits, base(ids, mask, **vision).logits, 1e-5, what="logits")
