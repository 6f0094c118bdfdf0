"""Host-side index bookkeeping (pure numpy): grids and token ids -> the fixed-shape arrays the jitted model
takes. Shared by the data pipeline (for training batches) and the model's Hugging Face-style call, so both
exercise one code path; imports no model and no data code.

Everything Hugging Face's Qwen2.5-VL computes with Python loops and ``cu_seqlens`` (window index, per-frame
attention segments, 2-D rotary ids, M-RoPE position ids, where each visual token lands in the text) is
computed here once per batch: ``vision`` (the ViT's and the compressor's index arrays), ``audio`` (each audio
token's encoder row, the interleaved clip sequence), ``positions`` (M-RoPE ids, both audio rules) and
``model_inputs`` (all of it as one ``ModelInputs``). Shapes: B batch, L text length, P patches (padded),
U = P/4 merged units, G visual items (images + videos, padded).
"""

from emoqwen_jax.layout.audio import AudioSpec, audio_token_index, interleave_chunks, interleaved_block
from emoqwen_jax.layout.model_inputs import build_model_inputs
from emoqwen_jax.layout.positions import get_rope_index, interleaved_positions
from emoqwen_jax.layout.vision import LayoutSpec, local_blocks, vision_layout, visual_token_index

__all__ = ["AudioSpec", "LayoutSpec", "audio_token_index", "build_model_inputs", "get_rope_index",
           "interleave_chunks", "interleaved_block", "interleaved_positions", "local_blocks", "vision_layout",
           "visual_token_index"]
