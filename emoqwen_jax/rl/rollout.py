"""Rollouts: data samples -> prompts -> G sampled completions each -> the update batch's rows.

A prompt is a processed training sample (``emoqwen_jax.data.process.SampleProcessor``) cut before its first
labelled token, i.e. everything up to and including ``<|im_start|>assistant\\n``; its reference answer is the
labelled text (what the rewards compare with). Sampling goes through one small interface, ``Sampler``:

  EngineSampler    (the RL stage's default) the continuous-batching generation engine
                   (``emoqwen_jax.infer.engine``), which records the old policy's log-probability of every
                   sampled token while sampling (``SamplingParams(logprobs=True)``); row i of a round draws
                   with seed round_seed + i, so a round reproduces from its seed whatever the batching.
  GenerateSampler  ``emoqwen_jax.infer.generate`` (one padded batch); it records no log-probabilities, so
                   the stage computes them with the training forward pass right after sampling.

Shapes: B = prompts × G completion rows (a prompt's G rows adjacent), N = ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np
from flax import nnx

from emoqwen_jax.infer.engine import Engine, SamplingParams
from emoqwen_jax.infer.session import Prompt, Session
from emoqwen_jax.tokens import IGNORE

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "input_features", "feature_attention_mask", "audio_lengths")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    group_size: int
    temperature: float
    top_p: float
    max_new_tokens: int

    @classmethod
    def from_config(cls, rl: Any) -> "RolloutSettings":
        return cls(int(rl.group_size), float(rl.temperature), float(rl.top_p), int(rl.max_new_tokens))


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # generated ids, the stop id included when the completion stopped
    stopped: bool  # False: cut at max_new_tokens
    logprobs: np.ndarray | None = None  # float32[len(token_ids)] under the sampling distribution, if recorded


class Sampler(Protocol):
    def __call__(self, model: Any, prompts: Sequence[Prompt], settings: RolloutSettings, seed: int
                 ) -> list[Completion]:
        """``settings.group_size`` completions of every prompt, in prompt order (rows of a prompt adjacent);
        the same (model, prompts, settings, seed) give the same completions."""


@dataclasses.dataclass(frozen=True)
class RolloutPrompt:
    prompt: Prompt  # token ids int32[L] up to the assistant's turn, and the sample's media arrays
    reference: str  # the labelled answer, decoded without special tokens
    sample_id: str
    media: dict[str, np.ndarray]  # the sample's media arrays, empty ones included (data sample names)


def split_sample(sample: dict, session: Session) -> RolloutPrompt:
    """A processed sample (input_ids, labels, media arrays) -> its prompt and reference answer."""
    labels = np.asarray(sample["labels"])
    labelled = np.flatnonzero(labels != IGNORE)
    if not len(labelled):
        raise ValueError(f"sample {sample.get('id')!r} has no assistant answer to learn from")
    ids = np.asarray(sample["input_ids"], np.int32)
    media = {k: np.asarray(sample[k]) for k in VISION_KEYS if k in sample}
    return RolloutPrompt(Prompt(ids[:labelled[0]], {k: v for k, v in media.items() if len(v)}),
                         session.decode(ids[labelled].tolist()), str(sample.get("id", "")), media)


class GenerateSampler:
    """Samples with ``emoqwen_jax.infer`` through a ``Session`` (the tokenizer, stop ids and shape buckets of
    the run's data config); all of a step's rows in one batch, one random stream from ``seed``."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, model, prompts, settings, seed):
        self.session.model = model  # the current policy's weights
        sampling = self.session.sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
        rows = [p for p in prompts for _ in range(settings.group_size)]
        ids = self.session.generate_ids(rows, sampling, seed=seed, keep_stop=True)
        stops = set(sampling.stop_ids)
        return [Completion(r, bool(r) and r[-1] in stops) for r in ids]


class EngineSampler:
    """Rollouts on the generation engine (module docstring). A row ends at its first stop id (the session's,
    the engine's EOS ids), so no decode step is spent past it; the completion keeps that id and its
    log-probability (``Completion.end_token_id``/``end_logprob``), which the update trains on (the policy learns
    where to stop)."""

    def __init__(self, session: Session, *, max_batch: int, max_len: int, mesh=None):
        self.session = session
        self.stop_ids = frozenset(int(i) for i in session.info.stop_ids)
        self.engine = Engine(session, max_batch=max_batch, max_len=max_len, mesh=mesh)

    def __call__(self, model, prompts, settings, seed):
        self.engine.set_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        rows = [p for p in prompts for _ in range(settings.group_size)]
        params = [SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                 top_p=settings.top_p, seed=(seed + i) % 2**31, logprobs=True)
                  for i in range(len(rows))]
        out = []
        for c in self.engine.generate(rows, params):
            stopped = c.end_token_id is not None and c.end_token_id in self.stop_ids
            ids = list(c.token_ids) + ([int(c.end_token_id)] if stopped else [])
            logprobs = list(c.logprobs) + ([float(c.end_logprob)] if stopped else [])
            out.append(Completion(ids, stopped, np.asarray(logprobs, np.float32)))
        return out


