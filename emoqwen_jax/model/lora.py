"""LoRA adapters swapped into a built model at run time (the base modules' code stays untouched).

``apply_lora(model, cfg)`` replaces every ``Linear`` whose module path (``'/'``-joined, e.g.
``language_model/layers/3/self_attn/q_proj``) matches one of ``cfg.targets`` by a ``LoRALinear`` that keeps
the base ``kernel`` / ``bias`` Params (same objects, same paths, same ``logical_axes``, hence the same
sharding, export names and freezing regexes) and adds two Params:

    lora_a float[I, R]  logical axes (kernel's in-axis, 'lora_rank')   init U(-1/sqrt(I), 1/sqrt(I)) (PEFT's)
    lora_b float[R, O]  logical axes ('lora_rank', kernel's out-axis)  init 0, so the adapted model starts
                                                                       exactly at the base model
    y = x @ kernel + bias + (alpha / R) * (dropout(x) @ lora_a) @ lora_b

(I in features, O out features, R rank; 'lora_rank' has no mesh rule, so the rank axis is replicated.)
``merge_lora`` folds the adapters back into plain ``Linear`` kernels. Dropout is active only inside
``with dropout_key(key):`` (the train step); generation and evaluation run deterministically. A context
variable rather than module state carries the key, so the parameter tree and graph stay pure Params.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model.layers import Linear, matmul

Array = jax.Array

# The LLM's attention projections, as the released LoRA recipe (docs/design.md, The released fine-tuning recipe
# and its LoRA).
DEFAULT_TARGETS = (r"^language_model/layers/\d+/self_attn/(q_proj|k_proj|v_proj|o_proj)$",)
# Optimiser-view paths of the adapter leaves (what a LoRA stage adds to its trainable regexes).
ADAPTER_PATTERN = r"/lora_[ab]$"
RANK_AXIS = "lora_rank"

_DROPOUT_KEY: contextvars.ContextVar[Array | None] = contextvars.ContextVar("emoqwen_lora_dropout", default=None)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyper-parameters; ``targets`` are regexes ``re.search``ed against '/'-joined module paths."""

    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty; give module-path regexes, e.g. " + DEFAULT_TARGETS[0])
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as err:
                raise ValueError(f"lora.targets: {t!r} is not a valid regex ({err})") from None

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        """From ``config.stages.<name>.lora`` or a model directory's meta (``enabled`` is ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"enabled", "modules"}
        if unknown:
            raise ValueError(f"unknown lora field(s) {sorted(unknown)}; valid: {sorted(known | {'enabled'})}")
        kw = {k: d[k] for k in known if k in d}
        if "targets" in kw:
            kw["targets"] = (kw["targets"],) if isinstance(kw["targets"], str) else tuple(kw["targets"])
        if "rank" in kw:
            kw["rank"] = int(kw["rank"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout),
                "targets": list(self.targets)}


@contextlib.contextmanager
def dropout_key(key: Array | None):
    """Enables adapter dropout with ``key`` (a typed PRNG key) for the calls inside the block."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class LoRALinear(Linear):
    """A ``Linear`` plus a low-rank update; built from an existing ``Linear`` whose Params it keeps."""

    def __init__(self, base: Linear, cfg: LoRAConfig, *, index: int, rngs: nnx.Rngs | None):
        kernel = base.kernel
        in_features, out_features = kernel.shape
        axes = kernel.get_metadata().get("logical_axes") or (None, None)
        dtype = kernel.dtype  # the base's storage dtype
        self.kernel, self.bias, self.dtype = kernel, base.bias, base.dtype
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on [R, I], as PEFT initialises lora_A
        key = rngs.params() if rngs is not None else jax.random.key(0)
        self.lora_a = nnx.Param(jax.random.uniform(key, (in_features, cfg.rank), dtype, -bound, bound),
                                logical_axes=(axes[0], RANK_AXIS))
        self.lora_b = nnx.Param(jnp.zeros((cfg.rank, out_features), dtype), logical_axes=(RANK_AXIS, axes[1]))
        self.scale = cfg.scale
        self.dropout = float(cfg.dropout)
        self.index = index  # folded into the dropout key: every adapter draws its own mask

    def delta(self) -> Array:
        """The merged update float32[I, O] = scale * lora_a @ lora_b."""
        a = self.lora_a[...].astype(jnp.float32)
        return self.scale * jnp.dot(a, self.lora_b[...].astype(jnp.float32), precision="highest")

    def __call__(self, x: Array) -> Array:
        """x float[..., I] -> float[..., O]; the base term is ``Linear``'s, bit for bit."""
        y = super().__call__(x)
        h = x.astype(self.dtype)
        key = _DROPOUT_KEY.get()
        if key is not None and self.dropout > 0.0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), jnp.zeros((), h.dtype))
        low = matmul(h, self.lora_a[...].astype(self.dtype))  # [..., R]
        return y + self.scale * matmul(low, self.lora_b[...].astype(self.dtype))


