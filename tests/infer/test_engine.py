"""The continuous-batching engine: greedy output equals ``generate`` for each prompt alone whatever else is in
flight and in whatever order requests arrive; seeded sampling does not depend on other traffic; cancel,
min_tokens, ignore_eos, stop strings/ids, streaming callbacks and the background loop."""

import threading

import engine_helpers as H
import jax
import numpy as np
import pytest

from emoqwen_jax.infer.engine import _JIT_DECODE, Engine, QueueFull, SamplingParams

pytestmark = pytest.mark.slow  # runs the engine end to end


@pytest.fixture(scope="module", params=[1, 3], ids=lambda n: f"decode_steps={n}")
def engine(session, request):
    """One engine for most tests (every test leaves it idle): its shapes compile once. Every test runs with one
    token per decode call and with three (rows then end inside a call, and calls straddle the read buckets)."""
    return Engine(session, max_batch=3, max_len=128, prefill_batch=2, decode_steps=request.param)


@pytest.fixture(scope="module")
def mixed(model):
    """Seven prompts: text of three lengths, an image, a video, audio, and image + text (slots get reused)."""
    rng = np.random.default_rng(0)
    return [H.text_prompt(rng, 5), H.image_prompt(model, rng), H.text_prompt(rng, 40), H.video_prompt(model, rng),
            H.audio_prompt(model, rng), H.text_prompt(rng, 12), H.image_prompt(model, rng, (1, 4, 4), 9, 2)]


MAX_TOKENS = (6, 9, 5, 8, 7, 4, 6)


@pytest.fixture(scope="module")
def expected(model, session, mixed):
    return [H.reference(model, p, n, session.info.stop_ids) for p, n in zip(mixed, MAX_TOKENS, strict=True)]


def run_staggered(engine, prompts, params, order, arrivals):
    """Submits prompts in ``order``; ``arrivals[k]`` engine steps run before the k-th submission."""
    handles = {}
    for k, i in enumerate(order):
        for _ in range(arrivals[k]):
            engine.step()
        handles[i] = engine.submit(prompts[i], params[i])
    while not all(h.done() for h in handles.values()):
        engine.step()
    return [handles[i].result() for i in range(len(prompts))]


@pytest.mark.parametrize("order, arrivals", [
    ((0, 1, 2, 3, 4, 5, 6), (0, 0, 0, 2, 1, 3, 0)),
    ((6, 4, 2, 0, 5, 3, 1), (0, 1, 0, 0, 4, 0, 2)),
])
def test_greedy_equals_generate_alone(engine, session, mixed, expected, order, arrivals):
    params = [SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    done = run_staggered(engine, mixed, params, order, arrivals)
    for c, want, p, n in zip(done, expected, mixed, MAX_TOKENS, strict=True):
        assert c.token_ids == want
        assert c.finish_reason == ("length" if len(want) == len(c.token_ids) == n else "stop")
        assert c.prompt_tokens == len(p.input_ids)
        assert c.text == session.decode(want)
    stats = engine.stats()
    assert stats["live_slots"] == 0 and stats["queue_depth"] == 0
    assert len({tuple(c.token_ids) for c in done}) == len(done)  # the rows really differ


def test_a_row_that_outgrows_the_read_columns_beside_short_rows(engine, model):
    """The decode step reads the cache only up to the length bucket of the longest live row: a row that crosses
    the 64-column bucket mid-request (while short rows run beside it) keeps ``generate``'s tokens."""
    rng = np.random.default_rng(3)
    prompts = [H.text_prompt(rng, 5), H.text_prompt(rng, 58), H.text_prompt(rng, 9)]
    budgets = (4, 12, 12)  # the long row's tokens 7.. lie past column 64; the first row ends before it gets there
    done = engine.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in budgets])
    for c, p, n in zip(done, prompts, budgets, strict=True):
        assert c.token_ids == H.reference(model, p, n)


