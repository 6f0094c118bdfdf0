"""A checkpoint ready to answer: the model, its tokenizer and its data settings, raw media -> prompts ->
batched generation -> text. ``emoqwen-describe`` and ``emoqwen-eval`` both run through it.

Settings: our model directory's ``config.json`` may hold ``meta["data"]``, the data config the model was
trained with (tokenizer vocabulary and cache, system prompt, frame rate, pixel budget, face fusion); the
session starts from ``emoqwen_jax.data.defaults.data_config()``, applies ``meta["data"]`` over it, then
the caller's overrides (benchmarks override fps and pixels so every model sees the same frames).

Prompts are built with the training code's own pieces: each medium goes through
``emoqwen_jax.data.process.SampleProcessor`` (sampling, resizing, patchify, optional face canvas), and the
text through ``emoqwen_jax.data.text.prompt_ids`` (Qwen chat template ending in
``<|im_start|>assistant\\n``), so a prompt at inference is token for token what the model saw in training.
Batches are left-padded (see ``generate.py``); text is padded to ``length_buckets``, patch rows to the
smaller of the ``patch_buckets`` entry and the next multiple of ``PATCH_STEP``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from emoqwen_jax.data import data_config, load_tokenizer
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.data.text import prompt_ids
from emoqwen_jax.data.tokenizer import EncodingCache
from emoqwen_jax.infer.generate import SamplingConfig, batch_vision, generate, left_pad
from emoqwen_jax.model import EmotionQwen
from emoqwen_jax.runtime import storage

MEDIA_KINDS = ("video", "image", "audio")
_AUDIO_KEYS = ("input_features", "feature_attention_mask", "audio_lengths")
PATCH_STEP = 2048  # patch rows of a batch are padded to a multiple of this (or a smaller training bucket)
log = logging.getLogger(__name__)


def _merge(base: dict, update: dict, *, strict: bool, where: str = "data") -> dict:
    """Recursive dict update. Unknown keys: an error when ``strict`` (a user's typo must not silently do
    nothing), skipped with a warning otherwise (a checkpoint written by an older or newer version)."""
    out = dict(base)
    for key, value in update.items():
        if key not in out:
            if strict:
                raise ValueError(f"unknown data setting {where}.{key}; known: {sorted(out)}")
            log.warning("ignoring the checkpoint's unknown data setting %s.%s", where, key)
            continue
        out[key] = (_merge(out[key], value, strict=strict, where=f"{where}.{key}") if isinstance(out[key], dict)
                    else value)
    return out


def _bucket(n: int, buckets: Sequence[int], step: int) -> int:
    """Smallest bucket >= n, else n rounded up to a multiple of ``step``."""
    fits = [int(b) for b in buckets if int(b) >= n]
    return min(fits) if fits else -(-n // step) * step


def pad_audio_windows(vision: dict[str, Any], window_buckets: Sequence[int]) -> dict[str, Any]:
    """Pads a batch's audio encoder windows (``input_features`` float[W, M, F] and their mask) with empty
    windows to a bucket (``window_buckets``, else a multiple of 8), so batches share compiled shapes."""
    if vision.get("input_features") is None:
        return vision
    feats, fmask = vision["input_features"], vision["feature_attention_mask"]
    w = _bucket(len(feats), window_buckets, 8)
    return {**vision,
            "input_features": np.concatenate([feats, np.zeros((w - len(feats),) + feats.shape[1:], feats.dtype)]),
            "feature_attention_mask": np.concatenate([fmask, np.zeros((w - len(fmask), fmask.shape[1]),
                                                                      fmask.dtype)])}


@dataclasses.dataclass
class Prompt:
    """One generation prompt: token ids int32[L] and its vision arrays (``emoqwen_jax.data`` names)."""

    input_ids: np.ndarray
    vision: dict[str, np.ndarray]


class Session:
    def __init__(self, model: EmotionQwen, data: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None):
        """``data``: the checkpoint's stored data settings (may be partial); ``overrides`` win over them."""
        cfg = data_config().to_dict()
        cfg["tokenizer_vocab_size"] = model.config.text.vocab_size
        cfg = _merge(_merge(cfg, data or {}, strict=False), overrides or {}, strict=True)
        a = model.config.audio  # the model decides whether (and how) audio reaches it
        cfg["audio"].update(enabled=a.enabled, num_mel_bins=a.num_mel_bins, window_frames=a.max_frames,
                            position_rule=a.position_rule, interleave_seconds=a.interleave_seconds)
        self.model, self.data = model, cfg
        self.trained_data = dict(data or {})  # the checkpoint's own settings (what it was trained with)
        self.tokenizer, self.info = load_tokenizer(int(cfg["tokenizer_vocab_size"]), cfg["tokenizer_cache_dir"])
        self._prompt_encoder = EncodingCache(self.tokenizer)  # prompts repeat their text runs clip after clip
        mc, info = model.config, self.info
        want = (info.image_pad_id, info.video_pad_id, info.vision_start_id, info.vision_end_id)
        have = (mc.image_token_id, mc.video_token_id, mc.vision_start_token_id, mc.vision_end_token_id)
        if a.enabled:
            want += (info.audio_bos_id, info.audio_id, info.audio_eos_id)
            have += (a.audio_bos_token_id, a.audio_token_id, a.audio_eos_token_id)
        if want != have:
            raise ValueError(f"the checkpoint's special token ids {have} (image, video, start, end[, audio bos, "
                             f"audio, audio eos]) differ from the tokenizer's {want} for vocab "
                             f"{cfg['tokenizer_vocab_size']}")
        self.processor = SampleProcessor(cfg)

    @classmethod
    def from_checkpoint(cls, ckpt: str, overrides: dict[str, Any] | None = None, dtype: Any = None,
                        mesh: Any = None) -> "Session":
        """Loads one of our model directories (``emoqwen-convert from-hf`` or the trainer writes them).

        ``mesh``: shard the parameters over this mesh (a multi-host run's; then every process must make the
        same calls with the same inputs); None puts them on one local device."""
        from emoqwen_jax.model_dir import load_model, read_model_config

        if not storage.isdir(ckpt):
            raise FileNotFoundError(f"--ckpt {ckpt} is not a directory")
        _, meta = read_model_config(ckpt)
        return cls(load_model(ckpt, dtype=dtype, mesh=mesh), meta.get("data"), overrides)

    def sampling(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0) -> SamplingConfig:
        """Sampling settings that stop at ``<|im_end|>``/``<|endoftext|>`` and pad with the tokenizer's pad."""
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              stop_ids=tuple(self.info.stop_ids), pad_id=self.info.pad_id)

    def _medium(self, kind: str, path: str) -> tuple[dict[str, np.ndarray], list[tuple]]:
        """One file -> its arrays and its placeholder's token blocks (clip, face canvas, the clip's audio when
        the model has an audio encoder), exactly as training builds them."""
        if kind not in MEDIA_KINDS:
            raise ValueError(f"media kind {kind!r}; valid: {MEDIA_KINDS}")
        if kind == "audio" and not self.model.config.audio.enabled:
            raise ValueError("an audio file was given but this checkpoint has no audio encoder "
                             "(model.audio.enabled=False)")
        # raises data.reasons.Rejected for unreadable media
        arrays, blocks = self.processor.media_arrays([{"kind": kind, "path": path}], self.info)
        keep = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        keep += _AUDIO_KEYS if self.model.config.audio.enabled else ()
        return {k: v for k, v in arrays.items() if k in keep}, blocks[0]

    def prompt(self, text: str, media: Sequence[tuple[str, str]] = (), subtitle: str | None = None) -> Prompt:
        """A user question about ``media`` [(kind, path)] -> the generation prompt.

        Each medium's placeholder goes first, in the given order, unless ``text`` already holds
        ``<video>``/``<image>``/``<audio>`` placeholders (a clip's own audio needs none: with an audio encoder it
        follows the clip's vision block); a subtitle is appended as training does ("\\nSubtitle: …").
        """
        for kind, path in media:
            if not storage.isfile(path):
                raise FileNotFoundError(f"{kind} file {path} does not exist")
        parts = [self._medium(kind, path) for kind, path in media]
        if not any(f"<{kind}>" in text for kind in MEDIA_KINDS):
            text = "".join(f"<{kind}>\n" for kind, _ in media) + text
        if subtitle:
            text += "\nSubtitle: " + subtitle
        ids = prompt_ids([{"role": "user", "content": text}], [blocks for _, blocks in parts],
                         self._prompt_encoder, self.info, system_prompt=self.data["system_prompt"],
                         max_length=int(self.data["max_length"]))
        vision = batch_vision([v for v, _ in parts])
        return Prompt(np.asarray(ids, np.int32), {k: v for k, v in vision.items() if v is not None})

    def generate_ids(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int = 0,
                     keep_stop: bool = False) -> list[list[int]]:
        """Generated ids (the stop id removed unless ``keep_stop``) for a batch of prompts, bucketed to the
        configured shapes."""
        length = _bucket(max(len(p.input_ids) for p in prompts), self.data["length_buckets"], 256)
        ids, mask = left_pad([p.input_ids for p in prompts], self.info.pad_id, length)
        vision = batch_vision([p.vision for p in prompts])
        patches = sum(len(vision[k]) for k in ("pixel_values", "pixel_values_videos") if vision[k] is not None)
        items = sum(len(vision[k]) for k in ("image_grid_thw", "video_grid_thw") if vision[k] is not None)
        buckets = {}
        if patches:
            # The ViT's segment-masked attention costs ~patches², so pad to the smaller of the training bucket
            # and the next multiple of PATCH_STEP (the demo eval ran 4.5x faster than with buckets alone).
            padded = min(_bucket(patches, self.data["patch_buckets"], PATCH_STEP), _bucket(patches, (), PATCH_STEP))
            buckets = dict(pad_patches_to=padded,
                           pad_items_to=1 << (items - 1).bit_length())
        vision = pad_audio_windows(vision, self.data["audio"]["window_buckets"])
        out = generate(self.model, ids, mask, sampling=sampling, rng=seed, **vision, **buckets)
        return [out.row(b, keep_stop) for b in range(len(prompts))]

    def decode(self, ids: Sequence[int]) -> str:
        vocab = self.tokenizer.get_vocab_size()
        return self.tokenizer.decode([i for i in ids if i < vocab], skip_special_tokens=True)

    def answer(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int = 0) -> list[str]:
        return [self.decode(ids) for ids in self.generate_ids(prompts, sampling, seed)]