def module_path(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def _linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, Linear)]


def _set_child(model: nnx.Module, path: tuple, child: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def lora_modules(model: nnx.Module) -> list[str]:
    """'/'-joined paths of the model's adapted modules, in graph order."""
    return [module_path(p) for p, n in _linears(model) if isinstance(n, LoRALinear)]


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Swaps adapters into ``model`` in place; returns the adapted module paths.

    ValueError when a target regex matches no ``Linear`` (a typo would silently train nothing) or the model
    already has adapters. ``rngs=None`` initialises ``lora_a`` from key 0 (for shape-only construction).
    """
    found = _linears(model)
    if any(isinstance(n, LoRALinear) for _, n in found):
        raise ValueError(f"the model already has LoRA adapters ({lora_modules(model)[:3]} …); merge them first")
    paths = [module_path(p) for p, _ in found]
    compiled = [re.compile(t) for t in cfg.targets]
    unmatched = [t for t, c in zip(cfg.targets, compiled, strict=True) if not any(c.search(p) for p in paths)]
    if unmatched:
        raise ValueError(f"lora.targets {unmatched} match no Linear module; module paths look like "
                         f"{paths[-3:]} (regexes are re.search'ed against '/'-joined module paths)")
    chosen = [(p, n) for (p, n), s in zip(found, paths, strict=True) if any(c.search(s) for c in compiled)]
    for index, (path, base) in enumerate(chosen):
        _set_child(model, path, LoRALinear(base, cfg, index=index, rngs=rngs))
    return [module_path(p) for p, _ in chosen]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (kernel + scale·A·B in float32, cast to the kernel's dtype) and
    puts a plain ``Linear`` back, in place; returns ``model``. A model without adapters is returned as is."""
    for path, lora in [(p, n) for p, n in _linears(model) if isinstance(n, LoRALinear)]:
        kernel = lora.kernel
        merged = (kernel[...].astype(jnp.float32) + lora.delta()).astype(kernel.dtype)
        in_f, out_f = kernel.shape
        axes = kernel.get_metadata().get("logical_axes")
        plain = nnx.eval_shape(lambda in_f=in_f, out_f=out_f, axes=axes, lora=lora: Linear(
            in_f, out_f, use_bias=lora.bias is not None, axes=axes, rngs=nnx.Rngs(0), dtype=lora.dtype))
        plain.kernel = nnx.Param(merged, logical_axes=axes)
        plain.bias = lora.bias
        _set_child(model, path, plain)
    return model


def lora_meta(model: nnx.Module, cfg: LoRAConfig | None = None) -> dict[str, Any] | None:
    """What a model directory records to rebuild the adapters (None without adapters): the adapter
    hyper-parameters plus the exact adapted module paths."""
    found = [n for _, n in _linears(model) if isinstance(n, LoRALinear)]
    if not found:
        return None
    first = found[0]
    rank = first.lora_a.shape[1]
    modules = lora_modules(model)
    meta = (cfg.to_dict() if cfg is not None else
            {"rank": rank, "alpha": first.scale * rank, "dropout": first.dropout,
             "targets": ["^" + re.escape(m) + "$" for m in modules]})
    meta["modules"] = modules
    return meta


def restore_lora(model: nnx.Module, meta: Mapping[str, Any] | None) -> nnx.Module:
    """Re-creates the adapters a model directory's ``meta['lora']`` describes (shape only; values are then
    restored from the checkpoint). Returns ``model``."""
    if not meta:
        return model
    exact = tuple("^" + re.escape(m) + "$" for m in meta["modules"])
    apply_lora(model, LoRAConfig.from_dict({**meta, "targets": exact}))
    return model
