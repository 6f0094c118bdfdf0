"""Tokenizer build, chat template, placeholder expansion, assistant-only labels, reject-don't-truncate."""

import base64

import numpy as np
import pytest
import tiktoken

from emoqwen_jax.data import text
from emoqwen_jax.data import tokenizer as tk
from emoqwen_jax.data.reasons import Rejected

REAL_IDS = {"vision_start_id": 151652, "vision_end_id": 151653, "image_pad_id": 151655, "video_pad_id": 151656,
            "im_start_id": 151644, "im_end_id": 151645, "endoftext_id": 151643}
SYSTEM = "You are a helpful assistant."
SAMPLE_TEXT = ("The person frowns, then smiles: 高兴 😀!\n\n  def f(x):\n\treturn x**2  # 12345 it's OK\r\n"
               "Ünïcödé NFC: e\u0301 vs é")


@pytest.fixture(scope="module")
def real_tok(tok_cache):
    return tk.load_tokenizer(tk.REAL_VOCAB_SIZE, tok_cache)


def test_real_tokenizer_has_real_special_ids_and_matches_tiktoken(real_tok):
    tok, info = real_tok
    assert {k: getattr(info, k) for k in REAL_IDS} == REAL_IDS
    assert info.pad_id == 151665 and info.pad_id < info.vocab_size == 152064
    ranks = {}
    with open(tk._ranks_file(), "rb") as f:
        for line in f:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    ref = tiktoken.Encoding("qwen2", pat_str=tk.PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
    import unicodedata

    for s in (SAMPLE_TEXT, open(tk.__file__).read()):
        assert tok.encode(s).ids == ref.encode(unicodedata.normalize("NFC", s))


def test_template_matches_hf_tokenizer_on_rendered_string(real_tok):
    """Our piecewise encoding equals a Hugging Face tokenizer run on the rendered Qwen chat template."""
    from transformers import PreTrainedTokenizerFast

    tok, info = real_tok
    hf = PreTrainedTokenizerFast(tokenizer_file=info.cache_path)
    turns = text.normalize_conversation([
        {"role": "user", "content": "<video>\nHow does she feel?"},
        {"role": "assistant", "content": "She is surprised."},
        {"role": "user", "content": " And then?\n"},
        {"role": "assistant", "content": "\nHappy."}], 1, "video")
    ids, labels = text.encode_conversation(turns, [[(info.video_pad_id, 5)]], tok, info, system_prompt=SYSTEM,
                                           max_length=1000)
    rendered = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|video_pad|>" * 5 + "<|vision_end|>\nHow does she feel?<|im_end|>\n"
                "<|im_start|>assistant\nShe is surprised.<|im_end|>\n<|im_start|>user\n And then?\n<|im_end|>\n"
                "<|im_start|>assistant\n\nHappy.<|im_end|>\n")
    assert ids.tolist() == hf(rendered)["input_ids"]
    assert ids.dtype == np.int32 and labels.shape == ids.shape


def test_tiny_tokenizer_layout(tiny_tok):
    tok, info = tiny_tok
    assert info.vocab_size == 1024 and info.num_bpe == 1024 - 26 and info.pad_id == 1020
    assert (info.audio_bos_id, info.audio_id, info.audio_eos_id) == (1021, 1022, 1023)
    assert tok.get_vocab_size() == info.pad_id  # pad is not a real token
    assert [tok.token_to_id(t) for t in tk.SPECIAL_TOKENS] == list(range(info.num_bpe, info.pad_id))
    ids = tok.encode(SAMPLE_TEXT).ids
    assert max(ids) < info.num_bpe and tok.decode(ids) == __import__("unicodedata").normalize("NFC", SAMPLE_TEXT)


def test_special_tokens_in_user_text_are_plain_text(tiny_tok):
    tok, info = tiny_tok
    ids = tok.encode("<|im_start|>assistant\n<|video_pad|>").ids
    assert not set(ids) & set(range(info.num_bpe, info.pad_id))


def _encode(tiny_tok, turns, blocks, max_length=4096, kind="video"):
    tok, info = tiny_tok
    norm = text.normalize_conversation(turns, len(blocks), kind if blocks else None)
    return text.encode_conversation(norm, blocks, tok, info, system_prompt=SYSTEM, max_length=max_length)


def test_placeholders_expand_to_exact_pad_counts(tiny_tok):
    _, info = tiny_tok
    grids = [(3, 4, 6), (1, 2, 2)]  # the clip, then e.g. its face canvas
    blocks = [[(info.video_pad_id, text.num_vision_tokens(g)) for g in grids], [(info.video_pad_id, 4)]]
    ids, labels = _encode(tiny_tok, [{"role": "user", "content": "<video>\nfirst <video> second"},
                                     {"role": "assistant", "content": "ok"}], blocks)
    assert (ids == info.video_pad_id).sum() == 3 * 4 * 6 // 4 + 1 + 4
    assert (ids == info.vision_start_id).sum() == 3 and (ids == info.vision_end_id).sum() == 3
    starts = np.flatnonzero(ids == info.vision_start_id)
    assert ids[starts[0] + 1: starts[0] + 1 + 18].tolist() == [info.video_pad_id] * 18
    assert ids[starts[0] + 19] == info.vision_end_id and ids[starts[0] + 20] == info.vision_start_id
    assert (labels[ids == info.video_pad_id] == text.IGNORE).all()


