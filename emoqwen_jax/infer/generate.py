"""Autoregressive generation: one jitted prefill over the (multimodal) prompt into a static-size KV cache,
then one jitted decode loop (``lax.while_loop``) that feeds each new token back through the decoder.

Shape legend (as in ``emoqwen_jax.model``): B batch · L prompt length (padded) · N max new tokens ·
S = L + N cache slots · V vocab · K kv heads · H head dim.

Padding and positions (the design choice this module rests on):
  * Batched prompts are LEFT-padded (``left_pad``): every row's last prompt token sits at column L − 1, so
    the prefill's last logits are the next-token logits of every row and decode step i writes cache slot
    L + i for all rows at once. Padding slots are masked out as keys for every real query (segment ids: 1
    real, 0 padding); a padding query sees only padding slots and gets a finite, ignored output.
  * Prompt positions come from ``layout.get_rope_index`` (the released M-RoPE rule), which numbers only the
    tokens whose attention mask is 1, so left padding does not shift them. It returns
    ``rope_deltas = max_position + 1 − L`` per row; the token decoded at step i sits at column L + i and
    gets position ``L + i + rope_delta`` = max_position + 1 + i on all three M-RoPE axes, exactly as
    Hugging Face's ``cache_position + rope_deltas``. Rows of different lengths or with different vision
    content therefore each continue from their own maximum.
  * A row stops at the first of ``stop_ids`` (Qwen: ``<|im_end|>``, ``<|endoftext|>``); afterwards it
    emits ``pad_id`` (like HF) and the loop exits early once every row has stopped.

Compilation: the prefill compiles once per prompt shape (L, patches, items: bucket them with
``pad_patches_to``/``pad_items_to`` and a fixed L for many prompts); the decode loop depends only on
(B, S, N) and the sampling mode, so prompts with different vision content share it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.model import EmotionQwen

Array = jax.Array
KVCache = list[tuple[Array, Array]]


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """ValueError naming the first sampling setting out of range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    ``temperature`` 0 means greedy (argmax); otherwise logits are divided by it and, when ``top_k`` > 0, cut
    to the k best, then to the smallest set whose probability reaches ``top_p`` (nucleus), then sampled.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # int32[B, N]: generated ids; after a stop id, pad_id
    num_tokens: np.ndarray  # int32[B]: tokens up to and including the stop id (N when none came)
    stopped: np.ndarray  # bool[B]: whether the row emitted a stop id

    def row(self, b: int, keep_stop: bool = False) -> list[int]:
        """Row ``b``'s generated ids, without the final stop id unless ``keep_stop``."""
        n = int(self.num_tokens[b]) - (0 if keep_stop or not self.stopped[b] else 1)
        return [int(t) for t in self.tokens[b, :n]]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (input_ids int32[B, L], attention_mask int32[B, L]), each row right-aligned.

    ``length`` (default: the longest row) lets many batches share one compiled prefill.
    """
    longest = max(len(r) for r in rows)
    length = longest if length is None else int(length)
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest prompt ({longest} tokens)")
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
    return ids, mask


def check_left_padded(attention_mask: np.ndarray) -> None:
    """ValueError unless every row is 0…0 1…1 with at least one real token."""
    mask = np.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be int[B, L], got shape {mask.shape}")
    bad = [b for b in range(mask.shape[0]) if not mask[b, -1] or np.any(np.diff(mask[b]) < 0)]
    if bad:
        raise ValueError(f"rows {bad} are not left-padded (mask must be 0…0 1…1 and end with a real token); "
                         f"build prompts with emoqwen_jax.infer.left_pad")


def init_cache(model: EmotionQwen, batch: int, length: int) -> KVCache:
    """Zeroed static cache: one (k, v) pair per decoder layer, each float[B, K, S, H] in the compute dtype."""
    cfg = model.config.text
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    dtype = model.language_model.dtype
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


@nnx.jit(static_argnames=("cache_len",))
def prefill(model: EmotionQwen, inputs: ModelInputs, cache_len: int) -> tuple[Array, KVCache, Array]:
    """Runs the prompt through the model, filling cache slots [0, L).

    Args:
      inputs: ``layout.build_model_inputs``'s ModelInputs for left-padded prompts (text.input_ids int[B, L], …).
      cache_len: S ≥ L, the static cache size.
    Returns:
      next-token logits float32[B, V] (last column), the cache, and key_valid bool[B, S] (real prompt slots).
    """
    text = inputs.text
    embeds = model.embed(inputs)[0]  # (embeddings, gate weights, …): only the embeddings matter here
    b, length = text.input_ids.shape
    key_valid = jnp.zeros((b, cache_len), bool).at[:, :length].set(text.attention_mask > 0)
    lm = model.language_model
    # Segment ids: 1 real, 0 padding; causality (slot <= query position) hides the slots not yet written.
    hidden, cache = lm(embeds, text.position_ids, text.attention_mask, init_cache(model, b, cache_len),
                       jnp.int32(0), key_valid.astype(jnp.int32))
    return lm.logits(hidden[:, -1:])[:, 0], cache, key_valid


def sample_logits(logits: Array, key: Array, temperature: Array, top_p: Array, top_k: int) -> Array:
    """float32[B, V] -> int32[B]: temperature, optional top-k, nucleus (top-p) filtering, then a draw."""
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass strictly before it is below top_p: the best token always survives.
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jax.random.categorical(key, jnp.where(keep, logits, neg), axis=-1).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "greedy", "top_k"))
def decode(model: EmotionQwen, logits: Array, cache: KVCache, key_valid: Array, next_position: Array, rng: Array,
           temperature: Array, top_p: Array, stop_ids: Array, pad_id: Array, *, max_new_tokens: int, greedy: bool,
           top_k: int) -> tuple[Array, Array, Array]:
    """The decode loop after ``prefill``.

    Args:
      logits: float32[B, V] next-token logits from the prefill; cache: S = L + N slots, [0, L) filled.
      key_valid: bool[B, S]; next_position: int32[B], the position of the first new token (max + 1).
      rng: a PRNG key (unused when greedy); stop_ids: int32[M].
    Returns:
      tokens int32[B, N], num_tokens int32[B], stopped bool[B].
    """
    b, cache_len = key_valid.shape
    start = cache_len - max_new_tokens  # = L: new token i goes to slot L + i
    lm = model.language_model

    def choose(logits, i):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_p, top_k)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, num, logits, cache, key_valid = state
        token = jnp.where(done, pad_id, choose(logits, i))
        tokens = tokens.at[:, i].set(token)
        num = jnp.where(done, num, i + 1)
        done = done | jnp.isin(token, stop_ids)
        # Feed the token back: position max + 1 + i on all three M-RoPE axes, cache slot L + i.
        position = jnp.broadcast_to((next_position + i)[None, :, None], (3, b, 1))
        key_valid = key_valid.at[:, start + i].set(True)
        hidden, cache = lm(lm.embed(token[:, None]), position, jnp.ones((b, 1), jnp.int32), cache, start + i,
                           key_valid.astype(jnp.int32))
        return i + 1, tokens, done, num, lm.logits(hidden)[:, 0], cache, key_valid

    state = (jnp.int32(0), jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), bool),
             jnp.zeros((b,), jnp.int32), logits, cache, key_valid)
    _, tokens, done, num, *_ = jax.lax.while_loop(cond, body, state)
    return tokens, num, done


def generate(model: EmotionQwen, input_ids, attention_mask=None, *, sampling: SamplingConfig,
             rng: Array | int | None = None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
             video_grid_thw=None, second_per_grid_ts=None, pad_patches_to: int | None = None,
             pad_items_to: int | None = None, input_features=None, feature_attention_mask=None,
             audio_lengths=None) -> GenerationOutput:
    """Generates up to ``sampling.max_new_tokens`` tokens for left-padded prompts (Hugging Face names).

    Args:
      input_ids: int[B, L] left-padded prompts (see ``left_pad``); attention_mask: int[B, L] (default all 1).
      pixel_values / pixel_values_videos: float32[P, 1176] patch rows of all images / videos of the batch, in
        row order (images first in the visual order, as in ``EmotionQwen.__call__``), with their grids.
      rng: a PRNG key or an int seed for sampling (ignored when greedy).
      pad_patches_to, pad_items_to: bucket the vision shapes so many prompts share one compiled prefill.
      input_features, feature_attention_mask, audio_lengths: the prompts' audio (encoder windows float[W, M, F]
        in row order, their mask, (windows, tokens) per audio) for a model with an audio encoder.
    """
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    check_left_padded(mask)
    inputs = model.prepare_inputs(input_ids, mask, pixel_values, image_grid_thw, pixel_values_videos,
                                  video_grid_thw, second_per_grid_ts, input_features=input_features,
                                  feature_attention_mask=feature_attention_mask, audio_lengths=audio_lengths,
                                  pad_patches_to=pad_patches_to, pad_items_to=pad_items_to)
    length = input_ids.shape[1]
    next_position = (length + inputs.text.rope_deltas).astype(np.int32)
    inputs = inputs.replace(rope_deltas=None)  # host-side only: keeps the prefill's signature minimal
    logits, cache, key_valid = prefill(model, inputs, cache_len=length + sampling.max_new_tokens)
    key = rng if isinstance(rng, jax.Array) else jax.random.key(0 if rng is None else int(rng))
    tokens, num, stopped = decode(
        model, logits, cache, key_valid, jnp.asarray(next_position), key,
        jnp.float32(sampling.temperature or 1.0), jnp.float32(sampling.top_p),
        jnp.asarray(sampling.stop_ids or (-1,), jnp.int32), jnp.int32(sampling.pad_id),
        max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy, top_k=sampling.top_k)
    return GenerationOutput(tokens=_host(tokens), num_tokens=_host(num), stopped=_host(stopped))


def _host(x: Array) -> np.ndarray:
    """A result as numpy on every process, also when it is split over other hosts' devices (parameters sharded
    across processes: each host holds only its rows)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_vision(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray | None]:
    """Concatenates per-prompt vision (and audio) arrays (``emoqwen_jax.data`` sample names) in row order.

    Rows are in batch order, so each kind's visual tokens fill its pad tokens row-major, as the layout
    expects. Kinds no sample has become None.
    """
    out: dict[str, np.ndarray | None] = {}
    for key, width in (("pixel_values", 2), ("image_grid_thw", 2), ("pixel_values_videos", 2),
                       ("video_grid_thw", 2), ("second_per_grid_ts", 1), ("input_features", 3),
                       ("feature_attention_mask", 2), ("audio_lengths", 2)):
        parts = [np.asarray(s[key]) for s in samples if s.get(key) is not None and len(s[key])]
        out[key] = np.concatenate(parts) if parts else None
        if out[key] is not None and out[key].ndim != width:
            raise ValueError(f"{key} must have {width} dims, got shape {out[key].shape}")
    return out
