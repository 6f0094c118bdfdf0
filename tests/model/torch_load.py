"""Helpers for the per-module tests: small HF torch configs, strict copying of torch weights into our NNX
modules, random NNX parameters, and an independent numpy patch merger.

Weight rules (HF -> ours): ``nn.Linear.weight`` [out, in] -> ``Linear.kernel`` [in, out]; Conv3d patch embed
[D, C, 2, 14, 14] -> kernel = weight.reshape(D, -1).T; ``Qwen2_5_VLPatchMerger`` -> one slice of the stacked
``ExpertMergers`` params (ln_q_weight [E, Dv], mlp_0_kernel [E, 4Dv, 4Dv], mlp_0_bias, mlp_2_kernel, mlp_2_bias).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig

from emoqwen_jax.convert.hf_import import config_from_hf
from emoqwen_jax.model import layout_spec

# Distinct small sizes (vision 40/2 heads -> head_dim 20, MLP 56; text 60/6 heads/2 KV -> head_dim 10, MLP 44,
# out 60) so that a transposed or mis-split axis cannot hide.
VISION = dict(depth=3, hidden_size=40, num_heads=2, intermediate_size=56, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, tokens_per_second=2, window_size=56, fullatt_block_indexes=[1])
TEXT = dict(vocab_size=64, hidden_size=60, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=44, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 2, 2]})


def small_hf_config(**vision_overrides) -> Qwen2_5_VLConfig:
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT), vision_config=dict(VISION, out_hidden_size=TEXT["hidden_size"], **vision_overrides),
        image_token_id=50, video_token_id=51, vision_start_token_id=52, vision_end_token_id=53)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return cfg


def ours_config(hf_cfg: Qwen2_5_VLConfig, **compressor):
    """Our ModelConfig for an HF config (through the converter's translation) and its layout spec."""
    config = config_from_hf(hf_cfg.to_dict(), compressor=compressor or {"num_experts": 1, "expert_names": ()})
    return config, layout_spec(config)


def build(ctor) -> nnx.Module:
    """Constructs an NNX module without running its initialisers (every parameter zero, to be filled by
    ``load_torch_`` / ``randomize_nnx_``): eager random init costs seconds per module on CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def _assign(var: nnx.Variable, value: np.ndarray, index=None) -> None:
    full = np.array(var[...])
    if tuple(full[index].shape if index is not None else full.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch: ours {full.shape} (index {index}) vs torch {tuple(value.shape)}")
    if index is None:
        full = value
    else:
        full[index] = value
    var[...] = jnp.asarray(full, var[...].dtype)


def _torch_np(p: torch.Tensor) -> np.ndarray:
    return p.detach().float().numpy()


def load_merger_(experts, merger: torch.nn.Module, expert: int = 0) -> int:
    """Copies an HF ``Qwen2_5_VLPatchMerger`` into slice ``expert`` of our stacked ``ExpertMergers``."""
    sd = {k: _torch_np(v) for k, v in merger.state_dict().items()}
    _assign(experts.ln_q_weight, sd["ln_q.weight"], expert)
    _assign(experts.mlp_0_kernel, sd["mlp.0.weight"].T, expert)
    _assign(experts.mlp_0_bias, sd["mlp.0.bias"], expert)
    _assign(experts.mlp_2_kernel, sd["mlp.2.weight"].T, expert)
    _assign(experts.mlp_2_bias, sd["mlp.2.bias"], expert)
    return len(sd)


def load_torch_(ours: nnx.Module, module: torch.nn.Module, *, skip: tuple[str, ...] = ()) -> None:
    """Strictly copies every parameter of ``module`` into ``ours`` by HF name (``blocks.0.attn.qkv.weight`` ->
    ``ours.blocks[0].attn.qkv.kernel``), transposing Linear/Conv weights; every parameter of ``ours`` must
    receive a value. Torch names starting with a ``skip`` prefix are left to the caller (e.g. ``merger.``,
    which lives outside our ViT)."""
    assigned = 0
    for name, p in module.named_parameters():
        if name.startswith(skip):
            continue
        *path, leaf = name.split(".")
        target = ours
        for part in path:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        value = _torch_np(p)
        if leaf == "weight" and hasattr(target, "kernel"):
            _assign(target.kernel, value.reshape(value.shape[0], -1).T)
        else:
            _assign(getattr(target, leaf), value)
        assigned += 1
    total = len(jax.tree.leaves(nnx.state(ours, nnx.Param)))
    if assigned != total:
        raise ValueError(f"loaded {assigned} torch parameters into a module with {total}")


def randomize_nnx_(module: nnx.Module, seed: int) -> nnx.Module:
    """Every NNX parameter random, like ``hf_oracle.randomize_``: norm/ln weights around 1, the rest small."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            name = "/".join(map(str, path))
            noise = rng.standard_normal(var[...].shape).astype(np.float32)
            is_scale = ("norm" in name or "ln_q" in name) and "bias" not in name
            var[...] = jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.05 * noise)
    return module


# ---- independent numpy reference ---------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[np.float64])


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_merger(x: np.ndarray, ln_q: np.ndarray, w0: np.ndarray, b0: np.ndarray, w2: np.ndarray, b2: np.ndarray,
              eps: float = 1e-6) -> np.ndarray:
    """Qwen2.5-VL patch merger in float64: RMSNorm -> groups of 4 consecutive patches -> Linear -> exact GELU
    -> Linear. Kernels are [in, out]."""
    x = np.asarray(x, np.float64)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * ln_q
    merged = normed.reshape(-1, w0.shape[0])
    return np_gelu(merged @ w0 + b0) @ w2 + b2


def np_expert(experts, e: int, x: np.ndarray) -> np.ndarray:
    """``np_merger`` with the parameters of expert ``e`` of our stacked ``ExpertMergers``."""
    get = lambda v: np.asarray(v[...][e], np.float64)  # noqa: E731
    return np_merger(x, get(experts.ln_q_weight), get(experts.mlp_0_kernel), get(experts.mlp_0_bias),
                     get(experts.mlp_2_kernel), get(experts.mlp_2_bias))
