"""to_hf / emoqwen-convert to-hf: transformers loads our exports and computes our logits and greedy tokens.

The source is a tiny random Qwen2.5-VL (hf_oracle's 'base' sizes) whose vision token ids are those of the
tiny Qwen2 tokenizer (vocab 512), so exports ship a working tokenizer. Imported with ``from_hf``, its
experts get noise (so they differ) and its gate / router random weights, then it is exported and loaded with
``AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)``. transformers computes its own
positions everywhere: the export's ``get_rope_index`` follows the released rule, so videos whose temporal
span exceeds the spatial one (where transformers 5.24's stock rule differs) are included on purpose.
As in tests/infer, the decoder weights are scaled (x3, LM head x12) so greedy margins mean something.
"""

import json
import os

import hf_oracle as O
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
)

from emoqwen_jax import layout
from emoqwen_jax.cli.convert import main as convert_main
from emoqwen_jax.convert import from_hf, hf_names, to_hf
from emoqwen_jax.data.tokenizer import load_tokenizer, tokenizer_info
from emoqwen_jax.infer import SamplingConfig, generate, left_pad
from emoqwen_jax.model import layout_spec
from emoqwen_jax.model_dir import save_model

TOL = 1e-4
TOK = tokenizer_info(512)
IMG, VID, VS, VE = TOK.image_pad_id, TOK.video_pad_id, TOK.vision_start_id, TOK.vision_end_id
STOP, PAD = (TOK.im_end_id, TOK.endoftext_id), TOK.endoftext_id
SCALE = dict(routing="token", num_experts=4, expert_names=(), top_k=2)


def image_tokens(grid):
    return [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]


def video_tokens(grid):
    return [VS] + [VID] * (int(np.prod(grid)) // 4) + [VE]


def type_ids(ids):
    return np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))


