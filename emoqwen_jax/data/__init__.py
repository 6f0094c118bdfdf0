"""Raw clips, images and conversations → the arrays the model takes (numpy, PIL, PyAV, OpenCV, grain).

No model code is imported here; the model, trainer and CLI import from this package.

Entry points: ``process_image`` / ``process_video`` (vision), ``load_tokenizer`` (+ ``TokenizerInfo``),
``text.encode_conversation`` / ``text.prompt_ids`` (chat template), ``load_manifest`` (records),
``SampleProcessor`` (record → sample), ``make_dataset`` / ``make_iterator`` (grain batches), ``prepare_dataset`` /
``load_prepared`` (TFDS array_record), ``build_demo`` (smoke-test set), ``data_config`` (settings).
"""

from emoqwen_jax.data.defaults import data_config
from emoqwen_jax.data.demo import build_demo, check_demo_data
from emoqwen_jax.data.manifests import BENCHMARK_CLASSES, benchmark_prompt, load_manifest
from emoqwen_jax.data.pipeline import Collate, load_sources, make_dataset, make_iterator
from emoqwen_jax.data.prepare import load_prepared, prepare_dataset
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.data.reasons import REASONS, Rejected, RejectCounter, TooManyRejectsError
from emoqwen_jax.data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info
from emoqwen_jax.data.vision import process_image, process_video, sample_indices, smart_nframes, smart_resize

__all__ = [
    "BENCHMARK_CLASSES", "Collate", "REASONS", "RejectCounter", "Rejected", "SampleProcessor", "TokenizerInfo",
    "TooManyRejectsError", "benchmark_prompt", "build_demo", "check_demo_data", "data_config", "load_manifest",
    "load_prepared", "load_sources", "load_tokenizer", "make_dataset", "make_iterator", "prepare_dataset",
    "process_image", "process_video",
    "sample_indices", "smart_nframes", "smart_resize", "tokenizer_info",
]
