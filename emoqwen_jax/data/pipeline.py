"""The grain pipeline: records → shuffled, processed, filtered, bucket-padded batches.

Order (per host)::

    records (one MapDataset per manifest or prepared dataset)
      → shard: this host's records[shard_index::shard_count]   (disjoint hosts; pass jax.process_index())
      → shuffle(seed), reshuffled each epoch → repeat(num_epochs)
      → mix(weights) when several sources (stage 1 mixes general and emotion data)
      → map(SampleProcessor) — decode, resize, tokenize; in `worker_count` processes when > 0
      → count & drop rejected (RejectCounter: reasons, once-per-reason warnings, max_reject_fraction)
      → batch(batch_size) padding to length and patch buckets

Every stage is a grain dataset, so ``iterator.get_state()``/``set_state()`` (or grain's orbax handler) resume
exactly, rejection counts included.

Batch (B = batch_size, Lb = the smallest length bucket ≥ the longest sample, Pb = the smallest patch bucket ≥
the batch's patch rows, or 0 when the batch has none of that modality)::

    id                   str[B]           "" for filler rows
    sample_mask          bool[B]          False for filler rows of a padded last batch
    input_ids            int32[B, Lb]     right-padded with TokenizerInfo.pad_id (not a real token)
    attention_mask       int32[B, Lb]     1 real token, 0 padding
    labels               int32[B, Lb]     assistant tokens, −100 elsewhere and on padding; aligned with
                                          input_ids (unshifted, as HF: logits[:, i−1] predict labels[:, i])
    pixel_values         float32[Pb, 1176]   all images of the batch in row order, zero rows after
    image_grid_thw       int32[n_img, 3]     host metadata (unpadded): one row per image
    image_sample_index   int32[n_img]        batch row each image belongs to
    pixel_values_videos  float32[Pb, 1176]   likewise for videos
    video_grid_thw       int32[n_vid, 3]
    video_sample_index   int32[n_vid]
    second_per_grid_ts   float32[n_vid]
    segment_ids          int32[B, Lb]        only with ``packing``: 1, 2, ... per sample of the row, 0 padding
    input_features       float32[Wb, M, Fw]  audio encoder windows of the batch in row order, zero windows
                                             after (Wb: the smallest data.audio.window_buckets entry that fits)
    feature_attention_mask int32[Wb, Fw]     1 = a frame of real audio
    audio_lengths        int32[n_aud, 2]     host metadata: (windows, tokens) of each audio, row order

With ``packing`` (``emoqwen_jax.data.packing``) a row holds several samples (up to the bucket of
``max_length`` tokens), its ``id`` their ids joined by ``,``; ``*_sample_index`` still name the batch row.

The grids stay unpadded on the host: ``emoqwen_jax.layout`` turns them into fixed-shape index arrays.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import grain
import numpy as np

from emoqwen_jax.data.packing import PackRows
from emoqwen_jax.data.process import PATCH_DIM, SampleProcessor
from emoqwen_jax.data.reasons import RejectCounter
from emoqwen_jax.data.tokenizer import tokenizer_info
from emoqwen_jax.tokens import IGNORE


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket ≥ n; past the largest, the next multiple of the largest (still few shapes)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    top = int(max(buckets))
    return -(-n // top) * top


class Collate:
    """List of samples → one padded batch (see the module docstring). Picklable."""

    def __init__(self, batch_size: int, length_buckets: Sequence[int], patch_buckets: Sequence[int], pad_id: int,
                 window_buckets: Sequence[int] = (1,)):
        self.batch_size = int(batch_size)
        self.window_buckets = tuple(int(b) for b in window_buckets)
        self.length_buckets = tuple(int(b) for b in length_buckets)
        self.patch_buckets = tuple(int(b) for b in patch_buckets)
        self.pad_id = int(pad_id)

    def _pixels(self, rows: list[np.ndarray]) -> np.ndarray:
        n = sum(r.shape[0] for r in rows)
        out = np.zeros((bucket(n, self.patch_buckets) if n else 0, PATCH_DIM), np.float32)
        if n:
            out[:n] = np.concatenate(rows)
        return out

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        b = self.batch_size
        length = bucket(max(len(s["input_ids"]) for s in samples), self.length_buckets)
        batch = {
            "id": np.array([s["id"] for s in samples] + [""] * (b - len(samples))),
            "sample_mask": np.arange(b) < len(samples),
            "input_ids": np.full((b, length), self.pad_id, np.int32),
            "attention_mask": np.zeros((b, length), np.int32),
            "labels": np.full((b, length), IGNORE, np.int32),
        }
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            batch["input_ids"][i, :n] = s["input_ids"]
            batch["attention_mask"][i, :n] = s["attention_mask"]
            batch["labels"][i, :n] = s["labels"]
        if "segment_ids" in samples[0]:  # packed rows (data.packing.merge_row)
            batch["segment_ids"] = np.zeros((b, length), np.int32)
            for i, s in enumerate(samples):
                batch["segment_ids"][i, : len(s["segment_ids"])] = s["segment_ids"]
        for pix, grid, index in (("pixel_values", "image_grid_thw", "image_sample_index"),
                                 ("pixel_values_videos", "video_grid_thw", "video_sample_index")):
            batch[pix] = self._pixels([s[pix] for s in samples])
            batch[grid] = np.concatenate([s[grid] for s in samples]).astype(np.int32).reshape(-1, 3)
            batch[index] = np.concatenate([np.full(len(s[grid]), i, np.int32) for i, s in enumerate(samples)])
        batch["second_per_grid_ts"] = np.concatenate([s["second_per_grid_ts"] for s in samples]).astype(np.float32)
        if "input_features" in samples[0]:
            batch.update(audio_batch(samples, self.window_buckets))
        return batch


def audio_batch(samples: Sequence[dict[str, Any]], window_buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """The samples' audio windows, concatenated in row order and zero-padded to a window bucket."""
    feats = np.concatenate([s["input_features"] for s in samples])
    masks = np.concatenate([s["feature_attention_mask"] for s in samples])
    n = feats.shape[0]
    w = bucket(n, window_buckets) if n else 0
    out_f = np.zeros((w,) + feats.shape[1:], np.float32)
    out_m = np.zeros((w,) + masks.shape[1:], np.int32)
    out_f[:n], out_m[:n] = feats, masks
    lengths = np.concatenate([s["audio_lengths"] for s in samples]).astype(np.int32).reshape(-1, 2)
    return {"input_features": out_f, "feature_attention_mask": out_m, "audio_lengths": lengths}


