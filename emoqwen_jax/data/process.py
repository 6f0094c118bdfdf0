"""One record → one model sample (numpy, Hugging Face names), or a rejection record.

Sample (before batching; L text length, P patch rows, n grids; absent modalities have 0 rows)::

    id                    str
    input_ids             int32[L]
    labels                int32[L]   assistant tokens, −100 elsewhere
    attention_mask        int32[L]   all ones before padding
    pixel_values          float32[P_img, 1176]     image_grid_thw  int32[n_img, 3]
    pixel_values_videos   float32[P_vid, 1176]     video_grid_thw  int32[n_vid, 3]
    second_per_grid_ts    float32[n_vid]
    input_features        float32[W, M, Fw]  audio encoder windows (config.data.audio; W = 0 without audio)
    feature_attention_mask int32[W, Fw]      1 = a frame of real audio
    audio_lengths         int32[n_aud, 2]    (windows, audio tokens) of each audio, in text order

With ``config.data.audio.enabled`` a video's own audio track (the span of its sampled frames) becomes an audio
block right after its vision block; an ``audio`` medium (wav/flac/mp3…) becomes one in its placeholder's place.
A clip without an audio stream gets no audio block (counted in the log) unless the record has
``audio_required``, which rejects it ('no_audio').

``SampleProcessor`` is a module-level, picklable grain ``Map``: grain workers rebuild the tokenizer and the
face detector from the cache and the config on first use.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import grain
import numpy as np

from emoqwen_jax import layout
from emoqwen_jax.data import audio, faces, text, video_io, vision
from emoqwen_jax.data.reasons import Rejected, rejection
from emoqwen_jax.data.tokenizer import load_tokenizer

PATCH_DIM = vision.PATCH_DIM
log = logging.getLogger(__name__)
_CLIPS_WITHOUT_AUDIO = [0]  # per process; logged as it grows (grain workers each keep their own count)


def empty_vision() -> dict[str, np.ndarray]:
    return {
        "pixel_values": np.zeros((0, PATCH_DIM), np.float32), "image_grid_thw": np.zeros((0, 3), np.int32),
        "pixel_values_videos": np.zeros((0, PATCH_DIM), np.float32), "video_grid_thw": np.zeros((0, 3), np.int32),
        "second_per_grid_ts": np.zeros((0,), np.float32),
    }


def empty_audio(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    a = cfg.get("audio", {})
    mels, frames = int(a.get("num_mel_bins", 128)), int(a.get("window_frames", audio.N_FRAMES))
    return {"input_features": np.zeros((0, mels, frames), np.float32),
            "feature_attention_mask": np.zeros((0, frames), np.int32), "audio_lengths": np.zeros((0, 2), np.int32)}


def _canvas_patches(canvases: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Face canvases resized to the clip's own resized size and patchified the same way."""
    _, gh, gw = (int(x) for x in grid)
    return vision.to_patches(vision.resize_frames(canvases, gh * vision.PATCH_SIZE, gw * vision.PATCH_SIZE))[0]


def _frame_span(indices: np.ndarray, out: dict[str, np.ndarray]) -> tuple[float, float]:
    """Seconds [first sampled frame, end of the last one] of a clip, from the sampling that ``process_video``
    did (its ``second_per_grid_ts`` = 2 / sample_fps, sample_fps = n / (last + 1) · clip_fps)."""
    sample_fps = vision.TEMPORAL_PATCH_SIZE / float(out["second_per_grid_ts"][0])
    clip_fps = sample_fps * (int(indices[-1]) + 1) / len(indices)
    return float(indices[0]) / clip_fps, (float(indices[-1]) + 1.0) / clip_fps


