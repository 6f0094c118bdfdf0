"""Model directories: our model on disk (architecture + weights), and ``load_weights`` for it or a Hugging Face
directory.

Our model directory is ``config.json`` (architecture + provenance) and ``params/`` (an orbax checkpoint of
the parameters). Every command that takes ``--ckpt`` accepts one; ``emoqwen-convert from-hf`` and the trainer
write one. (Training-state checkpoints — optimiser, step, data iterators — are ``train/run_state.py``'s.)

    DIR/config.json   {"format": "emoqwen_jax.model", "version": 1, "model": {...ModelConfig...}, "meta": {...}}
    DIR/params/       orbax StandardCheckpointer of the nnx parameter state

Parameters are saved from whatever sharding they have (every process writes its own shards; nothing is
gathered on one host) and restored into any target: ``load_model(path, mesh=mesh)`` lays them out by the
logical-axis rules on another mesh or device count; without a mesh they land on one device (describe, eval,
convert). ``DIR`` may be a URI (``emoqwen_jax.runtime.storage``).

A model with LoRA adapters (``emoqwen_jax.model.lora``) records them in ``meta["lora"]`` (rank, alpha, dropout,
targets, the adapted module paths); ``load_model`` re-creates them before restoring the parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.lora import lora_meta, restore_lora
from emoqwen_jax.parallel.hosts import barrier
from emoqwen_jax.runtime import storage

FORMAT = "emoqwen_jax.model"
VERSION = 1


def save_model(model: EmotionQwen, out_dir: str, meta: dict[str, Any] | None = None, *, overwrite: bool = False) -> str:
    """Writes ``model`` to ``out_dir``; refuses to overwrite an existing model unless asked."""
    out_dir = storage.normalize(out_dir)
    params_dir = storage.join(out_dir, "params")
    if storage.exists(params_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model; pass overwrite=True (--overwrite) to replace it")
    lora = lora_meta(model)
    meta = {k: v for k, v in (meta or {}).items() if k != "lora"} | ({"lora": lora} if lora else {})
    config_file = storage.join(out_dir, "config.json")
    if jax.process_index() == 0:
        storage.makedirs(out_dir)
        if storage.exists(config_file):  # written last: a directory without it is never taken as complete
            storage.remove(config_file)
    # Collective over all processes: each writes the shards it holds.
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.as_epath(params_dir), nnx.state(model, nnx.Param), force=overwrite)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        storage.write_json(config_file, {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
                                         "meta": meta or {}}, indent=2)
    barrier("save_model")  # nobody reads the directory before config.json is written
    return out_dir


def read_model_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_file = storage.join(path, "config.json")
    if not storage.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} is not a model directory (no config.json)")
    blob = storage.read_json(cfg_file)
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


def load_model(path: str, *, dtype: Any = None, mesh: jax.sharding.Mesh | None = None,
               **runtime: Any) -> EmotionQwen:
    """Restores a model directory; ``dtype`` ('bfloat16', jnp.bfloat16, np.dtype('float32')...) overrides the
    compute dtype (weights keep their storage dtype), ``runtime`` the execution settings (``attention``,
    ``attention_block``, ``scan_layers``, ``remat``).

    ``mesh``: restore each parameter straight into its sharding on this mesh (logical-axis rules), whatever
    mesh saved it; None puts every parameter on one local device.
    """
    config, meta = read_model_config(path)
    if dtype is not None:
        config = ModelConfig.from_dict({**config.to_dict(), "dtype": dtype})
    config = config.with_runtime(**runtime)
    abstract = nnx.eval_shape(lambda: restore_lora(EmotionQwen(config, rngs=nnx.Rngs(0)), meta.get("lora")))
    graphdef, state = nnx.split(abstract)
    from emoqwen_jax.parallel.rules import variable_sharding

    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def place(var):
        sharding = variable_sharding(var, mesh) if mesh is not None else one
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))

    target = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, _read_params(path, target))


def _read_params(path: str, abstract_state: Any) -> Any:
    """Reads the parameters of a model directory into ``abstract_state``'s shapes and shardings (each host
    reads only the pieces its devices hold)."""
    return ocp.StandardCheckpointer().restore(storage.as_epath(storage.join(path, "params")), abstract_state)


def load_weights(source: str, *, dtype: Any = None, param_dtype: Any = None,
                 compressor: Mapping[str, Any] | None = None, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None, **runtime: Any) -> EmotionQwen:
    """The model stored at ``source`` (a local path or a URI): our model directory, or a Hugging Face
    Qwen2.5-VL (or our export) directory, converted (``emoqwen_jax.convert.from_hf``; ``param_dtype``,
    ``compressor`` overrides and ``seed`` for the gate apply there only). ``dtype`` overrides the compute dtype;
    ``runtime`` the execution settings (``attention``, ``attention_block``, ``scan_layers``, ``remat``).
    ``mesh``: every parameter goes straight into its sharding on this mesh (None: one device)."""
    if is_model_dir(source):
        return load_model(source, dtype=dtype, mesh=mesh, **runtime)
    if storage.isfile(storage.join(source, "config.json")):
        from emoqwen_jax.convert.hf_import import from_hf  # noqa: PLC0415 — conversion only when needed

        return from_hf(source, dtype=dtype or "float32", param_dtype=param_dtype, compressor=compressor, seed=seed,
                       mesh=mesh, **runtime)
    raise ValueError(f"{source!r} is neither an emoqwen_jax model directory nor a Hugging Face directory "
                     f"(no config.json)")


def build_model(config: Any, ckpt: str = "") -> EmotionQwen:
    """The model of a run config (``configs/emotion_qwen.py``): the weights in ``ckpt`` if given (or in the model
    directory / HF checkpoint ``config.init_from`` names), with the config's dtypes, compressor and runtime
    settings; else a random init from ``config.seed``."""
    source = ckpt or config.get("init_from", "")
    if not source:
        return EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(config.seed))
    runtime = {k: config.model.get(k) for k in ("attention", "attention_block", "scan_layers", "remat")}
    return load_weights(source, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                        compressor=config.model.compressor.to_dict(), seed=config.seed, **runtime)
