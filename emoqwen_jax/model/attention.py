"""One attention function for the ViT and the decoder, with segment ids, causality and a choice of kernels.

Semantics (every implementation): query i of row b sees key j iff
  ``q_segment_ids[b, i] == kv_segment_ids[b, j]``  and, when ``causal``, ``j <= i + q_offset``.
Segment ids say which tokens belong together: a frame or a window of the ViT, a sample of a packed decoder row,
the padding (give it its own id: it then attends only to itself and never touches real tokens). A query row
that sees no key (possible only when the caller builds such ids) gets a zero output, never NaN.

Implementations (``config.model.attention``):
  xla        dense masked softmax over [T, S] logits (the reference). The decoder's GQA queries are laid out
             [B, K, G·T, H] so the scores need no relayout, and with ``causal`` (T == S) the queries run in
             static blocks that skip the keys they cannot see. With ``band`` (segments of at most ``band``
             tokens, the ViT's windows) each block of ``band`` queries meets only 3 blocks of keys.
  blockwise  flash-style pure JAX: queries in blocks (``lax.scan``), keys in blocks with an online softmax;
             a key block no query of the block can see (by segment range, causality or the ``band``) is
             skipped. Memory O(T · block); a custom VJP recomputes the probabilities in the backward pass.
  splash     TPU Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) with
             ``SegmentIds``; TPU only.
  cudnn      ``jax.nn.dot_product_attention(implementation="cudnn")``; GPU only (segment ids become a mask).
  auto       for causal attention (the decoder) splash on TPU and cudnn on GPU (bf16/fp16); otherwise
             blockwise from ``AUTO_BLOCKWISE_MIN`` keys and xla below — except the ViT's window layers (a
             ``band``) when the flat patch axis is split over devices (``sharding.shard_count('units')``):
             they take xla's banded blocks, which GSPMD shards with halo exchanges (collective permutes),
             where blockwise's scan over query blocks makes it all-gather q, k, v and repeat every block on
             every device. One log line per distinct choice says what was chosen and why.

Shapes: q float[B, T, N, H]; k, v float[B, S, K, H] with N a multiple of K (G = N / K query heads per KV head),
or float[B, K, S, H] with ``kv_heads_first`` (the decoder's KV cache layout: the xla and blockwise paths then
read it as it lies, where [B, S, K, H] would be relaid out, cache and all, on every call); segment ids
int[B, T] / int[B, S]. Logits and softmax in float32; the output has q's dtype.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from emoqwen_jax.model import sharding

Array = jax.Array
log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
AUTO_BLOCKWISE_MIN = 2048  # keys; below it dense logits are small and XLA's fused dense path is faster on CPU
DEFAULT_BLOCK = 512
SPLASH_BLOCK = 128  # splash's default tile (BlockSizes.get_default): sequence lengths are padded to it
# xla path: causal query blocks (skips ~half the logits of a row; docs/design.md, Causal query blocks in the
# `xla` attention path)
CAUSAL_QUERY_BLOCK = 128
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked logit: finite, so exp(_NEG - m) is 0, never NaN
_QPAD = int(jnp.iinfo(jnp.int32).min)  # ids of alignment padding: queries and keys differ, so they never meet
_KPAD = _QPAD + 1
_logged: set = set()


def validate_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}; choose one of {IMPLEMENTATIONS}")
    return name


def _log_choice(choice: str, why: str) -> None:
    if (choice, why) not in _logged:
        _logged.add((choice, why))
        log.info("attention='auto' chose %r: %s", choice, why)


def resolve(implementation: str, kv_length: int, *, dtype=jnp.float32, cache: bool = False,
            causal: bool = True) -> str:
    """The concrete kernel for ``implementation`` on this backend ('auto' decides; others are checked).

    'auto' gives the accelerator kernels the decoder's causal attention only: the ViT's flat patch sequence
    (frames and windows of many samples, segment-masked) would make them compute all P² pairs (cudnn even
    needs a [P, P] mask), while blockwise skips every key block outside a frame."""
    validate_implementation(implementation)
    backend = jax.default_backend()
    if implementation == "auto":
        if backend == "tpu" and causal and not cache:
            choice, why = "splash", "TPU backend, causal"
        elif (backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and causal
              and not cache):
            choice, why = "cudnn", f"GPU backend, causal, {jnp.dtype(dtype).name}"
        elif kv_length >= AUTO_BLOCKWISE_MIN:
            choice, why = "blockwise", f"{kv_length} keys >= {AUTO_BLOCKWISE_MIN} on {backend}"
        else:
            choice, why = "xla", f"{kv_length} keys < {AUTO_BLOCKWISE_MIN} on {backend}"
        _log_choice(choice, why)
        return choice
    if implementation == "splash" and backend != "tpu":
        raise ValueError(f"model.attention='splash' needs a TPU, but the backend is {backend!r}; "
                         f"use 'auto', 'blockwise' or 'xla'")
    if implementation == "cudnn" and backend not in ("gpu", "cuda"):
        raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU, but the backend is {backend!r}; "
                         f"use 'auto', 'blockwise' or 'xla'")
    return implementation


def attention(q: Array, k: Array, v: Array, *, scale: float, q_segment_ids: Array | None = None,
              kv_segment_ids: Array | None = None, causal: bool = False, q_offset: Array | int = 0,
              implementation: str = "xla", block_size: int = DEFAULT_BLOCK, band: int | None = None,
              kv_heads_first: bool = False, local_block: int = 0) -> Array:
    """Softmax attention of q float[B, T, N, H] over k, v float[B, S, K, H] -> float[B, T, N, H].

    Args:
      q_segment_ids, kv_segment_ids: int[B, T], int[B, S]; None = one segment. Either both or neither.
      causal: key j is hidden from query i when j > i + ``q_offset`` (``q_offset``: where the queries start
        in the key sequence, e.g. a KV-cache index; int or int32 scalar).
      implementation: one of ``IMPLEMENTATIONS``.
      block_size: blockwise: queries and keys per block (rounded down to the sequence when shorter).
      band: blockwise: a hint that every segment is at most ``band`` tokens long and contiguous, so a query
        block only needs the key blocks within ``band`` tokens of it (the ViT's windows). Exact either way
        for ids that obey it; None = no such promise.
      kv_heads_first: k, v are float[B, K, S, H] (see the module docstring).
      local_block: a promise for self-attention without causality or cache (the ViT's frames and windows):
        every segment lies whole within one block of ``local_block`` positions (``layout.local_blocks`` finds
        such a size on the host; T a multiple of it). Attention then runs dense within each block, with no
        logits across blocks and no loop, whatever ``implementation`` says (``_block_diagonal``). 0 = no
        promise.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    b, t, n, h = q.shape
    kt, vt = (k, v) if kv_heads_first else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [B, K, S, H]
    kh, s = kt.shape[1], kt.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of key/value heads {kh}")
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, t), jnp.int32)
        kv_segment_ids = jnp.zeros((b, s), jnp.int32)
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    cache = not (isinstance(q_offset, int) and q_offset == 0)
    if local_block:
        if causal or cache or t != s or t % local_block:
            raise ValueError(f"local_block={local_block} needs self-attention without causality or cache over a "
                             f"multiple of it (T={t}, S={s}, causal={causal})")
        return _block_diagonal(q, kt, vt, q_segment_ids, kv_segment_ids, block=local_block, scale=scale)
    banded = band is not None and not causal and t == s and not cache  # the ViT's window layers
    devices = sharding.shard_count("units", t) if implementation == "auto" and banded and b == 1 else 1
    if devices > 1:  # a patch axis split over devices (see the module docstring)
        impl = "xla"
        _log_choice(impl, f"window layers (band {band}) on a patch axis split over {devices} devices: banded "
                          f"blocks shard, blockwise's scan over query blocks would gather it")
    else:
        impl = resolve(implementation, s, dtype=q.dtype, cache=cache, causal=causal)
    if impl == "xla" and not banded:
        return _xla(q, kt, vt, q_segment_ids, kv_segment_ids, causal, q_offset, scale)
    if impl == "blockwise":
        return _blockwise_entry(q, kt, vt, q_segment_ids, kv_segment_ids, jnp.asarray(q_offset, jnp.int32),
                                scale=scale, causal=causal, block=block_size, band=band)
    if kv_heads_first:  # the other kernels take [B, S, K, H]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if impl == "xla":
        return _banded(q, k, v, q_segment_ids, kv_segment_ids, band, scale)
    if cache:
        raise ValueError(f"attention={impl!r} has no query offset (KV cache); use 'xla' or 'blockwise'")
    if impl == "splash":
        return _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, scale)
    return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, scale)