def test_sampling_reproduces_from_the_seed_whatever_else_runs(engine, model, session, mixed):
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    prompt = mixed[3]
    alone = engine.generate([prompt], sampled)[0]
    busy = engine
    others = [SamplingParams(max_tokens=6, temperature=1.0, seed=s) for s in (1, 2)] + [SamplingParams(max_tokens=5)]
    done = busy.generate([mixed[0], mixed[2], prompt, mixed[5]], [others[0], others[1], sampled, others[2]])
    assert done[2].token_ids == alone.token_ids
    # the same draws as generate for that prompt alone with rng=seed
    assert alone.token_ids == H.reference(model, prompt, 8, session.info.stop_ids, rng=7, temperature=0.9,
                                          top_p=0.95, top_k=50)
    greedy = H.reference(model, prompt, 8, session.info.stop_ids)
    assert alone.token_ids != greedy  # the draws are not the argmax


def test_cancel_frees_the_slot_and_streaming(engine, mixed):
    streamed = []
    first = engine.submit(mixed[0], SamplingParams(max_tokens=50, ignore_eos=True),
                          on_token=lambda t, d: streamed.append((t, d)))
    fill = [engine.submit(mixed[5], SamplingParams(max_tokens=50, ignore_eos=True)) for _ in range(2)]
    second = engine.submit(mixed[2], SamplingParams(max_tokens=3))
    for _ in range(3):
        engine.step()
    first.cancel()
    while not second.done():
        engine.step()
    c = first.result()
    assert not any(h.done() for h in fill)  # the second request took the cancelled one's slot
    for h in fill:
        h.cancel()
    engine.step()
    assert c.finish_reason == "cancelled" and 3 <= len(c.token_ids) < 50
    assert [t for t, _ in streamed] == c.token_ids and "".join(d for _, d in streamed) == c.text
    assert second.result().finish_reason == "length" and engine.stats()["live_slots"] == 0


def test_min_tokens_ignore_eos_and_stop_ids(engine, session, mixed):
    free_run = engine.generate([mixed[1]], SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True))[0]
    free = free_run.token_ids
    eos = free[2]
    assert eos not in free[:2]
    stopped, ignored, held, released = Engine(session, max_batch=3, max_len=128, prefill_batch=2, eos_ids=(eos,),
                                              decode_steps=engine.decode_steps).generate(
        [mixed[1]] * 4, [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, ignore_eos=True),
                         SamplingParams(max_tokens=8, min_tokens=4), SamplingParams(max_tokens=8, min_tokens=2)])
    assert stopped.token_ids == free[:2] and stopped.finish_reason == "stop"
    # the mask lifts at the min_tokens-th token, also inside a decode call of several steps
    assert released.token_ids == free[:2] and released.finish_reason == "stop"
    assert ignored.token_ids == free and ignored.finish_reason == "length"
    assert held.token_ids[:2] == free[:2] and eos not in held.token_ids[:4] and len(held.token_ids) >= 4
    assert stopped.end_token_id == eos and ignored.end_token_id is None and ignored.end_logprob is None
    assert stopped.end_logprob == pytest.approx(free_run.logprobs[2], rel=1e-4, abs=1e-5)
    by_id = engine.generate([mixed[1]], SamplingParams(max_tokens=8, ignore_eos=True,
                                                       stop_token_ids=(free[3],)))[0]
    assert by_id.token_ids == free[:free.index(free[3])] and by_id.finish_reason == "stop"
    assert by_id.end_token_id == free[3]


def test_stop_strings_cut_the_text_and_the_stream(engine, mixed):
    full = engine.generate([mixed[2]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(full.text) > 8
    stop = full.text[5:8]
    streamed = []
    h = engine.submit(mixed[2], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop, "never-there")),
                      on_token=lambda t, d: streamed.append(d))
    while not h.done():
        engine.step()
    c = h.result()
    assert c.finish_reason == "stop" and c.text == full.text[:full.text.index(stop)]
    assert c.end_token_id == c.token_ids[-1] and full.end_token_id is None
    assert "".join(streamed) == c.text and c.token_ids == full.token_ids[:len(c.token_ids)]


