"""Conversations → ``input_ids`` and ``labels`` with the Qwen chat template and exact vision-token expansion.

Rendered template (what Qwen2.5-VL's chat template produces; ``⟨pad⟩ × n`` is n copies of one pad token)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|>⟨<|video_pad|> × n⟩<|vision_end|>\\nWhat emotion…?<|im_end|>\\n
    <|im_start|>assistant\\nThe person is happy.<|im_end|>\\n

Each ``<video>``/``<image>`` placeholder in a user turn becomes one block per grid of its media, with
n = grid_t · grid_h · grid_w / 4 pad tokens (one per merged 2×2 patch). Labels are the assistant turns'
content tokens and their ``<|im_end|>``; every other position is ``IGNORE`` (−100). A sample longer than
``max_length`` is rejected ('too_long'), never truncated: cutting it could cut vision tokens.

Text between special tokens is encoded run by run, which equals encoding the rendered string because
special tokens split the text before BPE anyway.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.data.tokenizer import TokenizerInfo
from emoqwen_jax.tokens import IGNORE  # noqa: F401 (re-exported for data users)

PLACEHOLDER_RE = re.compile(r"<(video|image|audio)>")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "system": "system"}
MERGE_UNITS = 4  # spatial merge 2 × 2: patches per vision token


def num_vision_tokens(grid_thw: Sequence[int]) -> int:
    """Vision tokens of one grid: t · h · w / 4."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // MERGE_UNITS


def check_text(text: Any, where: str) -> str:
    """Rejects non-strings and text that is not valid UTF-8 (lone surrogates from bad JSON escapes)."""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("non_utf8", where) from None
    if not isinstance(text, str):
        raise Rejected("empty_conversation", f"{where}: content is {type(text).__name__}, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("non_utf8", where) from None
    return text


def normalize_conversation(turns: Any, num_media: int, media_kind: str | None) -> list[dict[str, str]]:
    """Validates turns → ``[{"role": "system"|"user"|"assistant", "content": str}]``.

    Accepts ``role``/``content`` (official) and ``from``/``value`` (LLaVA) keys. When there is exactly one
    medium and no placeholder, the placeholder is put at the start of the first user turn.
    """
    if not isinstance(turns, list) or not turns:
        raise Rejected("empty_conversation", "no turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Rejected("bad_role", f"turn {i} is not an object")
        role = turn.get("role", turn.get("from"))
        if role not in ROLE_ALIASES:
            raise Rejected("bad_role", f"turn {i} role {role!r}")
        content = check_text(turn.get("content", turn.get("value")), f"turn {i}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in out):
        raise Rejected("no_assistant_turn", f"{len(out)} turns")
    if any(t["role"] != "user" and PLACEHOLDER_RE.search(t["content"]) for t in out):
        raise Rejected("placeholder_mismatch", "placeholder outside a user turn")
    found = [m.group(1) for t in out for m in PLACEHOLDER_RE.finditer(t["content"])]
    if not found and num_media == 1:
        first_user = next((t for t in out if t["role"] == "user"), None)
        if first_user is None:
            raise Rejected("bad_role", "no user turn for the media")
        first_user["content"] = f"<{media_kind}>\n" + first_user["content"]
        found = [media_kind]
    if len(found) != num_media or (media_kind and any(k != media_kind for k in found)):
        raise Rejected("placeholder_mismatch", f"placeholders {found} for {num_media} {media_kind or 'media'}")
    return out


def encode_conversation(turns: Sequence[dict[str, str]], vision_blocks: Sequence[Sequence[tuple[int, int]]],
                        tokenizer: Any, info: TokenizerInfo, *, system_prompt: str,
                        max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders and tokenizes a normalized conversation.

    ``vision_blocks[k]`` lists, for the k-th placeholder, ``(pad_id, n_tokens)`` for each grid it expands to
    (the clip's grid, then e.g. its face-canvas grid), wrapped in ``<|vision_start|>``/``<|vision_end|>``; a
    4-tuple ``(pad_id, n_tokens, start_id, end_id)`` names its own wrappers (the clip's audio block:
    ``<|audio_bos|>`` ``<|AUDIO|>`` × n ``<|audio_eos|>``, right after the video's vision block); a 1-tuple
    ``([ids],)`` is inserted as it is (the 'interleave' rule's clip block, ``layout.audio``).
    Returns (input_ids int32[L], labels int32[L]).
    """
    # Pieces: str (text) or list[int] (special ids); labelled pieces carry True.
    pieces: list[tuple[str | list[int], bool]] = []

    def turn(role: str, content: str, labelled: bool) -> None:
        pieces.append(([info.im_start_id], False))
        pieces.append((role + "\n", False))
        if role == "user":
            for j, part in enumerate(PLACEHOLDER_RE.split(content)):
                # split() with one group yields text, kind, text, kind, …
                if j % 2 == 0:
                    pieces.append((part, False))
                else:
                    for entry in next(blocks):
                        if isinstance(entry[0], list):  # raw ids (an interleaved audio-video block)
                            pieces.append((list(entry[0]), False))
                            continue
                        pad_id, n, *wrap = entry
                        start, end = wrap or (info.vision_start_id, info.vision_end_id)
                        pieces.append(([start] + [pad_id] * n + [end], False))
        else:
            pieces.append((content, labelled))
        pieces.append(([info.im_end_id], labelled))
        pieces.append(("\n", False))

    blocks = iter(vision_blocks)
    system = next((t["content"] for t in turns if t["role"] == "system"), system_prompt)
    turn("system", system, False)
    for t in turns:
        if t["role"] != "system":
            turn(t["role"], t["content"], t["role"] == "assistant")

    ids: list[int] = []
    labels: list[int] = []
    text, label_from = "", -1  # the text chunk being gathered; where its labelled suffix starts
    for piece, labelled in pieces + [([], False)]:
        if isinstance(piece, str):
            if labelled and label_from < 0:
                label_from = len(text)
            text += piece
            continue
        if text:
            # One encode per run of text between special tokens, exactly like the rendered string; labels
            # go to tokens starting inside the labelled suffix (the assistant's content).
            enc = tokenizer.encode(text, add_special_tokens=False)
            ids += enc.ids
            labels += [i if 0 <= label_from <= start else IGNORE
                       for i, (start, _) in zip(enc.ids, enc.offsets, strict=True)]
            text, label_from = "", -1
        ids += piece
        labels += piece if labelled else [IGNORE] * len(piece)
    if len(ids) > max_length:
        raise Rejected("too_long", f"{len(ids)} tokens > max_length {max_length}")
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def prompt_ids(turns: Sequence[dict[str, str]], vision_blocks: Sequence[Sequence[tuple[int, int]]],
               tokenizer: Any, info: TokenizerInfo, *, system_prompt: str, max_length: int) -> np.ndarray:
    """Generation prompt: the conversation without its last assistant turn, then ``<|im_start|>assistant\\n``."""
    turns = list(turns)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    ids, _ = encode_conversation(turns, vision_blocks, tokenizer, info, system_prompt=system_prompt,
                                 max_length=max_length)
    tail = [info.im_start_id] + tokenizer.encode("assistant\n", add_special_tokens=False).ids
    return np.concatenate([ids, np.asarray(tail, np.int32)])
