"""Rollouts: prompts cut from data samples, sampling that reproduces from its seed, and the per-token arrays
that line the completions up with the update batch (checked against the model's own full logits)."""

import sys

import numpy as np
import pytest
from config_files import ROOT
from flax import nnx

from emoqwen_jax.data.manifests import load_manifest
from emoqwen_jax.data.pipeline import Collate
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.infer.session import Session
from emoqwen_jax.model import EmotionQwen, ModelConfig, layout_spec
from emoqwen_jax.rl.rollout import (
    Completion,
    EngineSampler,
    GenerateSampler,
    RolloutSettings,
    completion_arrays,
    cut_at_media,
    media_token_ids,
    split_sample,
    update_sample,
)
from emoqwen_jax.rl.stage import completion_logprobs
from emoqwen_jax.tokens import IGNORE
from emoqwen_jax.train import batching

pytestmark = pytest.mark.slow  # samples on the engine and compiles the training forward

SETTINGS = RolloutSettings(group_size=3, temperature=1.0, top_p=1.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def setup(rl_demo_dir):
    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    config = emotion_qwen.get_config("tiny")
    mcfg = ModelConfig.from_run_config(config)
    model = EmotionQwen(mcfg, rngs=nnx.Rngs(0))
    session = Session(model, {})
    processor = SampleProcessor(config.data.to_dict())
    records = load_manifest(str(rl_demo_dir / "train.jsonl"), str(rl_demo_dir))
    samples = [processor.map(records[i]) for i in (0, 11)]  # a clip and a still
    return config, mcfg, model, session, [split_sample(s, session) for s in samples], samples


def test_prompts_stop_at_the_assistant_turn_and_keep_the_reference(setup):
    _, _, _, session, prompts, samples = setup
    for p, s in zip(prompts, samples, strict=True):
        first = int(np.argmax(s["labels"] != IGNORE))
        np.testing.assert_array_equal(p.prompt.input_ids, s["input_ids"][:first])
        assert session.decode(p.prompt.input_ids[-6:].tolist()).endswith("assistant\n")
        assert p.reference.strip() in ("happy", "sad", "neutral", "angry", "surprise")


def test_rollouts_reproduce_from_the_seed(setup):
    _, _, model, session, prompts, _ = setup
    sampler = GenerateSampler(session)
    first = sampler(model, [p.prompt for p in prompts], SETTINGS, seed=7)
    again = sampler(model, [p.prompt for p in prompts], SETTINGS, seed=7)
    other = sampler(model, [p.prompt for p in prompts], SETTINGS, seed=8)
    assert len(first) == len(prompts) * SETTINGS.group_size
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert len({tuple(c.token_ids) for c in first[:3]}) > 1  # a group's completions differ from each other


def test_engine_rollouts_reproduce_from_the_seed_and_record_the_forward_log_probabilities(setup):
    config, mcfg, model, session, prompts, _ = setup
    sampler = EngineSampler(session, max_batch=4, max_len=256)  # fewer slots than rows: rows wait for slots
    first = sampler(model, [p.prompt for p in prompts], SETTINGS, seed=11)
    again = EngineSampler(session, max_batch=6, max_len=256)(model, [p.prompt for p in prompts], SETTINGS, seed=11)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]  # whatever the batching
    assert [c.token_ids for c in first] != [c.token_ids for c in sampler(model, [p.prompt for p in prompts],
                                                                         SETTINGS, seed=12)]
    stops = set(session.info.stop_ids)
    for c in first:
        assert len(c.logprobs) == len(c.token_ids) and 1 <= len(c.token_ids) <= SETTINGS.max_new_tokens
        assert c.stopped == (c.token_ids[-1] in stops) and not stops & set(c.token_ids[:-1])
    completions = [cut_at_media(c, media_token_ids(mcfg)) for c in first]
    logp = _forward_logprobs(config, mcfg, model, session, prompts, completions, SETTINGS.temperature)
    for b, c in enumerate(completions):
        got, want = np.asarray(c.logprobs), np.asarray(logp[b, :len(c.token_ids)])
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), (b, got, want)


def _forward_logprobs(config, mcfg, model, session, prompts, completions, temperature):
    rows = [update_sample(prompts[i // SETTINGS.group_size], c, str(i)) for i, c in enumerate(completions)]
    batch = Collate(len(rows), config.data.length_buckets, config.data.patch_buckets, session.info.pad_id)(rows)
    inputs = batching.shard_inputs(batch, layout_spec(mcfg), batching.agreed_sizes([batching.needs(batch)],
                                                                                   len(rows)),
                                   pad_id=session.info.pad_id)
    arrays = completion_arrays(prompts, completions, SETTINGS.group_size, SETTINGS.max_new_tokens)
    return np.asarray(completion_logprobs(model, inputs, arrays["positions"], arrays["tokens"], temperature)[0])


def test_media_placeholders_cut_a_completion(setup):
    _, mcfg, *_ = setup
    media = media_token_ids(mcfg)
    c = Completion([5, 6, mcfg.video_token_id, 7], True, np.array([-1, -2, -3, -4], np.float32))
    cut = cut_at_media(c, media)
    assert cut.token_ids == [5, 6] and not cut.stopped and cut.logprobs.tolist() == [-1, -2]
    assert cut_at_media(Completion([5, 6], True), media).stopped


def test_completion_logprobs_equal_the_full_forward_log_softmax_at_each_sampled_token(setup):
    config, mcfg, model, session, prompts, _ = setup
    completions = GenerateSampler(session)(model, [p.prompt for p in prompts], SETTINGS, seed=3)
    completions = [cut_at_media(c, media_token_ids(mcfg)) for c in completions]
    rows = [update_sample(prompts[i // 3], c, str(i)) for i, c in enumerate(completions)]
    collate = Collate(len(rows), config.data.length_buckets, config.data.patch_buckets, session.info.pad_id)
    batch = collate(rows)
    spec = layout_spec(mcfg)
    inputs = batching.shard_inputs(batch, spec, batching.agreed_sizes([batching.needs(batch)], len(rows)),
                                   pad_id=session.info.pad_id)
    arrays = completion_arrays(prompts, completions, 3, SETTINGS.max_new_tokens)
    temperature = 0.7
    logp, entropy, _ = completion_logprobs(model, inputs, arrays["positions"], arrays["tokens"], temperature)
    logits = np.asarray(model.forward(inputs).logits, np.float64) / temperature  # [B, L, V]
    full = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    checked = 0
    for b, c in enumerate(completions):
        start = len(prompts[b // 3].prompt.input_ids)
        assert batch["labels"][b, start:start + len(c.token_ids)].tolist() == c.token_ids
        for t, token in enumerate(c.token_ids):
            want = full[b, start + t - 1, token]  # the column before a token predicts it
            assert abs(float(logp[b, t]) - want) <= 1e-5 * abs(want)
            p = np.exp(full[b, start + t - 1])
            assert abs(float(entropy[b, t]) + (p * full[b, start + t - 1]).sum()) <= 1e-4
            checked += 1
    assert checked == int(arrays["mask"].sum()) > 0
