"""``emoqwen-serve``: an OpenAI-compatible HTTP API, an emotion endpoint and a web page over the generation
engine (``emoqwen_jax.infer.engine``). See docs/serving.md."""

from emoqwen_jax.serve.app import create_app, run_server
from emoqwen_jax.serve.server import ServeConfig

__all__ = ["ServeConfig", "create_app", "run_server"]
