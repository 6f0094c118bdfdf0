"""emoqwen_jax: Emotion-Qwen in JAX/Flax NNX.

Package layout follows the data path: ``data`` (raw clips -> arrays) -> ``model`` (pure JAX network) ->
``train`` -> ``eval`` / ``convert``. ``layout`` is the host-side numpy bookkeeping shared by the data pipeline
and the model's Hugging Face-style wrapper; it imports neither.
"""

__version__ = "0.1.0"