class _CountRejectsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, counter: RejectCounter):
        super().__init__(parent)
        self.counter = counter

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                self.counter.check(final=True)  # a finite run ends with its verdict on the whole data
                raise
            if "rejected" in element:
                self.counter.add_rejected(element["rejected"], element["id"], element.get("detail", ""))
                continue
            self.counter.add_ok()
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "rejects": json.dumps(self.counter.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counter.set_state(json.loads(state["rejects"]))


class CountRejects(grain.IterDataset):
    """Drops rejection records, counting them in ``counter`` (checkpointed with the iterator state)."""

    def __init__(self, parent: grain.IterDataset, counter: RejectCounter | None, cfg: Any):
        super().__init__(parent)
        self._counter = counter
        self._limits = (float(cfg["max_reject_fraction"]), int(cfg["reject_check_after"]))

    def __iter__(self) -> _CountRejectsIterator:
        counter = self._counter or RejectCounter(*self._limits)
        return _CountRejectsIterator(self._parent.__iter__(), counter)


def as_records(source: Any) -> grain.MapDataset:
    """A list of records, a grain MapDataset of them, or a random-access source → MapDataset."""
    if isinstance(source, grain.MapDataset):
        return source
    return grain.MapDataset.source(source)


def load_sources(mixture: Sequence[Any]) -> list[tuple[Any, float]]:
    """``config.data.mixture`` entries → ``[(records, weight), …]`` for ``make_dataset``.

    An entry is ``{"manifest", "data_root", "format"?, "weight"?}`` or ``{"prepared", "split"?, "weight"?}``.
    """
    from emoqwen_jax.data.manifests import load_manifest  # noqa: PLC0415
    from emoqwen_jax.data.prepare import load_prepared  # noqa: PLC0415

    sources = []
    for entry in mixture:
        entry = dict(entry)
        weight = float(entry.get("weight", 1.0))
        if entry.get("prepared"):
            sources.append((load_prepared(entry["prepared"], split=entry.get("split", "train")), weight))
        elif entry.get("manifest") and entry.get("data_root"):
            sources.append((load_manifest(entry["manifest"], entry["data_root"], entry.get("format", "auto")),
                            weight))
        else:
            raise ValueError(f"mixture entry {entry} needs 'prepared' or 'manifest' + 'data_root'")
    if not sources:
        raise ValueError("config.data.mixture is empty")
    return sources


def make_sample_dataset(sources: Sequence[tuple[Any, float]] | Any, cfg: Any, *, shard_index: int = 0,
                        shard_count: int = 1, counter: RejectCounter | None = None,
                        num_epochs: int | None = None) -> grain.IterDataset:
    """The processed samples (one dict per record, ``SampleProcessor``'s output, rejections counted and dropped)
    for ``sources`` (``[(records, weight), …]`` or one records source), before batching.

    ``cfg`` is ``config.data``. ``counter`` receives the rejection counts (pass one to read them as metrics;
    it must then serve a single iterator). ``num_epochs`` overrides ``cfg.num_epochs`` (−1/None = forever).
    With several sources each repeats forever and the mixture follows the weights."""
    if not (0 <= shard_index < shard_count):
        raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    if not isinstance(sources, (list, tuple)) or not sources or not isinstance(sources[0], tuple):
        sources = [(sources, 1.0)]
    epochs = cfg["num_epochs"] if num_epochs is None else num_epochs
    epochs = None if epochs is None or epochs < 0 or len(sources) > 1 else int(epochs)
    parts = []
    for k, (records, _) in enumerate(sources):
        ds = as_records(records)[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(f"source {k} has no records for shard {shard_index} of {shard_count}")
        parts.append(ds.shuffle(seed=int(cfg["shuffle_seed"]) + k).repeat(epochs))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [float(w) for _, w in sources])
    it = ds.to_iter_dataset().map(SampleProcessor(cfg))
    if int(cfg["worker_count"]) > 0:
        from absl import flags  # noqa: PLC0415

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; unparsed flags crash them (grain bug)
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg["worker_count"]),
                                                         per_worker_buffer_size=int(cfg["worker_buffer_size"])))
    return CountRejects(it, counter, cfg)