def media_token_ids(model_config: Any) -> frozenset[int]:
    """The placeholder and delimiter ids of images, videos and audio: text the layout gives a meaning to."""
    ids = {model_config.image_token_id, model_config.video_token_id, model_config.vision_start_token_id,
           model_config.vision_end_token_id}
    audio = getattr(model_config, "audio", None)
    if audio is not None and audio.enabled:
        ids |= {audio.audio_bos_token_id, audio.audio_token_id, audio.audio_eos_token_id}
    return frozenset(int(i) for i in ids)


def cut_at_media(completion: Completion, media_ids: frozenset[int]) -> Completion:
    """A completion cut before its first media placeholder id (counted as not stopped), or itself.

    A sampled placeholder would ask the model for media features that do not exist (the layout counts them);
    an untrained policy samples them now and then. The cut tokens are neither rewarded nor trained on."""
    cut = next((i for i, t in enumerate(completion.token_ids) if t in media_ids), None)
    if cut is None:
        return completion
    logprobs = None if completion.logprobs is None else completion.logprobs[:cut]
    return Completion(completion.token_ids[:cut], False, logprobs)


def update_sample(prompt: RolloutPrompt, completion: Completion, sample_id: str) -> dict:
    """One update row as a data sample (``emoqwen_jax.data.pipeline.Collate`` batches it): prompt + completion
    ids, the completion labelled, the prompt's media."""
    ids = np.concatenate([prompt.prompt.input_ids, np.asarray(completion.token_ids, np.int32)]).astype(np.int32)
    labels = np.full(len(ids), IGNORE, np.int32)
    labels[len(prompt.prompt.input_ids):] = completion.token_ids
    return {"id": sample_id, "input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids), **prompt.media}


def completion_arrays(prompts: Sequence[RolloutPrompt], completions: Sequence[Completion], group_size: int,
                      max_new_tokens: int) -> dict[str, np.ndarray]:
    """The per-token arrays of the update rows, in row order:

    tokens int32[B, N] (0 past the end), positions int32[B, N] (the column whose hidden state predicts token t:
    prompt length − 1 + t), mask bool[B, N], old_logp float32[B, N] (0 where not recorded) and has_logp bool
    (every completion carried its sampling log-probabilities)."""
    b, n = len(completions), max_new_tokens
    out = {"tokens": np.zeros((b, n), np.int32), "positions": np.zeros((b, n), np.int32),
           "mask": np.zeros((b, n), bool), "old_logp": np.zeros((b, n), np.float32)}
    for row, c in enumerate(completions):
        start = len(prompts[row // group_size].prompt.input_ids) - 1
        k = len(c.token_ids)
        out["tokens"][row, :k] = c.token_ids
        out["positions"][row] = start + np.minimum(np.arange(n), max(k - 1, 0))
        out["mask"][row, :k] = True
        if c.logprobs is not None:
            out["old_logp"][row, :k] = c.logprobs
    out["has_logp"] = np.array(all(c.logprobs is not None for c in completions))
    return out
