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


def test_mailbox_delivers_in_order_with_one_wakeup_per_batch():
    """Posts made before the loop runs again share one wake-up; each queue gets its items in order."""
    import threading

    from emoqwen_jax.serve.server import LoopMailbox

    async def run():
        loop = asyncio.get_running_loop()
        wakeups = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(fn), schedule(fn, *a))[1]
        mailbox, got = LoopMailbox(loop), []
        for i in range(5):  # the loop cannot deliver in between: one wake-up
            mailbox.post(got.append, i)
        assert len(wakeups) == 1 and got == []
        await asyncio.sleep(0)
        assert got == [0, 1, 2, 3, 4]

        queues = {tag: asyncio.Queue() for tag in "ab"}

        def engine_thread():  # many posts from another thread, interleaving two readers
            for i in range(2000):
                mailbox.post(queues["ab"[i % 2]].put_nowait, i)
            for q in queues.values():
                mailbox.post(q.put_nowait, None)

        threading.Thread(target=engine_thread).start()
        read = {}
        for tag, q in queues.items():
            read[tag] = []
            while (item := await q.get()) is not None:
                read[tag].append(item)
        return read

    read = asyncio.run(run())
    assert read == {"a": list(range(0, 2000, 2)), "b": list(range(1, 2000, 2))}
