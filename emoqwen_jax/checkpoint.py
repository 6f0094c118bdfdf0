"""Model weights on disk: our model directory, and ``load_weights`` for it or a Hugging Face directory.

Our model directory is ``config.json`` (architecture + provenance) and ``params/`` (an orbax checkpoint of
the parameters). Every command that takes ``--ckpt`` accepts one; ``emoqwen-convert from-hf`` and the trainer
write one. (Training-state checkpoints — optimiser, step, data iterators — are ``train/checkpoint.py``'s.)

    DIR/config.json   {"format": "emoqwen_jax.model", "version": 1, "model": {...ModelConfig...}, "meta": {...}}
    DIR/params/       orbax StandardCheckpointer of the nnx parameter state

A model with LoRA adapters (``emoqwen_jax.model.lora``) records them in ``meta["lora"]`` (rank, alpha, dropout,
targets, the adapted module paths); ``load_model`` re-creates them before restoring the parameters.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import orbax.checkpoint as ocp
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.lora import lora_meta, restore_lora

FORMAT = "emoqwen_jax.model"
VERSION = 1


def save_model(model: EmotionQwen, out_dir: str, meta: dict[str, Any] | None = None, *, overwrite: bool = False) -> str:
    """Writes ``model`` to ``out_dir``; refuses to overwrite an existing model unless asked."""
    out_dir = os.path.abspath(out_dir)
    params_dir = os.path.join(out_dir, "params")
    if os.path.exists(params_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model; pass overwrite=True (--overwrite) to replace it")
    lora = lora_meta(model)
    meta = {k: v for k, v in (meta or {}).items() if k != "lora"} | ({"lora": lora} if lora else {})
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, nnx.state(model, nnx.Param), force=overwrite)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), "meta": meta or {}}, f,
                  indent=2)
    return out_dir


def read_model_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} is not a model directory (no config.json)")
    with open(cfg_file) as f:
        blob = json.load(f)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not an emoqwen_jax model (format={blob.get('format')!r}); for a Hugging "
                         f"Face directory use emoqwen_jax.convert.from_hf or `emoqwen-convert from-hf`")
    return ModelConfig.from_dict(blob["model"]), blob.get("meta", {})


def is_model_dir(path: str) -> bool:
    try:
        read_model_config(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def load_model(path: str, *, dtype: str | None = None) -> EmotionQwen:
    """Restores a model directory; ``dtype`` overrides the compute dtype (weights keep their storage dtype)."""
    config, meta = read_model_config(path)
    if dtype is not None:
        config = ModelConfig.from_dict({**config.to_dict(), "dtype": dtype})
    abstract = nnx.eval_shape(lambda: restore_lora(EmotionQwen(config, rngs=nnx.Rngs(0)), meta.get("lora")))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, _read_params(path, state))


def _read_params(path: str, abstract_state: Any) -> Any:
    """Reads the parameters of a model directory into ``abstract_state``'s shapes (and shardings, if set)."""
    return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), abstract_state)


def load_weights(source: str, *, dtype: str | None = None, param_dtype: str | None = None,
                 compressor: Mapping[str, Any] | None = None, seed: int = 0) -> EmotionQwen:
    """The model stored at ``source``: our model directory, or a Hugging Face Qwen2.5-VL (or our export)
    directory, converted (``emoqwen_jax.convert.from_hf``; ``param_dtype``, ``compressor`` overrides and ``seed``
    for the gate apply there only). ``dtype`` overrides the compute dtype."""
    if is_model_dir(source):
        return load_model(source, dtype=dtype)
    if os.path.isfile(os.path.join(source, "config.json")):
        from emoqwen_jax.convert.hf_import import from_hf  # noqa: PLC0415 — conversion only when needed

        return from_hf(source, dtype=dtype or "float32", param_dtype=param_dtype, compressor=compressor, seed=seed)
    raise ValueError(f"{source!r} is neither an emoqwen_jax model directory nor a Hugging Face directory "
                     f"(no config.json)")
