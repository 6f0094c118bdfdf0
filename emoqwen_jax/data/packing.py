"""Sequence packing (``config.data.packing``): several processed samples per batch row, up to the row capacity.

Samples arrive in the pipeline's order and go, first fit, into the first of the ``batch_size`` rows with room
for them; the first sample that fits in no row closes the batch and opens the next one. A row is its samples
laid side by side (``merge_row``), with per-token ``segment_ids`` 1, 2, ... (one per sample; the collate pads
them with 0), so ``pipeline.Collate`` pads and buckets it like a single sample. Each sample keeps its own
tokens, labels and visual items (in row order), so:

  * the decoder attends only within a sample (causal AND same segment AND not padding);
  * M-RoPE positions restart per sample (``layout.get_rope_index`` with ``segment_ids``);
  * the labels are the samples' own; the loss never asks a sample to predict the next one's first token.

Resuming is exact: the state of a packing iterator is its parent's state *before* the sample that did not fit
(the one held for the next batch), so a restored iterator reads that sample again.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

Sample = dict[str, Any]

# Fields of a processed sample that are laid end to end in a packed row (tokens and visual items).
_CONCAT = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
           "video_grid_thw", "second_per_grid_ts")


def merge_row(samples: Sequence[Sample]) -> Sample:
    """The samples of one row as one sample: tokens, labels and visual items concatenated in order, ``id`` the
    samples' ids joined by ``,`` and ``segment_ids`` int32[n] (k + 1 on the tokens of the k-th sample)."""
    if not samples:
        raise ValueError("merge_row needs at least one sample")
    row: Sample = {"id": ",".join(str(s["id"]) for s in samples)}
    for key in _CONCAT:
        parts = [np.asarray(s[key]) for s in samples]
        if key.endswith("grid_thw"):
            parts = [p.reshape(-1, 3) for p in parts]
        row[key] = np.concatenate(parts)
    row["segment_ids"] = np.concatenate([np.full(len(s["input_ids"]), k + 1, np.int32)
                                         for k, s in enumerate(samples)])
    return row


class _PackRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, capacity: int, drop_remainder: bool):
        super().__init__(parent)
        self.batch_size, self.capacity, self.drop_remainder = batch_size, capacity, drop_remainder
        self._held: tuple[Sample, Any] | None = None  # (the sample opening the next batch, parent state before it)

    def __next__(self) -> list[Sample]:
        rows: list[list[Sample]] = [[] for _ in range(self.batch_size)]
        used = [0] * self.batch_size
        while True:
            if self._held is not None:
                sample, state = self._held
                self._held = None
            else:
                state = self._parent.get_state()
                try:
                    sample = next(self._parent)
                except StopIteration:
                    filled = [merge_row(r) for r in rows if r]
                    if not filled or (self.drop_remainder and len(filled) < self.batch_size):
                        raise
                    return filled
            n = len(sample["input_ids"])
            if n > self.capacity:
                raise ValueError(f"sample {sample['id']!r} has {n} tokens, more than the packed row capacity "
                                 f"{self.capacity} (raise max_length / length_buckets)")
            fits = [r for r in range(self.batch_size) if used[r] + n <= self.capacity]
            if not fits:
                self._held = (sample, state)
                return [merge_row(r) for r in rows]
            rows[fits[0]].append(sample)
            used[fits[0]] += n

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._held[1] if self._held is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held = None


class PackRows(grain.IterDataset):
    """Samples -> lists of ``batch_size`` packed rows (``merge_row`` samples) of at most ``capacity`` tokens;
    the last list may be shorter (dropped with ``drop_remainder``). ``pipeline.Collate`` turns one into a batch."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, capacity: int, drop_remainder: bool):
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"PackRows needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}")
        super().__init__(parent)
        self._args = (int(batch_size), int(capacity), bool(drop_remainder))

    def __iter__(self) -> _PackRowsIterator:
        return _PackRowsIterator(self._parent.__iter__(), *self._args)
