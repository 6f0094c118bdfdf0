"""Torch modeling code shipped inside Hugging Face exports (``to_hf`` copies these files next to the weights;
transformers imports them with ``trust_remote_code=True``). A package only so that installs carry the files;
importing it needs torch and transformers, so nothing in ``emoqwen_jax`` does."""
