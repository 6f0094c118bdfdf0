"""Token constants both ``data`` and ``convert`` read, without importing the data pipeline: the Qwen2 special
tokens and their ids for a given vocabulary size (``tokenizer_info``), and the label that marks an unlearned
position (``IGNORE``). The tokenizer itself is built in ``emoqwen_jax.data.tokenizer``.
"""

from __future__ import annotations

import dataclasses

from emoqwen_jax.sizes import BASE, SIZES

IGNORE = -100  # label of a position nothing is learned at (HF's ignore_index)

NUM_RANKS = 151643
# Qwen2 / Qwen2.5-VL special tokens in id order (151643 …).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
REAL_VOCAB_SIZE = SIZES[BASE]["text"]["vocab_size"]  # Qwen2.5-7B embedding rows (152064)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # all single bytes, the specials, the pad


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """Ids the rest of the code needs; ``vocab_size`` is the model's embedding rows (> pad_id)."""

    vocab_size: int
    num_bpe: int
    pad_id: int
    eos_id: int  # <|im_end|>: ends every turn, and generation (Qwen2.5-VL-Instruct's first eos)
    endoftext_id: int
    im_start_id: int
    im_end_id: int
    vision_start_id: int
    vision_end_id: int
    image_pad_id: int
    video_pad_id: int
    cache_path: str

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Generation stops at either (Qwen2.5-VL generation_config eos_token_id)."""
        return (self.im_end_id, self.endoftext_id)


def tokenizer_info(vocab_size: int = REAL_VOCAB_SIZE, cache_path: str = "") -> TokenizerInfo:
    """Special-token ids for a tokenizer built with ``vocab_size`` (no build needed)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} < {MIN_VOCAB_SIZE} (256 bytes + 22 specials + pad)")
    num_bpe = min(NUM_RANKS, vocab_size - len(SPECIAL_TOKENS) - 1)
    sid = {name: num_bpe + i for i, name in enumerate(SPECIAL_TOKENS)}
    return TokenizerInfo(
        vocab_size=vocab_size, num_bpe=num_bpe, pad_id=num_bpe + len(SPECIAL_TOKENS),
        eos_id=sid["<|im_end|>"], endoftext_id=sid["<|endoftext|>"], im_start_id=sid["<|im_start|>"],
        im_end_id=sid["<|im_end|>"], vision_start_id=sid["<|vision_start|>"], vision_end_id=sid["<|vision_end|>"],
        image_pad_id=sid["<|image_pad|>"], video_pad_id=sid["<|video_pad|>"], cache_path=cache_path)
