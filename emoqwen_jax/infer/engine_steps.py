"""The serving engine's device side: the batched prefill that writes prompts into free slots of one static KV
cache, the decode step that advances every slot by one token, and per-row sampling.

Shape legend: B slots (``max_batch``) · S cache length (``max_len``) · P prompts in one prefill · L their
padded length · V vocab · M ids masked while a row is below its ``min_tokens``.

Cache layout: slot b holds one request; its prompt sits RIGHT-padded at columns [0, n) (n real tokens, so a
slot never wastes columns on padding), and its i-th generated token is written at column n + i. A row sees
the columns [0, its current index] (the mask is built from that index; nothing is stored per column), so a
reused slot needs no clearing. Positions continue from the prompt's M-RoPE maximum + 1, as in ``generate``.

Sampling (every row its own parameters): temperature 0 is greedy (argmax); otherwise the logits are divided
by the temperature, cut to the ``top_k`` best (0 = off) and to the nucleus ``top_p``, and drawn with the key
``fold_in(key(seed), i)`` for the row's i-th generated token: a request's draws depend only on its seed and
its own token index, never on the other rows (the same draws ``generate`` makes for that prompt alone with
``rng=seed``).

Several steps per call (``decode_step(steps=K)``): the step's own output feeds it again inside one compiled
loop, so the host's share of a step (dispatch, reading tokens back) is paid once per K tokens. A row that ends
inside the K steps (EOS, a stop, ``max_tokens``) is computed to the end of the call; the host drops those tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from emoqwen_jax.infer.generate import sample_logits

Array = jax.Array
STOP_SLOTS = 16  # M: ids a row can mask before its min_tokens (EOS ids + the request's stop ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Per-row sampling state, every field an array over the rows (float32/int32/uint32/bool[R])."""

    temperature: Array  # 0 = greedy
    top_p: Array
    top_k: Array  # 0 = off
    seed: Array  # uint32: the request's seed
    index: Array  # which generated token (0, 1, ...) is drawn now: the PRNG stream position
    ban: Array  # int32: for how many more draws ban_ids are masked (the row's tokens short of min_tokens)
    ban_ids: Array  # int32[R, M]; V (out of range) = unused

    @classmethod
    def host(cls, rows: int, vocab: int) -> "RowSampling":
        """Neutral numpy rows (greedy, nothing masked) to fill in on the host."""
        return cls(np.zeros(rows, np.float32), np.ones(rows, np.float32), np.zeros(rows, np.int32),
                   np.zeros(rows, np.uint32), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                   np.full((rows, STOP_SLOTS), vocab, np.int32))


def _draw_row(logits: Array, key: Array, temperature: Array, top_p: Array, top_k: Array) -> Array:
    """float32[V] -> int32[]: ``sample_logits`` of one row with a traced ``top_k`` (the same set
    ``lax.top_k`` would keep: every logit >= the k-th largest)."""
    scaled = logits / temperature
    kth = jnp.sort(scaled)[::-1][jnp.maximum(top_k - 1, 0)]
    scaled = jnp.where((top_k > 0) & (scaled < kth), jnp.finfo(jnp.float32).min, scaled)
    return sample_logits(scaled[None], key, jnp.float32(1.0), top_p, 0)[0]


