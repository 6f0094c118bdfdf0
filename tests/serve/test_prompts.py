"""Which chat requests the server builds on its event loop: short text-only ones. Media and long text go to the
worker pool, so neither decoding nor tokenising a large body holds up the streams."""

from emoqwen_jax.serve.prompts import INLINE_TEXT_CHARS, short_text_only
from emoqwen_jax.serve.schema import ChatRequest


def chat(*contents) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": c} for c in contents]})


def test_short_text_only_requests_are_built_inline():
    assert short_text_only(chat("How does she feel?"))
    assert short_text_only(chat([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    assert not short_text_only(chat([{"type": "text", "text": "a"}, image]))
    half = "x" * (INLINE_TEXT_CHARS // 2)
    assert short_text_only(chat(half, [{"type": "text", "text": half}]))
    assert not short_text_only(chat(half, half + "x"))
