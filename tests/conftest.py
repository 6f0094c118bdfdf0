"""Test-wide setup: CPU only, float32 matmuls at full precision, eight host devices."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Eight host devices for the mesh tests (unsharded code still runs on device 0).
jax.config.update("jax_num_cpu_devices", 8)
