"""Raw clips, images and conversations → the arrays the model takes (numpy, PIL, PyAV, OpenCV, grain).

No model code is imported here; the model, trainer and CLI import from this package.

Entry points: ``process_image`` / ``process_video`` (vision), ``load_tokenizer`` (+ ``TokenizerInfo``),
``text.encode_conversation`` / ``text.prompt_ids`` (chat template), ``load_manifest`` (records),
``SampleProcessor`` (record → sample), ``make_dataset`` / ``make_iterator`` (grain batches), ``prepare_dataset`` /
``load_prepared`` (TFDS array_record), ``build_demo`` (smoke-test set), ``data_config`` (settings).
"""

import importlib
from typing import Any

# Public names -> their module, imported on first use: ``emoqwen_jax.data.tokenizer`` (or any one module) can be
# imported without starting the grain pipeline, decoders and face detector.
_EXPORTS = {
    "BENCHMARK_CLASSES": "emoqwen_jax.data.manifests",
    "Collate": "emoqwen_jax.data.pipeline",
    "REASONS": "emoqwen_jax.data.reasons",
    "RejectCounter": "emoqwen_jax.data.reasons",
    "Rejected": "emoqwen_jax.data.reasons",
    "SampleProcessor": "emoqwen_jax.data.process",
    "TokenizerInfo": "emoqwen_jax.data.tokenizer",
    "TooManyRejectsError": "emoqwen_jax.data.reasons",
    "benchmark_prompt": "emoqwen_jax.data.manifests",
    "build_demo": "emoqwen_jax.data.demo",
    "data_config": "emoqwen_jax.data.defaults",
    "load_manifest": "emoqwen_jax.data.manifests",
    "load_prepared": "emoqwen_jax.data.prepare",
    "load_sources": "emoqwen_jax.data.pipeline",
    "load_tokenizer": "emoqwen_jax.data.tokenizer",
    "make_dataset": "emoqwen_jax.data.pipeline",
    "make_iterator": "emoqwen_jax.data.pipeline",
    "prepare_dataset": "emoqwen_jax.data.prepare",
    "process_image": "emoqwen_jax.data.vision",
    "process_video": "emoqwen_jax.data.vision",
    "sample_indices": "emoqwen_jax.data.vision",
    "smart_nframes": "emoqwen_jax.data.vision",
    "smart_resize": "emoqwen_jax.data.vision",
    "tokenizer_info": "emoqwen_jax.data.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emoqwen_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "BENCHMARK_CLASSES", "Collate", "REASONS", "RejectCounter", "Rejected", "SampleProcessor", "TokenizerInfo",
    "TooManyRejectsError", "benchmark_prompt", "build_demo", "data_config", "load_manifest", "load_prepared", "load_sources",
    "load_tokenizer", "make_dataset", "make_iterator", "prepare_dataset", "process_image", "process_video",
    "sample_indices", "smart_nframes", "smart_resize", "tokenizer_info",
]
