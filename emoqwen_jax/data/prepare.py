"""Prepared datasets: a manifest + its media → one TFDS array_record dataset, read back with random access.

Each example holds the record's annotation (JSON: id, conversations, subtitle, label, media kinds and their
original relative names) and the encoded media bytes (mp4/png/… as stored; decoded later by PyAV/PIL), so a
training host needs no data root and no small-file I/O. No TensorFlow is involved: the features are object
tensors and TFDS writes and reads array_record through its numpy paths (docs/design.md, TFDS array_record
without TensorFlow).

Layout: ``OUT/emoqwen_prepared/1.0.0/emoqwen_prepared-<split>.array_record-*``, ``dataset_info.json``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import grain
import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from emoqwen_jax.data.reasons import RejectCounter
from emoqwen_jax.runtime import storage

BUILDER_NAME = "emoqwen_prepared"


class EmoqwenPrepared(tfds.core.GeneratorBasedBuilder):
    """Examples ``{"annotation": json str, "media": [bytes, …]}``; records come in through the constructor."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "annotation JSON + encoded media bytes"}
    # TFDS looks for a checksums file beside the builder's code, probing the package with
    # `importlib_resources` (not installed, not needed): there are no downloads, so there is no code path.
    code_path = None

    def __init__(self, *, records: Iterable[dict[str, Any]] = (), split: str = "train", counter=None, **kwargs):
        self._records = records
        self._split = split
        self._counter = counter
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
            "annotation": tfds.features.Tensor(shape=(), dtype=np.object_),
            "media": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        counter = self._counter if self._counter is not None else RejectCounter()
        for k, rec in enumerate(tqdm(self._records, desc="prepare", unit="sample")):
            if "rejected" in rec:
                counter.add_rejected(rec["rejected"], rec["id"], rec.get("detail", ""))
                continue
            blobs, missing = [], None
            for m in rec["media"]:
                if not storage.isfile(m["path"]):
                    missing = m["path"]
                    break
                with storage.open(m["path"], "rb") as f:
                    blobs.append(f.read())
            if missing:
                counter.add_rejected("missing_file", rec["id"], missing)
                continue
            annotation = {k2: v for k2, v in rec.items() if k2 != "media"}
            annotation["media"] = [{"kind": m["kind"], "name": storage.basename(m["path"])} for m in rec["media"]]
            counter.add_ok()
            yield k, {"annotation": json.dumps(annotation, ensure_ascii=False), "media": blobs}


def prepare_dataset(records: Iterable[dict[str, Any]], out_dir: str, *, split: str = "train") -> dict[str, Any]:
    """Writes ``records`` to a TFDS array_record dataset under ``out_dir``; returns the reject summary."""
    counter = RejectCounter()
    builder = EmoqwenPrepared(records=list(records), split=split, counter=counter, data_dir=out_dir,
                              file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    return counter.summary()


def _decode(example: dict[str, Any]) -> dict[str, Any]:
    annotation = example["annotation"]
    rec = json.loads(annotation.decode("utf-8") if isinstance(annotation, bytes) else annotation)
    rec["media"] = [{"kind": m["kind"], "name": m["name"], "bytes": bytes(b)}
                    for m, b in zip(rec["media"], example["media"], strict=True)]
    return rec


def load_prepared(out_dir: str, *, split: str = "train") -> grain.MapDataset:
    """Random-access records (``media[k]["bytes"]`` instead of paths) from a prepared dataset."""
    path = storage.join(out_dir, BUILDER_NAME)  # TFDS reads gs:// itself (etils.epath)
    if not storage.isdir(path):
        raise FileNotFoundError(f"no prepared dataset under {out_dir} (expected {path}); run `emoqwen-data prepare`")
    versions = [v for v in storage.listdir(path) if storage.isfile(storage.join(path, v, "dataset_info.json"))]
    if not versions:
        raise FileNotFoundError(f"{path} has no finished version (an interrupted prepare?)")
    builder = tfds.builder_from_directory(storage.join(path, versions[-1]))
    return grain.MapDataset.source(builder.as_data_source(split=split)).map(_decode)