# ---- local blocks: block-diagonal self-attention ----------------------------------------------------------------
def _block_diagonal(q, kt, vt, qseg, kseg, *, block, scale):
    """Dense attention within each block of ``block`` positions under the segment mask: q float[B, T, N, H],
    kt/vt float[B, K, T, H] -> float[B, T, N, H]; equal to the whole when no segment crosses a block boundary."""
    b, t, n, h = q.shape
    kh, c = kt.shape[1], t // block
    per_block = lambda x: x.reshape(b, kh, c, block, h).transpose(0, 2, 1, 3, 4).reshape(b * c, kh, block, h)  # noqa: E731
    out = _xla(q.reshape(b * c, block, n, h), per_block(kt), per_block(vt), qseg.reshape(b * c, block),
               kseg.reshape(b * c, block), False, 0, scale)
    return out.reshape(b, t, n, h)


# ---- xla: dense ------------------------------------------------------------------------------------------------
def _grouped(q: Array, kh: int) -> Array:
    """q float[B, T, N, H] -> float[B, K, G, T, H] (KV head major, so scores need no relayout)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)


def _ungrouped(o: Array) -> Array:
    b, kh, g, t, h = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h)


def _allowed(qseg: Array, kseg: Array, qpos: Array, kpos: Array, causal: bool) -> Array:
    """bool[B, T, S] from int[B, T], int[B, S] segment ids and int[T], int[S] positions."""
    mask = qseg[:, :, None] == kseg[:, None, :]
    if causal:
        mask &= kpos[None, None, :] <= qpos[None, :, None]
    return mask


def _dense(qg: Array, kt: Array, vt: Array, mask: Array, scale: float) -> Array:
    """qg float[B, K, G, T, H], kt/vt float[B, K, S, H], mask bool[B, T, S] -> float[B, K, G, T, H]."""
    logits = jnp.einsum("bkgth,bksh->bkgts", qg, kt, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None]
    logits = jnp.where(m, logits, _NEG)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * m  # a row with no key: all zeros
    probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return jnp.einsum("bkgts,bksh->bkgth", probs.astype(vt.dtype), vt)


def _xla(q, kt, vt, qseg, kseg, causal, q_offset, scale):
    """q float[B, T, N, H], kt/vt float[B, K, S, H] -> float[B, T, N, H]."""
    b, t, n, h = q.shape
    kh, s = kt.shape[1], kt.shape[2]
    qg = _grouped(q, kh)
    qpos = jnp.arange(t, dtype=jnp.int32) + q_offset
    kpos = jnp.arange(s, dtype=jnp.int32)
    blocks = -(-t // CAUSAL_QUERY_BLOCK)
    if causal and isinstance(q_offset, int) and q_offset == 0 and t == s and 1 < blocks <= 64:
        outs = []  # query block c sees keys [0, end): the hidden upper triangle is never computed
        for c in range(blocks):
            lo, hi = c * CAUSAL_QUERY_BLOCK, min(t, (c + 1) * CAUSAL_QUERY_BLOCK)
            mask = _allowed(qseg[:, lo:hi], kseg[:, :hi], qpos[lo:hi], kpos[:hi], True)
            outs.append(_dense(qg[:, :, :, lo:hi], kt[:, :, :hi], vt[:, :, :hi], mask, scale))
        out = jnp.concatenate(outs, axis=3)
    else:
        out = _dense(qg, kt, vt, _allowed(qseg, kseg, qpos, kpos, causal), scale)
    return _ungrouped(out).astype(q.dtype)


def _banded(q, k, v, qseg, kseg, band, scale):
    """Segments of at most ``band`` contiguous tokens (self-attention): queries of block c (``band`` tokens)
    see the keys of blocks c-1, c and c+1 under the segment mask, which hold every key of their segments —
    dense attention at O(T · 3 · band) (the ViT's window layers; ``xla`` keeps this path)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    pad = -t % band
    if pad:  # the tail padding gets ids that match nothing (padding queries then see no key: zero output)
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
        q, k, v = widen(q), widen(k), widen(v)
        qseg = jnp.pad(qseg, ((0, 0), (0, pad)), constant_values=_QPAD)
        kseg = jnp.pad(kseg, ((0, 0), (0, pad)), constant_values=_KPAD)
    c = (t + pad) // band

    def neighbours(x, fill):  # [B, C, band, ...] -> [B, C, 3 * band, ...]: blocks c-1, c, c+1
        edge = [(0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2)
        padded = jnp.pad(x, edge, constant_values=fill)
        return jnp.concatenate([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], axis=2)

    qg = q.reshape(b, c, band, kh, n // kh, h)
    kb = neighbours(k.reshape(b, c, band, kh, h), 0)
    vb = neighbours(v.reshape(b, c, band, kh, h), 0)
    ks = neighbours(kseg.reshape(b, c, band), _KPAD)
    logits = jnp.einsum("bcqkgh,bcskh->bckgqs", qg, kb, preferred_element_type=jnp.float32) * scale
    mask = (qseg.reshape(b, c, band)[:, :, :, None] == ks[:, :, None, :])[:, :, None, None]
    logits = jnp.where(mask, logits, _NEG)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * mask
    probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    out = jnp.einsum("bckgqs,bcskh->bcqkgh", probs.astype(v.dtype), vb).reshape(b, c * band, n, h)
    return out[:, :t].astype(q.dtype)


# ---- blockwise: flash-style, custom VJP -------------------------------------------------------------------------
# The block products as 3-D batched matmuls over one flattened (B·K) batch axis with the G query heads folded into
# the rows: XLA:CPU runs a dot with two batch dims ([B, K]) on small blocks several times slower (a [4, 256, 64]
# score block: ~1.7 ms as an einsum over (b, k), ~0.4 ms flattened). The reshapes are free (contiguous).
def _bdot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    """float[Z, ·, ·] · float[Z, ·, ·] over ``contract`` = (a's dim, b's dim), batch dim 0 -> float32[Z, ·, ·]."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)


def _qk(qb: Array, kb: Array) -> Array:
    """qb float[B, K, G, Q, H], kb float[B, K, S, H] -> float32[B, K, G, Q, S]."""
    b, kh, g, q, h = qb.shape
    return _bdot(qb.reshape(b * kh, g * q, h), kb.reshape(b * kh, -1, h), (2, 2)).reshape(b, kh, g, q, -1)


def _pv(p: Array, vb: Array) -> Array:
    """p float[B, K, G, Q, S], vb float[B, K, S, H] -> float32[B, K, G, Q, H]."""
    b, kh, g, q, s = p.shape
    return _bdot(p.reshape(b * kh, g * q, s), vb.reshape(b * kh, s, -1), (2, 1)).reshape(b, kh, g, q, -1)


def _key_grad(ds: Array, x: Array) -> Array:
    """ds float[B, K, G, Q, S], x float[B, K, G, Q, H] -> float32[B, K, S, H] (summed over G and Q)."""
    b, kh, g, q, s = ds.shape
    return _bdot(ds.reshape(b * kh, g * q, s), x.reshape(b * kh, g * q, -1), (1, 1)).reshape(b, kh, s, -1)


def _blockwise_entry(q, kt, vt, qseg, kseg, q_offset, *, scale, causal, block, band):
    """q float[B, T, N, H], kt/vt float[B, K, S, H] -> float[B, T, N, H]."""
    b, t, n, h = q.shape
    kh, s = kt.shape[1], kt.shape[2]
    bq, bk = min(block, t), min(block, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    qg = _grouped(q, kh)  # [B, K, G, T, H]
    if tp > t:
        qg = jnp.pad(qg, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
        qseg = jnp.pad(qseg, ((0, 0), (0, tp - t)), constant_values=_QPAD)
    if sp > s:
        kt = jnp.pad(kt, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        vt = jnp.pad(vt, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        kseg = jnp.pad(kseg, ((0, 0), (0, sp - s)), constant_values=_KPAD)
    band_blocks = None if band is None else -(-band // bk) + (bq + bk - 1) // bk
    out = _flash(qg, kt, vt, qseg, kseg, q_offset, scale, causal, bq, bk, band_blocks)
    return _ungrouped(out[:, :, :, :t]).astype(q.dtype)


def _block_plan(qseg, kseg, q_offset, causal, bq, bk, band_blocks):
    """(visible bool[nq, nk], first key block int[nq], inner loop length): which key blocks each query block
    must visit. Conservative (segment id ranges over the whole batch), exact masks are applied inside."""
    nq, nk = qseg.shape[1] // bq, kseg.shape[1] // bk
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    qb = qseg.reshape(-1, nq, bq).transpose(1, 0, 2).reshape(nq, -1)
    kb = kseg.reshape(-1, nk, bk).transpose(1, 0, 2).reshape(nk, -1)
    qmin = jnp.min(jnp.where(qb == _QPAD, big, qb), axis=1)
    qmax = jnp.max(jnp.where(qb == _QPAD, small, qb), axis=1)
    kmin = jnp.min(jnp.where(kb == _KPAD, big, kb), axis=1)
    kmax = jnp.max(jnp.where(kb == _KPAD, small, kb), axis=1)
    visible = (qmin[:, None] <= kmax[None, :]) & (kmin[None, :] <= qmax[:, None])
    if causal:  # the block's first key must not lie after its last query
        visible &= (jnp.arange(nk) * bk)[None, :] <= (jnp.arange(nq) * bq + bq - 1)[:, None] + q_offset
    if band_blocks is None or 2 * band_blocks + 1 >= nk:
        return visible, jnp.zeros((nq,), jnp.int32), nk
    first = jnp.arange(nq) * bq // bk - band_blocks  # key blocks within `band` of the query block
    return visible, first.astype(jnp.int32), 2 * band_blocks + 1


def _scores(qb, kb, qs, ks, qpos, kpos, scale, causal):
    """Logits float32[B, K, G, bq, bk] with masked entries at _NEG, and the mask broadcast to them."""
    s = _qk(qb, kb) * scale
    mask = (qs[:, :, None] == ks[:, None, :])
    if causal:
        mask &= kpos[None, None, :] <= qpos[None, :, None]
    mask = mask[:, None, None]
    return jnp.where(mask, s, _NEG), mask


def _key_block(qb, kt, vt, qs, kseg, qpos, j, bk, scale, causal):
    """Key block j: (k float[B, K, bk, H], v, masked logits float32[B, K, G, bq, bk], mask)."""
    kb = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
    vb = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
    ks = jax.lax.dynamic_slice_in_dim(kseg, j * bk, bk, axis=1)
    kpos = j * bk + jnp.arange(bk, dtype=jnp.int32)
    return (kb, vb, *_scores(qb, kb, qs, ks, qpos, kpos, scale, causal))


def _visit_key_blocks(update, carry, first, visible, nk, inner):
    """Folds ``update(carry, j)`` over the key blocks j = first, ..., first + inner - 1 of one query block that
    exist and are ``visible`` (bool[nk]); the others leave the carry as it is."""

    def per_key_block(carry, o):
        j = first + o
        jc = jnp.clip(j, 0, nk - 1)
        ok = (j >= 0) & (j < nk) & visible[jc]
        return jax.lax.cond(ok, lambda c: update(c, jc), lambda c: c, carry), None

    return jax.lax.scan(per_key_block, carry, jnp.arange(inner))[0]


def _flash_forward(qg, kt, vt, qseg, kseg, q_offset, scale, causal, bq, bk, band_blocks):
    b, kh, g, tp, h = qg.shape
    nq, nk = tp // bq, kt.shape[2] // bk
    visible, first, inner = _block_plan(qseg, kseg, q_offset, causal, bq, bk, band_blocks)
    qblocks = qg.reshape(b, kh, g, nq, bq, h).transpose(3, 0, 1, 2, 4, 5)
    qsegs = qseg.reshape(b, nq, bq).transpose(1, 0, 2)

    def per_query_block(_, xs):
        c, qb, qs = xs
        qpos = c * bq + jnp.arange(bq, dtype=jnp.int32) + q_offset

        def update(carry, j):
            m, l, acc = carry
            kb, vb, s, mask = _key_block(qb, kt, vt, qs, kseg, qpos, j, bk, scale, causal)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None]) * mask
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + _pv(p.astype(vt.dtype), vb)
            return m_new, l, acc

        init = (jnp.full((b, kh, g, bq), _NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, h), jnp.float32))
        m, l, acc = _visit_key_blocks(update, init, first[c], visible[c], nk, inner)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (out.astype(qg.dtype), lse)

    _, (out, lse) = jax.lax.scan(per_query_block, None, (jnp.arange(nq), qblocks, qsegs))
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, kh, g, tp, h)
    return out, lse  # lse float32[nq, B, K, G, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(qg, kt, vt, qseg, kseg, q_offset, scale, causal, bq, bk, band_blocks):
    """qg float[B, K, G, T', H], kt/vt float[B, K, S', H] (T', S' whole blocks) -> float[B, K, G, T', H]."""
    return _flash_forward(qg, kt, vt, qseg, kseg, q_offset, scale, causal, bq, bk, band_blocks)[0]


def _flash_fwd(qg, kt, vt, qseg, kseg, q_offset, scale, causal, bq, bk, band_blocks):
    out, lse = _flash_forward(qg, kt, vt, qseg, kseg, q_offset, scale, causal, bq, bk, band_blocks)
    return out, (qg, kt, vt, qseg, kseg, q_offset, out, lse)


def _flash_bwd(scale, causal, bq, bk, band_blocks, res, dout):
    qg, kt, vt, qseg, kseg, q_offset, out, lse = res
    b, kh, g, tp, h = qg.shape
    sp = kt.shape[2]
    nq, nk = tp // bq, sp // bk
    visible, first, inner = _block_plan(qseg, kseg, q_offset, causal, bq, bk, band_blocks)
    split = lambda x: x.reshape(b, kh, g, nq, bq, h).transpose(3, 0, 1, 2, 4, 5)  # noqa: E731
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T']
    delta = delta.reshape(b, kh, g, nq, bq).transpose(3, 0, 1, 2, 4)
    qsegs = qseg.reshape(b, nq, bq).transpose(1, 0, 2)

    def per_query_block(carry, xs):
        dk, dv = carry
        c, qb, dob, qs, lse_c, delta_c = xs
        qpos = c * bq + jnp.arange(bq, dtype=jnp.int32) + q_offset

        def update(inner_carry, j):
            dq, dk, dv = inner_carry
            kb, vb, s, mask = _key_block(qb, kt, vt, qs, kseg, qpos, j, bk, scale, causal)
            p = jnp.exp(s - lse_c[..., None]) * mask  # float32[B, K, G, bq, bk]
            dp = _qk(dob, vb)
            ds = p * (dp - delta_c[..., None]) * scale
            dq = dq + _pv(ds.astype(kb.dtype), kb)
            dk_j = _key_grad(ds.astype(qb.dtype), qb)
            dv_j = _key_grad(p.astype(dob.dtype), dob)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=2) + dk_j, j * bk, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=2) + dv_j, j * bk, axis=2)
            return dq, dk, dv

        dq0 = jnp.zeros((b, kh, g, bq, h), jnp.float32)
        dq, dk, dv = _visit_key_blocks(update, (dq0, dk, dv), first[c], visible[c], nk, inner)
        return (dk, dv), dq

    zeros = jnp.zeros((b, kh, sp, h), jnp.float32)
    (dk, dv), dq = jax.lax.scan(per_query_block, (zeros, zeros),
                                (jnp.arange(nq), split(qg), split(dout.astype(qg.dtype)), qsegs, lse, delta))
    dq = dq.transpose(1, 2, 3, 0, 4, 5).reshape(b, kh, g, tp, h)
    return dq.astype(qg.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- accelerator kernels -----------------------------------------------------------------------------------------
def _splash(q, k, v, qseg, kseg, causal, scale, interpret=False):
    """TPU splash attention, one kernel per KV head over its G query heads (MQA form), vmapped over B and K.

    The kernel tiles both sequences in blocks of ``SPLASH_BLOCK`` and refuses other lengths, so queries and keys
    are padded to a multiple of it; the padding shares one id no real token has (padding queries see padding
    keys only, never an empty row) and is cut off the output. ``interpret``: run the kernel in Pallas'
    interpreter (any backend; for tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    tp, sp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK, -(-s // SPLASH_BLOCK) * SPLASH_BLOCK
    widen = lambda x, to: jnp.pad(x, ((0, 0), (0, to - x.shape[1])) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    q, k, v = widen(q, tp), widen(k, sp), widen(v, sp)
    qseg = jnp.pad(qseg, ((0, 0), (0, tp - t)), constant_values=_QPAD)
    kseg = jnp.pad(kseg, ((0, 0), (0, sp - s)), constant_values=_QPAD)
    head_mask = sa.CausalMask((tp, sp)) if causal else sa.FullMask((tp, sp))
    kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([head_mask] * g), interpret=interpret)
    qg = _grouped(q * jnp.asarray(scale, q.dtype), kh)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]

    def one(qh, kh_, vh, qs, ks):  # qh [G, T, H], kh_/vh [S, H]
        return kernel(qh, kh_, vh, segment_ids=sa.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0))(qg, kt, vt, qseg, kseg)
    return _ungrouped(out)[:, :t].astype(q.dtype)


def _cudnn(q, k, v, qseg, kseg, causal, scale):
    """cuDNN fused attention; segment ids become a bool[B, 1, T, S] mask (no segment argument in the API)."""
    t, s = q.shape[1], k.shape[1]
    mask = (qseg[:, :, None] == kseg[:, None, :])[:, None]
    if causal:
        mask &= (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