# name -> (rows, vision kwargs). Every vision grid has windows that do not divide it.
CASES = {
    "text": ([[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18]], {}),
    "image": ([[7, 8] + image_tokens((1, 6, 10)) + [9, 10, 11]],
              dict(pixel_values=O.pixels((1, 6, 10), 1), image_grid_thw=np.array([(1, 6, 10)]))),
    # temporal span (3 - 1) * 1.5 * 2 = 6 > max(h, w) / 2 - 1 = 2: the released and 5.24 rules disagree.
    "video": ([[7] + video_tokens((3, 4, 6)) + [9, 10, 11, 12]],
              dict(pixel_values_videos=O.pixels((3, 4, 6), 2), video_grid_thw=np.array([(3, 4, 6)]),
                   second_per_grid_ts=np.array([1.5], np.float32))),
    "mixed": ([[5] + image_tokens((1, 4, 8)) + [6, 7, 8, 9, 10, 11, 12, 13], [5, 6] + video_tokens((4, 6, 4)) + [7]],
              dict(pixel_values=O.pixels((1, 4, 8), 3), image_grid_thw=np.array([(1, 4, 8)]),
                   pixel_values_videos=O.pixels((4, 6, 4), 4), video_grid_thw=np.array([(4, 6, 4)]),
                   second_per_grid_ts=np.array([0.5], np.float32))),
}


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    cfg = O.hf_config("base")
    cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id = IMG, VID, VS, VE
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = O.sharpen_(O.randomize_(Qwen2_5_VLForConditionalGeneration(cfg).eval(), 11))
    path = tmp_path_factory.mktemp("src")
    hf.save_pretrained(path)
    return path


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _perturb(model, seed):
    """Experts differ (noise 30% of each tensor's spread); gate / router weights random and decisive."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(seed)
    comp = pure["compressor"]
    for group, rel in (("experts", 0.3), ("gate", 1.0), ("router", 50.0)):
        if group not in comp:
            continue
        for path, x in jax.tree_util.tree_leaves_with_path(comp[group]):
            x = np.asarray(x)
            noise = rng.standard_normal(x.shape).astype(np.float32) * rel * max(float(x.std()), 0.05)
            target = comp[group]
            for key in path[:-1]:
                target = target[key.key]
            target[path[-1].key] = (x.astype(np.float32) + noise).astype(x.dtype)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def exports(src_dir, tmp_path_factory):
    """mode -> (JAX model, export dir, transformers model)."""
    out = {}
    for mode, comp in (("paper", dict(num_experts=2)), ("paper_tokens", dict(num_experts=3, expert_names=(),
                                                                              gate_input="tokens")),
                       ("scale", dict(SCALE, capacity_factor=0.75, group_size=5)),  # several groups per call
                       ("dropless", dict(SCALE, capacity_factor=0.0))):
        model = _perturb(from_hf(str(src_dir), compressor=comp, seed=1), seed=len(out))
        path = tmp_path_factory.mktemp(mode)
        to_hf(model, str(path), overwrite=True, max_shard_size="200KB")
        hf = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, local_files_only=True,
                                                         dtype=torch.float32, attn_implementation="eager").eval()
        out[mode] = (model, path, hf)
    return out


def _hf_logits(hf, ids, mask, with_types=True, **vision):
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items()}
    if with_types:  # without them the export derives the types from the placeholder ids
        kwargs["mm_token_type_ids"] = torch.as_tensor(type_ids(ids))
    hf.model.rope_deltas = None
    with torch.no_grad():
        return hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kwargs).logits.numpy()


@pytest.mark.parametrize("mode,case", [("paper", c) for c in CASES] + [("paper_tokens", "mixed"), ("scale", "image"),
                                                                      ("scale", "video"), ("dropless", "mixed")])
def test_logits_match(exports, mode, case):
    model, _, hf = exports[mode]
    rows, vision = CASES[case]
    ids, mask = O.pad_batch(rows)
    got = model(ids, mask, **vision)
    ref = _hf_logits(hf, ids, mask, with_types=case != "video", **vision)
    assert O.rel_err(got.logits, ref, mask) <= TOL
    if mode.startswith("paper") and vision:  # the gate really mixes (the experts differ, so mixing matters)
        weights = np.asarray(got.gate_weights)
        assert np.abs(weights - 1 / weights.shape[1]).max() > 0.05
    if mode == "scale":  # capacity 0.75 drops assignments: the priority rule is exercised
        assert float(got.aux["dropped_assignments"]) > 0


def test_export_positions_follow_released_rule(exports):
    _, _, hf = exports["paper"]
    rows, vision = CASES["mixed"]
    ids, mask = O.pad_batch(rows)
    model = exports["paper"][0]
    want, deltas = layout.get_rope_index(ids, mask, vision["image_grid_thw"], vision["video_grid_thw"],
                                         vision["second_per_grid_ts"], layout_spec(model.config))
    grids = {k: torch.as_tensor(vision[k]) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    got, got_deltas = hf.model.get_rope_index(torch.as_tensor(ids), torch.as_tensor(type_ids(ids)),
                                              attention_mask=torch.as_tensor(mask), **grids)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(got.numpy()[:, valid], want[:, valid])
    np.testing.assert_array_equal(got_deltas.numpy()[:, 0], deltas + ids.shape[1] - mask.sum(1))
    # transformers' own rule differs on this video (temporal span 3 > 2): the override is what makes it match.
    stock, _ = Qwen2_5_VLModel.get_rope_index(hf.model, torch.as_tensor(ids), torch.as_tensor(type_ids(ids)),
                                              attention_mask=torch.as_tensor(mask), **grids)
    assert (stock.numpy()[:, valid] != want[:, valid]).any()


def test_generate_matches_jax_greedy(exports):
    model, _, hf = exports["paper"]
    n = 6
    rows = [[7] + video_tokens((3, 4, 6)) + [9, 10], [5, 6] + image_tokens((1, 4, 8)) + [8, 9, 10, 11]]
    vision = dict(pixel_values=O.pixels((1, 4, 8), 5), image_grid_thw=np.array([(1, 4, 8)]),
                  pixel_values_videos=O.pixels((3, 4, 6), 6), video_grid_thw=np.array([(3, 4, 6)]),
                  second_per_grid_ts=np.array([1.5], np.float32))
    ids, mask = left_pad(rows, PAD)
    got = generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=n, stop_ids=STOP, pad_id=PAD), **vision)
    O.assert_hf_generate_equals(hf, got, ids, mask, PAD, **vision)


def test_layout_names_and_config(exports):
    model, path, _ = exports["paper"]
    files = sorted(os.listdir(path))
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]  # no pickle anywhere
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(f in files for f in shards)
    want = {k for e in hf_names.export_entries(model.config) for k in e.hf_keys}
    assert set(index["weight_map"]) == want
    assert "visual.compressor.experts.1.mlp.0.weight" in want and "visual.compressor.gate.attention.q_proj.bias" in want
    assert not [k for k in want if "merger" in k]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "emotion_qwen" and cfg["compressor"]["num_experts"] == 2
    assert cfg["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_emotion_qwen.")
    assert {"modeling_emotion_qwen.py", "configuration_emotion_qwen.py", "generation_config.json"} <= set(files)
    assert "visual.compressor.router.weight" in json.loads(
        (exports["scale"][1] / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("mode", ["paper", "scale"])
def test_round_trip_is_bit_identical(exports, tmp_path, mode):
    model, path, hf = exports[mode]
    hf.save_pretrained(tmp_path / "resaved")  # what a user fine-tuning the export in transformers writes
    for where in (path, tmp_path / "resaved"):  # HF -> JAX -> HF -> JAX: the model itself came from from_hf
        back = from_hf(str(where))
        assert back.config == model.config
        a, b = jax.tree.leaves(_params(model)), jax.tree.leaves(_params(back))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def test_bfloat16_round_trip(src_dir, tmp_path):
    model = _perturb(from_hf(str(src_dir), "bfloat16", compressor=dict(num_experts=2)), seed=7)
    to_hf(model, str(tmp_path / "bf16"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = from_hf(str(tmp_path / "bf16"), "bfloat16")
    for x, y in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(back)), strict=True):
        assert y.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(x, y)


def test_plain_qwen_format_needs_no_remote_code(src_dir, tmp_path):
    model = from_hf(str(src_dir), compressor={"num_experts": 1, "expert_names": ()})
    out = tmp_path / "plain"
    to_hf(model, str(out), format="qwen2_5_vl")
    assert not [f for f in os.listdir(out) if f.endswith(".py")]
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    # Same tensors, bit for bit, under the same names as the source directory.
    src, got = load_file(str(src_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(got)
    for key in src:
        np.testing.assert_array_equal(src[key], got[key], err_msg=key)
    hf = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    assert type(hf) is Qwen2_5_VLForConditionalGeneration
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(src_dir, attn_implementation="eager").eval()
    rows, vision = CASES["image"]
    ids, mask = O.pad_batch(rows)
    assert O.rel_err(_hf_logits(hf, ids, mask, **vision), _hf_logits(ref, ids, mask, **vision)) <= 1e-6


def test_tokenizer_and_image_processor(exports):
    path = exports["paper"][1]
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)
    ours, _ = load_tokenizer(512)
    text = "The person looks happy, surprised… 😊 and calm."
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|video_pad|>"]) == [
        TOK.im_start_id, TOK.im_end_id, VID]
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    # The video processor needs torchvision (absent here), so AutoProcessor is not tested; the image one is.
    proc = AutoImageProcessor.from_pretrained(path, trust_remote_code=True, local_files_only=True)
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)
    out = proc(images=[image], return_tensors="np")
    assert out["pixel_values"].shape[1] == 1176 and out["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_errors(exports, src_dir, tmp_path):
    model, path, _ = exports["paper"]
    with pytest.raises(ValueError, match="num_experts=2.*emotion_qwen"):
        to_hf(model, str(tmp_path / "a"), format="qwen2_5_vl")
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(ValueError, match="choose one of"):
        to_hf(model, str(tmp_path / "b"), format="llava")
    with pytest.raises(ValueError, match="max_shard_size"):
        to_hf(model, str(tmp_path / "c"), max_shard_size="lots")
    with pytest.raises(FileExistsError, match="overwrite"):
        to_hf(model, str(path))
    oracle = from_hf(str(_oracle_dir(tmp_path)), compressor={"num_experts": 1, "expert_names": ()})
    with pytest.raises(ValueError, match="image_token_id=500.*--no_tokenizer"):
        to_hf(oracle, str(tmp_path / "d"))
    to_hf(oracle, str(tmp_path / "d"), tokenizer=False, format="qwen2_5_vl")
    # Overwrite replaces a sharded export by a single file and leaves no stale shard behind.
    (tmp_path / "d" / "notes.txt").write_text("mine")
    to_hf(oracle, str(tmp_path / "d"), tokenizer=False, overwrite=True, max_shard_size="100KB")
    to_hf(oracle, str(tmp_path / "d"), tokenizer=False, overwrite=True)
    left = sorted(os.listdir(tmp_path / "d"))
    assert "notes.txt" in left and [f for f in left if f.endswith(".safetensors")] == ["model.safetensors"]
    assert "model.safetensors.index.json" not in left


def _oracle_dir(tmp_path):
    """hf_oracle's model, whose vision ids (500..503) are not the tokenizer's."""
    path = tmp_path / "oracle"
    O.build_hf_model("base", seed=2).save_pretrained(path)
    return path


def test_cli_to_hf(exports, tmp_path, capsys):
    model = exports["paper"][0]
    save_model(model, str(tmp_path / "ckpt"))
    assert convert_main(["to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                         "--max_shard_size", "300KB"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "emotion_qwen" and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    back = from_hf(str(tmp_path / "hf"))
    for x, y in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(back)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert convert_main(["to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "q"),
                         "--format", "qwen2_5_vl"]) == 2
    assert "num_experts=2" in capsys.readouterr().err
    assert convert_main(["to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