def make_dataset(sources: Sequence[tuple[Any, float]] | Any, cfg: Any, *, shard_index: int = 0,
                 shard_count: int = 1, counter: RejectCounter | None = None,
                 num_epochs: int | None = None) -> grain.IterDataset:
    """The batched grain IterDataset for ``sources``: ``make_sample_dataset``'s samples (same arguments) in
    padded batches (``Collate``). ``cfg.packing`` packs several samples per row (``emoqwen_jax.data.packing``).
    """
    if max(cfg["length_buckets"]) < cfg["max_length"]:
        raise ValueError(f"the largest length bucket {max(cfg['length_buckets'])} < max_length {cfg['max_length']}")
    it = make_sample_dataset(sources, cfg, shard_index=shard_index, shard_count=shard_count, counter=counter,
                             num_epochs=num_epochs)
    info = tokenizer_info(int(cfg["tokenizer_vocab_size"]))
    collate = Collate(cfg["batch_size"], cfg["length_buckets"], cfg["patch_buckets"], info.pad_id,
                      cfg.get("audio", {}).get("window_buckets", (1,)))
    if cfg.get("packing", False):  # rows of several samples, up to the bucket that holds max_length
        capacity = bucket(int(cfg["max_length"]), cfg["length_buckets"])
        return PackRows(it, int(cfg["batch_size"]), capacity, bool(cfg["drop_remainder"])).map(collate)
    return it.batch(int(cfg["batch_size"]), drop_remainder=bool(cfg["drop_remainder"]), batch_fn=collate)


def make_iterator(sources: Sequence[tuple[Any, float]] | Any, cfg: Any, *, shard_index: int = 0,
                  shard_count: int = 1, num_epochs: int | None = None) -> tuple[grain.DatasetIterator, RejectCounter]:
    """(batch iterator, its RejectCounter). Checkpoint the iterator with grain's orbax handler."""
    counter = RejectCounter(float(cfg["max_reject_fraction"]), int(cfg["reject_check_after"]))
    ds = make_dataset(sources, cfg, shard_index=shard_index, shard_count=shard_count, counter=counter,
                      num_epochs=num_epochs)
    return iter(ds), counter
