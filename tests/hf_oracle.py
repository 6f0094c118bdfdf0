"""The outside oracle: tiny Hugging Face Qwen2.5-VL torch models with random weights, and helpers to feed
them and us the same inputs. Nothing is downloaded; every model is built from a small config."""

from __future__ import annotations

import numpy as np
import torch
from tolerance import rel_err  # noqa: F401  (O.rel_err in the parity tests)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMAGE, VIDEO, VSTART, VEND = 500, 501, 502, 503

# Several small configs with distinct (often prime-ish) sizes so a transposed axis cannot hide.
CONFIGS = {
    # The tiny config of docs/design.md: window 56 px = 2 merged units, full attention in block 1.
    "base": dict(
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56,
                    fullatt_block_indexes=[1]),
        tie=False),
    # Window of 4 merged units (112 px, as released) that does not divide the test grids; GQA 6/2 heads
    # with head_dim 16 and tied embeddings; three ViT blocks with full attention first and last.
    "window112_tied": dict(
        text=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=72, mrope_section=[2, 3, 3]),
        vision=dict(depth=3, hidden_size=48, num_heads=3, intermediate_size=40, window_size=112,
                    fullatt_block_indexes=[0, 2]),
        tie=True),
}


def hf_config(name: str, vocab_size: int = 512) -> Qwen2_5_VLConfig:
    c = CONFIGS[name]
    t, v = dict(c["text"]), dict(c["vision"])
    section = t.pop("mrope_section")
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}, **t),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                           out_hidden_size=t["hidden_size"], **v),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=c["tie"])


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights around 1, biases non-zero) so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return module


def build_hf_model(name: str, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = hf_config(name)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def sharpen_(model: Qwen2_5_VLForConditionalGeneration) -> Qwen2_5_VLForConditionalGeneration:
    """Scales the decoder (norms excepted) and the LM head so greedy tokens vary and top-1/top-2 margins are
    far above the float32 mismatch: token equality then means something."""
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
        model.lm_head.weight.mul_(12.0)
    return model


def video_tokens(grid) -> list[int]:
    t, h, w = grid
    return [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND]


def image_tokens(grid) -> list[int]:
    t, h, w = grid
    return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def pixels(grid, seed: int) -> np.ndarray:
    t, h, w = grid
    return np.random.default_rng(seed).standard_normal((t * h * w, 1176)).astype(np.float32)


def pad_batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token rows with id 0 (masked out) -> input_ids, attention_mask int64[B, L]."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def mm_token_type_ids(input_ids: np.ndarray) -> np.ndarray:
    return np.where(input_ids == IMAGE, 1, np.where(input_ids == VIDEO, 2, 0))


def hf_logits(model, input_ids, attention_mask, position_ids=None, **vision) -> np.ndarray:
    """Runs HF; with ``position_ids`` None, HF computes positions itself from mm_token_type_ids."""
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items() if v is not None}
    model.model.rope_deltas = None
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                    position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids, np.int64)),
                    mm_token_type_ids=torch.as_tensor(mm_token_type_ids(input_ids)), **kwargs)
    return out.logits.float().numpy()


def assert_hf_generate_equals(hf, got, input_ids, attention_mask, pad_id: int, **inputs) -> np.ndarray:
    """Greedy ``hf.generate`` on left-padded prompts (no positions or token types given: the model works them
    out) gives ``got`` (our ``GenerationOutput``: tokens int[B, n] padded with ``pad_id`` after a stop) with a
    top-2 logit margin > 0.01 at every live step, so equal tokens are not a float coincidence. Returns HF's
    tokens int[B, <= n]."""
    n = got.tokens.shape[1]
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                          max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          **{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})
    ref = out.sequences[:, input_ids.shape[1]:].numpy()
    top2 = np.sort(torch.stack(out.logits, 1).numpy(), -1)[..., -2:]
    live = np.arange(ref.shape[1])[None] < got.num_tokens[:, None]
    assert (top2[..., 1] - top2[..., 0])[live].min() > 0.01
    padded = np.full((len(input_ids), n), pad_id, np.int64)
    padded[:, :ref.shape[1]] = ref
    np.testing.assert_array_equal(got.tokens, padded)
    return ref