PIXEL_RANGE_FACTOR = 2.0  # a range this many times beyond the trained one counts as "far outside"


def pixel_range_warning(session: Session) -> str | None:
    """A warning when the session's pixel budgets put frames (or images) far outside the range the checkpoint
    was trained on (its ``config.json`` meta.data), naming the ``--set`` flags that restore it; else None.

    Far outside: the whole session range lies above PIXEL_RANGE_FACTOR × the trained maximum or below the
    trained minimum / PIXEL_RANGE_FACTOR (every frame is then resized to a grid size the model never saw; the
    demo checkpoint, trained on 112-px frames, scores far lower at the standard 128·28² minimum)."""
    problems, flags = [], []
    for kind in ("video", "image"):
        lo_key, hi_key = f"{kind}_min_pixels", f"{kind}_max_pixels"
        trained = session.trained_data
        if lo_key not in trained or hi_key not in trained:
            continue
        lo, hi = int(session.data[lo_key]), int(session.data[hi_key])
        t_lo, t_hi = int(trained[lo_key]), int(trained[hi_key])
        if lo > PIXEL_RANGE_FACTOR * t_hi or hi * PIXEL_RANGE_FACTOR < t_lo:
            problems.append(f"{kind} frames at {lo:,}-{hi:,} pixels, but the checkpoint was trained on "
                            f"{t_lo:,}-{t_hi:,}")
            flags += [f"--set {lo_key}={t_lo}", f"--set {hi_key}={t_hi}"]
    if not problems:
        return None
    return ("these settings put " + "; ".join(problems) + " (config.json meta.data): answers and scores will "
            "suffer. To use the trained range: " + " ".join(flags))
