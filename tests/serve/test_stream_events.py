"""The streams' event reader: tokens queued behind each other join into one delta, per tag and in order, and
every job's end marker still comes through."""

import asyncio

from emoqwen_jax.serve.app import _events


class _Client:
    async def is_disconnected(self) -> bool:
        return False


def _read(items: list[tuple[str, str | None]], jobs: int) -> list[tuple[str, str | None]]:
    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        return [item async for item in _events(_Client(), queue, [None] * jobs)]

    return asyncio.run(run())


def test_queued_deltas_of_one_tag_join_and_markers_pass():
    items = [("a", "Hel"), ("a", "lo"), ("b", "x"), ("b", "y"), ("a", " there"), ("a", None), ("b", "z"),
             ("b", None)]
    got = _read(items, jobs=2)
    assert got == [("a", "Hello"), ("b", "xy"), ("a", " there"), ("a", None), ("b", "z"), ("b", None)]
    for tag in "ab":  # each tag's text is unchanged
        assert "".join(d for t, d in got if t == tag and d) == "".join(d for t, d in items if t == tag and d)


def test_a_delta_arriving_alone_is_sent_alone():
    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        reader = _events(_Client(), queue, [None])
        queue.put_nowait(("", "one"))
        first = await reader.__anext__()
        queue.put_nowait(("", "two"))
        queue.put_nowait(("", None))
        return [first] + [item async for item in reader]

    assert asyncio.run(run()) == [("", "one"), ("", "two"), ("", None)]
