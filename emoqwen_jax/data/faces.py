"""Facial Emotion Capture: detect faces, paste the crops at their places on a blank canvas, fuse with frames.

The release does not say which detector or fusion it used (docs/design.md, Facial Emotion Capture: what the
release leaves open), so both are configurable:
- detector (``config.data.faces.detector``): 'haar' — OpenCV's frontal-face Haar cascade, whose XML ships
  inside opencv-python-headless 4.x, so nothing is downloaded. Others plug in with ``register_detector``
  (e.g. MTCNN from facenet-pytorch where it installs; it cannot beside our torch pin).
- fusion (``config.data.faces.fusion``): 'none' (frames only) or 'extra' — the canvas frames become an extra
  visual input processed like the clip; its vision tokens follow the frame tokens inside the same
  placeholder (one more grid in ``video_grid_thw``/``image_grid_thw``).
A frame with no detected face passes through unchanged as its own canvas, so the extra input never goes
blank when the detector misses.

Shapes: frames uint8[T, H, W, 3] RGB; boxes int32[N, 4] as (x, y, w, h) in pixels.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Protocol

import numpy as np

FUSIONS = ("none", "extra")


class FaceDetector(Protocol):
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """uint8[H, W, 3] RGB → int32[N, 4] boxes (x, y, w, h)."""


class HaarDetector:
    """OpenCV Haar cascade (``haarcascade_frontalface_default.xml`` from ``cv2.data.haarcascades``)."""

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24, max_side: int = 0):
        import cv2  # noqa: PLC0415 — workers import it only when faces are on

        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade {path}; opencv-python-headless must be 4.x")
        self._cv2 = cv2
        self._lock = threading.Lock()
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self.max_side = max_side

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        cv2 = self._cv2
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        # Detecting on a downscaled frame costs (max_side / side)² of the time; boxes are scaled back.
        scale = min(1.0, self.max_side / max(gray.shape)) if self.max_side else 1.0
        if scale < 1.0:
            gray = cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
                              interpolation=cv2.INTER_AREA)
        min_size = max(1, round(self.min_size * scale))
        with self._lock:  # a CascadeClassifier is not thread-safe (emoqwen-data check maps samples on threads)
            boxes = self._cascade.detectMultiScale(gray, self.scale_factor, self.min_neighbors,
                                                   minSize=(min_size, min_size))
        return np.round(np.asarray(boxes, np.float64).reshape(-1, 4) / scale).astype(np.int32)


_DETECTORS: dict[str, Callable[..., FaceDetector]] = {"haar": HaarDetector}


def register_detector(name: str, factory: Callable[..., FaceDetector]) -> None:
    """Makes ``config.data.faces.detector = name`` build
    ``factory(scale_factor=, min_neighbors=, min_size=, max_side=)``."""
    _DETECTORS[name] = factory


@functools.lru_cache(maxsize=4)
def make_detector(name: str = "haar", scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24,
                  max_side: int = 0) -> FaceDetector:
    """One detector per process and setting (cascades do not pickle, so grain workers build their own)."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; registered: {sorted(_DETECTORS)}")
    return _DETECTORS[name](scale_factor=scale_factor, min_neighbors=min_neighbors, min_size=min_size,
                            max_side=max_side)


def face_canvas(frame: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Blank (black) canvas of the frame's size with each face crop, grown by ``margin``, at its place."""
    canvas = np.zeros_like(frame)
    h, w = frame.shape[:2]
    for x, y, bw, bh in np.asarray(boxes).reshape(-1, 4):
        dx, dy = int(round(bw * margin)), int(round(bh * margin))
        x0, y0 = max(0, x - dx), max(0, y - dy)
        x1, y1 = min(w, x + bw + dx), min(h, y + bh + dy)
        canvas[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
    return canvas


def capture_faces(frames: np.ndarray, detector: FaceDetector, *, margin: float = 0.0,
                  detect_every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """uint8[T, H, W, 3] → (canvases uint8[T, H, W, 3], found bool[T]).

    The detector runs on every ``detect_every``-th frame; frames in between reuse its boxes (faces move
    little between sampled frames). A frame without a face is its own canvas (pass-through).
    """
    canvases = np.empty_like(frames)
    found = np.zeros(len(frames), bool)
    boxes = np.zeros((0, 4), np.int32)
    for i, frame in enumerate(frames):
        if i % max(1, detect_every) == 0:
            boxes = detector(frame)
        found[i] = len(boxes) > 0
        canvases[i] = face_canvas(frame, boxes, margin) if found[i] else frame
    return canvases, found


def detector_from_config(faces_cfg: Any) -> FaceDetector:
    return make_detector(faces_cfg.get("detector", "haar"), float(faces_cfg.get("scale_factor", 1.1)),
                         int(faces_cfg.get("min_neighbors", 5)), int(faces_cfg.get("min_size", 24)),
                         int(faces_cfg.get("detect_max_side", 0)))