def test_limits_background_loop_and_scores(session, mixed):
    engine = Engine(session, max_batch=3, max_len=128, prefill_batch=2, max_queue=2)
    with pytest.raises(ValueError, match="max_len=128"):
        engine.submit(mixed[2], SamplingParams(max_tokens=100))
    engine.submit(mixed[0], SamplingParams(max_tokens=2))
    engine.submit(mixed[0], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        engine.submit(mixed[0], SamplingParams(max_tokens=2))
    engine.start()
    try:
        got = {}
        ids = (40, 41, 42)
        threads = [threading.Thread(target=lambda i=i: got.update({i: engine.generate(
            [mixed[5]], SamplingParams(max_tokens=3, logprobs=True, score_token_ids=ids))[0]})) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        a, b = got[0], got[1]
        assert a.token_ids == b.token_ids and len(a.logprobs) == 3 and all(lp <= 0 for lp in a.logprobs)
        assert np.isclose(np.exp(a.first_scores).sum(), 1.0, atol=1e-5)
        many = engine.generate([mixed[0]] * 5, SamplingParams(max_tokens=2))  # more than max_queue: fed as it drains
        assert len(many) == 5 and len({tuple(c.token_ids) for c in many}) == 1
        before = engine.stats()["submitted"]
        with pytest.raises(ValueError, match="max_len=128"):  # all or nothing
            engine.generate([mixed[0], mixed[2]], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=100)])
        assert engine.stats()["submitted"] == before
    finally:
        engine.stop()
    assert engine.stats()["live_slots"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("decode_steps", [1, 2])
def test_a_mesh_of_four_devices_gives_the_tokens_of_one(model, session, mixed, expected, decode_steps):
    """Weights and KV cache sharded over fsdp=2 x tensor=2 (4 of the 8 CPU devices): the same greedy tokens, also
    with two tokens per decode call."""
    import jax

    from emoqwen_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    sharded = Engine(session, max_batch=4, max_len=128, prefill_batch=2, mesh=mesh, decode_steps=decode_steps)
    from jax.sharding import PartitionSpec as P

    assert sharded._cache[0][0].sharding.spec == P("fsdp", "tensor", None, None)  # slots x KV heads
    up = sharded._state["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert up[...].sharding.spec == P("fsdp", "tensor")
    sharded.warmup(mixed[0])
    compiled = _JIT_DECODE._cache_size()
    picks = [0, 1, 3, 4]
    done = sharded.generate([mixed[i] for i in picks], [SamplingParams(max_tokens=MAX_TOKENS[i]) for i in picks])
    assert [c.token_ids for c in done] == [expected[i] for i in picks]
    assert _JIT_DECODE._cache_size() == compiled  # the warm-up compiled every decode step the traffic runs


def test_gate_weights_per_request_and_weight_swap(engine, model, mixed, expected):
    """Each request gets its own items' gate weights (the batch's images first, then its videos, split per row)
    as the plain forward computes them alone; ``set_params`` swaps the weights from the next step on."""
    from flax import nnx

    picks = [1, 3, 6, 0]  # image, video, image, text: one prefill of two rows, then two more
    done = engine.generate([mixed[i] for i in picks], SamplingParams(max_tokens=2))
    for i, c in zip(picks, done, strict=True):
        if not mixed[i].vision:
            assert c.gate_weights is None
            continue
        alone = np.asarray(model(mixed[i].input_ids[None], **mixed[i].vision).gate_weights)
        assert c.gate_weights.shape == alone.shape == (1, model.config.compressor.num_experts)
        np.testing.assert_allclose(c.gate_weights, alone, rtol=1e-5, atol=1e-6)
    original = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    swapped = jax.tree.map(lambda x: x, original)
    swapped["language_model"]["norm"]["weight"] = -np.asarray(original["language_model"]["norm"]["weight"])
    engine.set_params(swapped)
    try:
        changed = engine.generate([mixed[0]], SamplingParams(max_tokens=6))[0].token_ids
    finally:
        engine.set_params(original)
    assert changed != expected[0][:6]
    assert engine.generate([mixed[0]], SamplingParams(max_tokens=6))[0].token_ids == expected[0]


def test_feed_answers_in_order_and_grows_the_cache(engine, session):
    """``feed.complete_in_order``: answers in job order, each as the engine gives it alone; a prompt longer than
    the first engine's cache starts a larger engine; a prompt that cannot be built comes back as its error."""
    from emoqwen_jax.infer.feed import cache_length, complete_in_order

    jobs = [("How are you?", [], None), ("Tell me " + "more and more " * 40, [], None),
            ("Look.", [("video", "/nonexistent/clip.mp4")], None), ("Why?", [], "she smiles")]
    params = lambda i: SamplingParams(max_tokens=3, ignore_eos=True)  # noqa: E731
    got = list(complete_in_order(session, jobs, params, max_batch=2, workers=1))  # one worker: built in order
    assert [i for i, _ in got] == [0, 1, 2, 3] and isinstance(got[2][1], FileNotFoundError)
    # the first engine's cache (64) holds job 0, not job 1
    assert len(session.prompt(jobs[0][0]).input_ids) + 3 <= 64 < len(session.prompt(jobs[1][0]).input_ids) + 3
    for i in (0, 1, 3):
        prompt = session.prompt(jobs[i][0], [], jobs[i][2])
        alone = Engine(session, max_batch=2, max_len=cache_length(len(prompt.input_ids) + 3)).generate(
            [prompt], params(i))[0]
        assert got[i][1].token_ids == alone.token_ids and got[i][1].prompt_tokens == len(prompt.input_ids)


@pytest.mark.parametrize("decode_steps", [1, 3])
def test_warmup_compiles_every_row_count_of_a_prompt_kind(session, mixed, decode_steps):
    """After ``warmup`` with one video prompt, batches of 1-4 such prompts (3 rows pad to 4, their patches as if
    full) add no prefill shape and no decode step (the steps that take the previous step's tokens on the device
    included; one step and ``decode_steps`` per call), and the warm-up requests leave every slot free."""
    engine = Engine(session, max_batch=4, max_len=128, prefill_batch=4, decode_steps=decode_steps)
    engine.warmup(mixed[3])
    shapes, decode_programs = engine.stats()["compiled_prefill_shapes"], _JIT_DECODE._cache_size()
    assert shapes == 3  # rows 1, 2, 4
    for n in (3, 1, 4, 2):
        engine.generate([mixed[3]] * n, SamplingParams(max_tokens=4))
        engine.generate([mixed[3]] * n, SamplingParams(max_tokens=9, ignore_eos=True))
    stats = engine.stats()
    assert stats["compiled_prefill_shapes"] == shapes and stats["live_slots"] == 0
    assert _JIT_DECODE._cache_size() == decode_programs


def test_done_callbacks_run_once_in_order_after_the_tokens(engine, mixed):
    calls_before = engine.stats().get("decode_calls", 0)
    seen = []
    handle = engine.submit(mixed[0], SamplingParams(max_tokens=3, ignore_eos=True),
                           on_token=lambda t, d: seen.append("token"))
    handle.add_done_callback(lambda c: 1 / 0)  # a failing callback is logged, the engine and later ones go on
    handle.add_done_callback(lambda c: seen.append(("done", c.finish_reason, len(c.token_ids))))
    while not handle.done():
        engine.step()
    handle.add_done_callback(lambda c: seen.append(("late", c.finish_reason)))  # finished already: runs at once
    assert seen == ["token"] * 3 + [("done", "length", 3), ("late", "length")]
    # the prefill draws token 1, two one-step decode calls the rest (or one call of three steps, its third token
    # dropped): the call in flight that draws token 3 is not followed by another (its row reached max_tokens)
    assert engine.stats()["live_slots"] == 0
    assert engine.stats()["decode_calls"] - calls_before == (2 if engine.decode_steps == 1 else 1)
