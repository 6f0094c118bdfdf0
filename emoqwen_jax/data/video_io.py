"""PyAV video decoding: count frames, then seek to and decode only the frames sampling asks for.

A clip is read in two passes. The first demuxes packets without decoding to get each frame's timestamp
(so the frame count is what the file really holds, not what a possibly truncated header claims). The second
seeks to the keyframe before each wanted frame when it is far ahead and decodes forward to it; only wanted
frames are converted to RGB. Every failure becomes a ``Rejected`` with a named reason.

``MediaFile`` opens a clip once for both its frames and its audio track: the first pass also keeps the audio
stream's packets, which ``audio.read_audio`` decodes (the same packets in the same order as a second open would
demux, so the same samples).
"""

from __future__ import annotations

import io
import math
import os
from typing import Callable, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.runtime import storage

# Decoding forward is cheaper than seeking when the next wanted frame is this close (in frames).
_SEEK_GAP = 16
# Frames up to this many pixels decode in single-threaded mode: starting the decoder's threads costs several
# times a small clip's whole decode, and an evaluation already builds several prompts at once on the cores.
# H.264 and the other codecs decode bit-exactly either way.
_THREADED_DECODE_PIXELS = 320 * 240


def _open(source: str | bytes | os.PathLike, reason: str = "corrupt_video") -> av.container.InputContainer:
    """Opens a path or in-memory bytes; raises Rejected('missing_file'|``reason``) (the audio reader passes
    'corrupt_audio')."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(source))
    else:
        if not storage.isfile(source):
            raise Rejected("missing_file", str(source))
        stream = os.fspath(source)
        if storage.is_uri(stream):  # remote clip (gs://…): its bytes in memory, PyAV seeks in them
            with storage.open(stream, "rb") as f:
                stream = io.BytesIO(f.read())
    try:
        return av.open(stream, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise Rejected(reason, f"cannot open: {e}") from None


class VideoInfo:
    """Frame timestamps of the first video stream: ``pts`` int64[N] sorted, ``fps`` float."""

    def __init__(self, pts: np.ndarray, fps: float):
        self.pts = pts
        self.fps = fps

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])


def probe(container: av.container.InputContainer, audio_packets: list | None = None,
          audio_seconds: float = math.inf) -> VideoInfo:
    """Demuxes (no decoding) to list every frame's pts; raises Rejected for unusable streams. With
    ``audio_packets`` (a list), the first audio stream's packets that start within ``audio_seconds`` (and its
    flush packet) are appended to it in the same pass."""
    if not container.streams.video:
        raise Rejected("zero_frames", "the container holds no video stream (no frames)")
    stream = container.streams.video[0]
    streams, audio_end = [stream], math.inf  # audio_end: audio_seconds in the audio stream's time base
    if audio_packets is not None and container.streams.audio:
        streams.append(container.streams.audio[0])
        time_base = container.streams.audio[0].time_base
        audio_end = audio_seconds / float(time_base) if time_base else math.inf
    pts = []
    try:
        for p in container.demux(streams):
            if p.stream.index != stream.index:
                if p.pts is None or p.pts <= audio_end:
                    audio_packets.append(p)
            elif p.pts is not None and p.size > 0:
                pts.append(p.pts)
    except av.error.FFmpegError as e:
        raise Rejected("corrupt_video", f"demux failed: {e}") from None
    if stream.frames and len(pts) < stream.frames:
        # The header promises more frames than the file holds: a truncated download or copy.
        raise Rejected("corrupt_video", f"truncated: header says {stream.frames} frames, file holds {len(pts)}")
    if not pts:
        raise Rejected("zero_frames", "no video packets")
    pts_arr = np.unique(np.asarray(pts, dtype=np.int64))  # sorted; B-frames arrive out of order
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        span = float((pts_arr[-1] - pts_arr[0]) * stream.time_base) if pts_arr.size > 1 else 0.0
        fps = (pts_arr.size - 1) / span if span > 0 else 1.0
    return VideoInfo(pts_arr, fps)


def decode_frames(container: av.container.InputContainer, info: VideoInfo, indices: Sequence[int]) -> np.ndarray:
    """Decodes the frames at ``indices`` (sorted, may repeat) → uint8[T, H, W, 3] RGB.

    Raises Rejected('corrupt_video') when a wanted frame cannot be decoded (truncated or damaged data).
    """
    stream = container.streams.video[0]
    if stream.width * stream.height > _THREADED_DECODE_PIXELS:
        stream.thread_type = "AUTO"
    else:
        stream.thread_count = 1
    # One single-threaded converter for the clip: ``frame.to_ndarray(format=...)`` makes a converter per frame
    # whose automatic thread pool costs many times the conversion of a small frame; the pixels are the same.
    to_rgb = VideoReformatter()
    wanted = [int(info.pts[i]) for i in indices]
    out: dict[int, np.ndarray] = {}
    pos = -1  # rank (in info.pts) of the last decoded frame
    frames_iter = None
    try:
        for rank, target in zip(indices, wanted, strict=True):
            if target in out:
                continue
            if frames_iter is None or rank - pos > _SEEK_GAP or rank <= pos:
                # Seek lands on the keyframe at or before target; decode forward from there.
                container.seek(target, stream=stream, backward=True, any_frame=False)
                frames_iter = container.decode(stream)
            for frame in frames_iter:
                if frame.pts is None:
                    continue
                pos = int(np.searchsorted(info.pts, frame.pts))
                if frame.pts >= target:
                    out[target] = to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
                    break
            else:
                frames_iter = None
            if target not in out:
                raise Rejected("corrupt_video", f"frame {rank} of {info.num_frames} did not decode")
    except (av.error.FFmpegError, ValueError, MemoryError) as e:
        raise Rejected("corrupt_video", f"decode failed: {e}") from None
    shapes = {a.shape for a in out.values()}
    if len(shapes) != 1:
        raise Rejected("corrupt_video", f"frame sizes change inside the clip: {sorted(shapes)}")
    return np.stack([out[t] for t in wanted])


class MediaFile:
    """A clip opened once for its frames and its audio track (``with MediaFile(source) as clip``): pass ``clip``
    as the source of ``read_video`` (whose probe keeps the audio packets in ``audio_packets``), then of
    ``audio.read_audio``. Raises Rejected('missing_file'|'corrupt_video') as ``read_video`` would.

    ``audio_seconds``: audio packets starting later are not kept (a second past the reader's ``max_seconds``
    is enough for it to reject a too-long track, and a ten-hour film's audio never sits in memory)."""

    def __init__(self, source: str | bytes | os.PathLike, audio_seconds: float = math.inf):
        self.source = source
        self.audio_seconds = audio_seconds
        self.container = _open(source)
        self.audio_packets: list | None = None  # the first audio stream's packets once probed

    def __enter__(self) -> "MediaFile":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()


def read_video(source: str | bytes | os.PathLike | MediaFile,
               choose_indices: Callable[[int, float], np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Opens ``source`` (or reads an open ``MediaFile``), picks frame indices with
    ``choose_indices(num_frames, fps)``, decodes them.

    Returns (frames uint8[T, H, W, 3], indices int64[T], video fps).
    """
    if isinstance(source, MediaFile):
        source.audio_packets = []
        return _read_frames(source.container, choose_indices, source.audio_packets, source.audio_seconds)
    container = _open(source)
    try:
        return _read_frames(container, choose_indices)
    finally:
        container.close()


def _read_frames(container: av.container.InputContainer, choose_indices: Callable[[int, float], np.ndarray],
                 audio_packets: list | None = None, audio_seconds: float = math.inf
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    info = probe(container, audio_packets, audio_seconds)
    indices = np.asarray(choose_indices(info.num_frames, info.fps), dtype=np.int64)
    return decode_frames(container, info, indices.tolist()), indices, info.fps


def write_video(path: str | os.PathLike | io.BytesIO, frames: np.ndarray, fps: float, *, codec: str = "libx264",
                gop: int = 12, faststart: bool = False) -> None:
    """uint8[T, H, W, 3] RGB → an mp4 (H, W even for yuv420p; T may be 0). For the demo set, tests, bench."""
    from fractions import Fraction  # noqa: PLC0415

    container = av.open(path, mode="w", format="mp4", options={"movflags": "faststart"} if faststart else {})
    try:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        container.start_encoding()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