class SampleProcessor(grain.transforms.Map):
    """record → sample dict, or ``{"rejected": reason, "id", "detail"}`` for bad input. ``cfg``: the data settings
    (``config.data``, or any mapping of the same fields; only read)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        fusion = self.cfg.get("faces", {}).get("fusion", "none")
        if fusion not in faces.FUSIONS:
            raise ValueError(f"config.data.faces.fusion={fusion!r}; valid: {faces.FUSIONS}")

    def tokenizer(self):
        return load_tokenizer(int(self.cfg["tokenizer_vocab_size"]), self.cfg.get("tokenizer_cache_dir", ""))

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        if "rejected" in record:
            return record
        try:
            return self.process(record)
        except Rejected as e:
            return rejection(record.get("id", "?"), e)

    def _media(self, medium: dict[str, Any]) -> Any:
        return medium["bytes"] if medium.get("bytes") is not None else medium["path"]

    def _opened(self, medium: dict[str, Any], use_audio: bool) -> contextlib.AbstractContextManager:
        """The medium's source for ``_vision`` and ``_audio``: a clip whose audio is wanted is opened once for
        both (``video_io.MediaFile``); anything else is its path or bytes."""
        if medium["kind"] == "video" and use_audio:
            return video_io.MediaFile(self._media(medium), float(self.cfg["audio"]["max_seconds"]) + 1.0)
        return contextlib.nullcontext(self._media(medium))

    def _vision(self, medium: dict[str, Any], source: Any) -> tuple[dict[str, np.ndarray],
                                                                     list[dict[str, np.ndarray]]]:
        """One medium (read from ``source``) → (its arrays, extra arrays for the face canvas when fusion is
        'extra')."""
        c = self.cfg
        use_faces = c.get("faces", {}).get("fusion", "none") == "extra"
        if medium["kind"] == "image":
            img = vision.load_image(source)
            out = vision.process_image(img, min_pixels=c["image_min_pixels"], max_pixels=c["image_max_pixels"],
                                       cfg=c)
            frames = np.asarray(img)[None]
            grid_key = "image_grid_thw"
        else:
            out = vision.process_video(source, fps=c["fps"], min_frames=c["min_frames"],
                                       max_frames=c["max_frames"], min_pixels=c["video_min_pixels"],
                                       max_pixels=c["video_max_pixels"], total_pixels=c.get("video_total_pixels"),
                                       cfg=c, return_frames=use_faces)
            frames = out.pop("frames", None)
            out["frame_span"] = _frame_span(out.pop("frame_indices"), out)
            grid_key = "video_grid_thw"
        extras = []
        if use_faces:
            fc = c["faces"]
            canvases, _ = faces.capture_faces(frames, faces.detector_from_config(fc), margin=fc.get("margin", 0.0),
                                              detect_every=fc.get("detect_every", 1))
            extra = dict(out)
            extra["pixel_values" if grid_key == "image_grid_thw" else "pixel_values_videos"] = _canvas_patches(
                canvases, out[grid_key][0])
            extras.append(extra)
        return out, extras

    def _audio(self, medium: dict[str, Any], source: Any, span: tuple[float, float] | None,
               required: bool) -> dict[str, np.ndarray] | None:
        """An audio medium, or a clip's track over ``span`` (seconds) → encoder windows; None: no audio."""
        a = self.cfg["audio"]
        wave = audio.read_audio(source, start=span[0] if span else 0.0, end=span[1] if span else None,
                                required=required or medium["kind"] == "audio", max_seconds=float(a["max_seconds"]))
        if wave is None:
            _CLIPS_WITHOUT_AUDIO[0] += 1
            log.info("clip %s has no audio stream: no audio tokens (%d such clips so far)", medium.get("path", "?"),
                     _CLIPS_WITHOUT_AUDIO[0])
            return None
        feats, mask, tokens = audio.encoder_windows(wave, num_mel_bins=int(a["num_mel_bins"]),
                                                    window_frames=int(a["window_frames"]))
        if tokens == 0:
            if medium["kind"] == "audio" or required:
                raise Rejected("corrupt_audio", f"{wave.shape[0]} samples: too short for one audio token")
            return None
        return {"input_features": feats, "feature_attention_mask": mask,
                "audio_lengths": np.asarray([[feats.shape[0], tokens]], np.int32)}

    def _interleaved(self, n_video: int, n_audio: int, out: dict[str, np.ndarray], info: Any) -> tuple:
        """The clip's block under the 'interleave' rule: its video and audio tokens in time-aligned chunks
        (``layout.audio``), as one raw id list."""
        spec = layout.AudioSpec(audio_token_id=info.audio_id, audio_bos_token_id=info.audio_bos_id,
                                      audio_eos_token_id=info.audio_eos_id,
                                      interleave_seconds=float(self.cfg["audio"]["interleave_seconds"]))
        chunks = layout.interleave_chunks(out["video_grid_thw"][0], float(out["second_per_grid_ts"][0]),
                                                n_audio, spec.interleave_seconds)
        assert sum(v for v, _ in chunks) == n_video
        return ([info.vision_start_id] + layout.interleaved_block(chunks, info.video_pad_id, spec)
                + [info.vision_end_id],)

    def process(self, record: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        media = record.get("media") or []
        kind = media[0]["kind"] if media else None
        turns = text.normalize_conversation(record.get("conversations"), len(media), kind)
        if record.get("subtitle"):
            first_user = next(t for t in turns if t["role"] == "user")
            first_user["content"] += "\nSubtitle: " + text.check_text(record["subtitle"], "subtitle")
        tok, info = self.tokenizer()
        arrays, blocks = self.media_arrays(media, info, bool(record.get("audio_required", False)))
        ids, labels = text.encode_conversation(turns, blocks, tok, info, system_prompt=c["system_prompt"],
                                               max_length=int(c["max_length"]))
        arrays.update(id=str(record["id"]), input_ids=ids, labels=labels,
                      attention_mask=np.ones_like(ids, dtype=np.int32))
        return arrays

    def media_arrays(self, media: list[dict[str, Any]], info: Any,
                     audio_required: bool = False) -> tuple[dict[str, np.ndarray], list[list[tuple]]]:
        """Media → their arrays (vision and audio, sample names) and each placeholder's token blocks for
        ``text.encode_conversation`` (the clip's grid, its face canvas, its audio). Inference builds prompts
        with it too, so a prompt is token for token what training saw."""
        c = self.cfg
        use_audio = bool(c.get("audio", {}).get("enabled", False))
        parts: dict[str, list[np.ndarray]] = {k: [v] for k, v in (empty_vision() | empty_audio(c)).items()}
        blocks = []
        for medium in media:
            with self._opened(medium, use_audio) as source:
                blocks.append(self._medium_parts(medium, source, info, audio_required, parts))
        # Skip the copy when one part holds all rows (the usual single clip): pixel arrays are tens of MB.
        return {k: (v[-1] if sum(len(x) > 0 for x in v) <= 1 and len(v[-1]) else np.concatenate(v))
                for k, v in parts.items()}, blocks

    def _medium_parts(self, medium: dict[str, Any], source: Any, info: Any, audio_required: bool,
                      parts: dict[str, list[np.ndarray]]) -> list[tuple]:
        """Appends one medium's arrays (read from ``source``) to ``parts``; returns its placeholder's blocks."""
        c = self.cfg
        use_audio = bool(c.get("audio", {}).get("enabled", False))
        block, span = [], None
        if medium["kind"] != "audio":
            out, extras = self._vision(medium, source)
            span = out.pop("frame_span", None)
            for arrays in [out] + extras:
                arrays.pop("frame_span", None)
                for k, v in arrays.items():
                    parts[k].append(v)
                grid_key = "image_grid_thw" if "image_grid_thw" in arrays else "video_grid_thw"
                pad = info.image_pad_id if grid_key == "image_grid_thw" else info.video_pad_id
                block.append((pad, text.num_vision_tokens(arrays[grid_key][0])))
        elif not use_audio:
            raise Rejected("placeholder_mismatch", "an audio sample, but config.data.audio.enabled is False")
        if use_audio and medium["kind"] != "image":
            sound = self._audio(medium, source, span, audio_required)
            if sound is not None:
                for k, v in sound.items():
                    parts[k].append(v)
                n = int(sound["audio_lengths"][0, 1])
                if medium["kind"] == "video" and c["audio"].get("position_rule", "text") == "interleave":
                    block[0] = self._interleaved(block[0][1], n, out, info)
                else:
                    block.append((info.audio_id, n, info.audio_bos_id, info.audio_eos_id))
        return block