def choose(logits: Array, rows: RowSampling, any_sampled: bool) -> tuple[Array, Array]:
    """float32[R, V] next-token logits -> (tokens int32[R], log p(token) float32[R] under the temperature-scaled
    logits, 1 for greedy rows). ``any_sampled`` False compiles the greedy-only step (no sort over V)."""
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    banned = jnp.where(rows.ban[:, None] > 0, rows.ban_ids, vocab)
    logits = logits.at[jnp.arange(logits.shape[0])[:, None], banned].set(jnp.finfo(jnp.float32).min, mode="drop")
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy = rows.temperature <= 0
    temperature = jnp.where(greedy, 1.0, rows.temperature)
    if any_sampled:
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(rows.seed, rows.index)
        drawn = jax.vmap(_draw_row)(logits, keys, temperature, rows.top_p, rows.top_k)
        tokens = jnp.where(greedy, tokens, drawn)
    logp = jax.nn.log_softmax(logits / temperature[:, None], axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def cache_spec(model: Any, max_batch: int, max_len: int) -> list[tuple[jax.ShapeDtypeStruct, ...]]:
    """One (k, v) pair of float[B, K, S, H] per decoder layer (``model.text``'s cache layout), in the compute
    dtype."""
    cfg = model.config.text
    shape = jax.ShapeDtypeStruct((max_batch, cfg.num_kv_heads, max_len, cfg.head_dim), model.language_model.dtype)
    return [(shape, shape) for _ in range(cfg.num_layers)]


def cache_partition(batch_axes, heads_axis) -> PartitionSpec:
    """The cache's PartitionSpec: slots over ``batch_axes``, KV heads over ``heads_axis`` (either None)."""
    return PartitionSpec(batch_axes, heads_axis, None, None)


def kv_heads(spec: list[tuple[jax.ShapeDtypeStruct, ...]]) -> int:
    """The KV head count of a ``cache_spec``."""
    return spec[0][0].shape[1]


def cache_sharding(mesh, spec: list[tuple[jax.ShapeDtypeStruct, ...]], slots: int):
    """Where the engine's KV cache (``cache_spec``) lies on ``mesh``: a NamedSharding with the ``slots`` over the
    batch axes when they divide them, and the KV heads over ``tensor`` when it divides them (else replicated)."""
    from jax.sharding import NamedSharding  # noqa: PLC0415

    from emoqwen_jax.parallel.rules import batch_devices, batch_sharding  # noqa: PLC0415

    split = batch_devices(mesh) if all(a in mesh.shape for a in ("data", "fsdp", "expert")) else 1
    batch = batch_sharding(mesh, 4).spec[0] if slots % split == 0 else None
    heads = "tensor" if "tensor" in mesh.shape and kv_heads(spec) % mesh.shape["tensor"] == 0 else None
    return NamedSharding(mesh, cache_partition(batch, heads))


def prefill_into(graphdef, state, cache, inputs, lengths: Array, slots: Array, rows: RowSampling,
                 any_sampled: bool, vision_blocks: tuple[int, int] = (0, 0), carried: Array | None = None):
    """Runs P right-padded prompts and writes their cache columns [0, L) into ``slots`` int32[P] (a slot index
    >= B drops the row: batch padding). ``vision_blocks`` (static): the ViT's ``layout.local_blocks``.
    ``carried`` int32[B] (optional): ``decode_step``'s carried tokens; the first tokens are written into it at
    ``slots``, so the next decode call takes them on the device before the host has read them.

    Returns (first tokens int32[P], their log-probs float32[P], last-prompt-token logits float32[P, V], the
    cache, gate weights float32[G, E] of the batch's visual items, ``carried`` updated (None without it))."""
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    text = inputs.text
    embeds, gate_weights, _ = model.embed(inputs, vision_blocks)
    p, length = text.input_ids.shape
    cfg = model.config.text
    empty = [(jnp.zeros((p, cfg.num_kv_heads, length, cfg.head_dim), lm.dtype),) * 2 for _ in cache]
    # Segment ids = the mask (1 real, 0 padding): right padding attends only to itself.
    hidden, rows_cache = lm(embeds, text.position_ids, text.attention_mask, empty, jnp.int32(0),
                            text.attention_mask)
    last = hidden[jnp.arange(p), lengths - 1]
    logits = lm.logits(last[:, None])[:, 0]
    tokens, logp = choose(logits, rows, any_sampled)
    cache = [(k.at[slots, :, :length].set(nk, mode="drop"), v.at[slots, :, :length].set(nv, mode="drop"))
             for (k, v), (nk, nv) in zip(cache, rows_cache, strict=True)]
    if carried is not None:
        carried = carried.at[slots].set(tokens, mode="drop")
    return tokens, logp, logits, cache, gate_weights, carried


def decode_step(graphdef, state, cache, tokens: Array, index: Array, position: Array, rows: RowSampling,
                any_sampled: bool, carried: Array | None = None, use_carried: Array | None = None,
                visible: int | None = None, steps: int = 1):
    """Feeds ``tokens`` int32[B] (each slot's last token) at cache column ``index`` int32[B] with M-RoPE position
    ``position`` int32[B] (all three axes) and draws the next token of every slot; ``steps`` (static) times in a
    row, each drawn token fed back at the next column and position. Rows where ``use_carried`` bool[B] is set
    take their first input from ``carried`` int32[B] instead: the previous call's last tokens, still on the
    device, so the host can queue this call before it has read the last one. ``visible`` (static; default S):
    attention reads only the cache's first ``visible`` columns, which must hold every row's ``index + steps - 1``
    that is kept (later columns are computed and dropped).

    Returns (tokens int32[B, steps], log-probs float32[B, steps], the last tokens int32[B], the cache)."""
    if carried is not None:
        tokens = jnp.where(use_carried, carried, tokens)
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    b, s = cache[0][0].shape[0], cache[0][0].shape[2]
    columns = jnp.arange(visible or s)[None, :]
    real = jnp.ones((b, 1), jnp.int32)

    def advance(carry, _):
        cache, tokens, index, position, rows = carry
        seen = (columns <= index[:, None]).astype(jnp.int32)  # int[B, S']: 1 = visible
        positions = jnp.broadcast_to(position[None, :, None], (3, b, 1))
        hidden, cache = lm(lm.embed(tokens[:, None]), positions, real, cache, index, seen)
        drawn, logp = choose(lm.logits(hidden)[:, 0], rows, any_sampled)
        rows = dataclasses.replace(rows, index=rows.index + 1, ban=jnp.maximum(rows.ban - 1, 0))
        return (cache, drawn, index + 1, position + 1, rows), (drawn, logp)

    carry = (cache, tokens, index, position, rows)
    if steps == 1:  # straight-line code: no loop around a single step
        (cache, last, *_), (drawn, logp) = advance(carry, None)
        return drawn[:, None], logp[:, None], last, cache
    (cache, last, *_), (drawn, logp) = jax.lax.scan(advance, carry, length=steps)
    return drawn.T, logp.T, last, cache