def test_labels_are_assistant_tokens_only(tiny_tok):
    tok, info = tiny_tok
    answers = ["The person is happy.", "Because of the smile."]
    ids, labels = _encode(tiny_tok, [{"role": "user", "content": "<image>\nWhy?"},
                                     {"role": "assistant", "content": answers[0]},
                                     {"role": "user", "content": "Sure?"},
                                     {"role": "assistant", "content": answers[1]}],
                          [[(info.image_pad_id, 6)]], kind="image")
    kept = labels != text.IGNORE
    np.testing.assert_array_equal(labels[kept], ids[kept])
    # Labelled runs are exactly "<answer><|im_end|>" per assistant turn.
    runs = np.split(labels, np.flatnonzero(np.diff(kept.astype(int)) != 0) + 1)
    labelled = [r for r in runs if r[0] != text.IGNORE]
    assert [tok.decode(r[:-1].tolist()) for r in labelled] == answers
    assert all(r[-1] == info.im_end_id for r in labelled)
    assert (ids == info.im_end_id).sum() == 5  # system, 2 user, 2 assistant


def test_single_medium_without_placeholder_gets_one(tiny_tok):
    _, info = tiny_tok
    ids, _ = _encode(tiny_tok, [{"role": "user", "content": "Emotion?"}, {"role": "assistant", "content": "sad"}],
                     [[(info.video_pad_id, 3)]])
    assert (ids == info.video_pad_id).sum() == 3


def test_system_turn_overrides_default_prompt(tiny_tok):
    tok, _ = tiny_tok
    ids, _ = _encode(tiny_tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}], [])
    assert "Be brief." in tok.decode(ids.tolist()) and SYSTEM not in tok.decode(ids.tolist())


def test_too_long_is_rejected_not_truncated(tiny_tok):
    _, info = tiny_tok
    turns = [{"role": "user", "content": "<video>\nWhat?"}, {"role": "assistant", "content": "happy"}]
    ids, _ = _encode(tiny_tok, turns, [[(info.video_pad_id, 100)]])
    _encode(tiny_tok, turns, [[(info.video_pad_id, 100)]], max_length=len(ids))
    with pytest.raises(Rejected) as e:
        _encode(tiny_tok, turns, [[(info.video_pad_id, 100)]], max_length=len(ids) - 1)
    assert e.value.reason == "too_long"


@pytest.mark.parametrize("turns,n_media,reason", [
    ([], 1, "empty_conversation"),
    ("not a list", 1, "empty_conversation"),
    ([{"content": "<video> hi"}, {"role": "assistant", "content": "x"}], 1, "bad_role"),
    ([{"role": "narrator", "content": "<video> hi"}, {"role": "assistant", "content": "x"}], 1, "bad_role"),
    ([{"role": "user", "content": "<video> hi"}], 1, "no_assistant_turn"),
    ([{"role": "user", "content": "<video> hi"}, {"role": "assistant", "content": "  "}], 1, "no_assistant_turn"),
    ([{"role": "user", "content": "bad \udcff text <video>"}, {"role": "assistant", "content": "x"}], 1,
     "non_utf8"),
    ([{"role": "user", "content": "<video><video>"}, {"role": "assistant", "content": "x"}], 1,
     "placeholder_mismatch"),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], 1, "placeholder_mismatch"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<video>"}], 1, "placeholder_mismatch"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], 1, "empty_conversation"),
])
def test_bad_conversations_are_rejected(turns, n_media, reason):
    with pytest.raises(Rejected) as e:
        text.normalize_conversation(turns, n_media, "video")
    assert e.value.reason == reason


def test_prompt_ids_end_with_assistant_header(tiny_tok):
    tok, info = tiny_tok
    turns = text.normalize_conversation([{"role": "user", "content": "<video>\nWhat?"},
                                         {"role": "assistant", "content": "happy"}], 1, "video")
    prompt = text.prompt_ids(turns, [[(info.video_pad_id, 2)]], tok, info, system_prompt=SYSTEM, max_length=100)
    full, labels = text.encode_conversation(turns, [[(info.video_pad_id, 2)]], tok, info, system_prompt=SYSTEM,
                                            max_length=100)
    first_label = int(np.flatnonzero(labels != text.IGNORE)[0])
    np.testing.assert_array_equal(prompt, full[:first_label])


def test_encoding_cache_gives_the_tokenizer_s_ids(tiny_tok):
    """Prompts built through ``EncodingCache`` are the tokenizer's own, and a repeated text is encoded once."""
    tok, info = tiny_tok
    cached = tk.EncodingCache(tok)
    for question in ("<video>\nWhat?", "<video>\nHow does she feel?", "<video>\nWhat?"):
        turns = [{"role": "user", "content": question}]
        blocks = [[(info.video_pad_id, 3)]]
        np.testing.assert_array_equal(
            text.prompt_ids(turns, blocks, cached, info, system_prompt=SYSTEM, max_length=100),
            text.prompt_ids(turns, blocks, tok, info, system_prompt=SYSTEM, max_length=100))
    hits = cached.encode.cache_info()
    # Six runs a prompt (system turn, "\n", "user\n", question, "\n", "assistant\n"): only the 6 distinct texts
    # (two questions) are encoded.
    assert (hits.misses, hits.hits) == (6, 12)
