"""Raw clips, images and conversations → the arrays the model takes (numpy, PIL, PyAV, OpenCV, grain).

No model code is imported here; the model, trainer and CLI import from this package.
"""

from emoqwen_jax.data.defaults import data_config
from emoqwen_jax.data.reasons import REASONS, Rejected, RejectCounter, TooManyRejectsError
from emoqwen_jax.data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info
from emoqwen_jax.data.vision import process_image, process_video, sample_indices, smart_nframes, smart_resize

__all__ = [
    "REASONS", "RejectCounter", "Rejected", "TokenizerInfo", "TooManyRejectsError", "data_config", "load_tokenizer",
    "process_image", "process_video", "sample_indices", "smart_nframes", "smart_resize", "tokenizer_info",
]
