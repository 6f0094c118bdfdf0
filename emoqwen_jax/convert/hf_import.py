"""Import a Hugging Face Qwen2.5-VL directory (config.json + safetensors, sharded or not) without torch.

Every compressor expert starts as a copy of HF's patch merger, so a fresh import computes exactly what
Qwen2.5-VL computes (any gate mixing of identical experts is the merger itself); the gate is freshly
initialised from ``seed``.

Our own exports (``model_type`` 'emotion_qwen', ``emoqwen_jax.convert.to_hf``) carry the compressor's
settings in config.json and its experts, gate and router in the weights; they are read back as they are, so
JAX -> HF -> JAX is bit-identical.

Memory: tensors are read one at a time (a safetensors header gives each tensor's byte range) and, with a
``mesh``, placed straight into their sharding (``jax.make_array_from_callback``: each host keeps only the shards
its devices hold), so host memory is bounded by the largest tensor, not the model. The directory may be a URI
(``gs://…``, ``emoqwen_jax.runtime.storage``).
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoqwen_jax.convert import hf_names
from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.compressor import GateNetwork
from emoqwen_jax.model.config import AudioConfig, CompressorConfig, TextConfig, VisionConfig
from emoqwen_jax.model.layers import Linear, as_dtype
from emoqwen_jax.runtime import storage
from emoqwen_jax.tokens import REAL_VOCAB_SIZE, tokenizer_info

_IDS = tokenizer_info(REAL_VOCAB_SIZE)  # Qwen2.5-VL's special ids, for configs that omit them

log = logging.getLogger(__name__)

EXPORT_MODEL_TYPE = "emotion_qwen"  # our exports (hf_export.py)
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", EXPORT_MODEL_TYPE)


def read_hf_config(path: str) -> dict[str, Any]:
    if not storage.isdir(path):
        raise FileNotFoundError(f"Hugging Face directory {path!r} does not exist")
    cfg_file = storage.join(path, "config.json")
    if not storage.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} has no config.json (expected a Qwen2.5-VL save_pretrained directory)")
    return storage.read_json(cfg_file)


def config_from_hf(hf: Mapping[str, Any], *, compressor: Mapping[str, Any] | None = None,
                   dtype: Any = "float32", param_dtype: Any = None) -> ModelConfig:
    """Translates an HF Qwen2.5-VL config dict (nested transformers-5 or flat release format), or one of our
    exports (whose ``compressor`` dict is the base that ``compressor`` overrides)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unknown architecture model_type={model_type!r} (architectures="
                         f"{hf.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}")
    text = dict(hf.get("text_config") or {})
    for key, value in hf.items():  # the released checkpoints keep text fields at the top level
        if key not in ("text_config", "vision_config"):
            text.setdefault(key, value)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    vis = dict(hf["vision_config"])
    vis_rope = vis.get("rope_parameters") or {}
    text_cfg = TextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"],
        num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        intermediate_size=text["intermediate_size"], rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    vision_cfg = VisionConfig(
        depth=vis["depth"], hidden_size=vis["hidden_size"], num_heads=vis["num_heads"],
        intermediate_size=vis["intermediate_size"], in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
        patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
        temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
        window_size=vis.get("window_size", 112), fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())),
        tokens_per_second=float(vis.get("tokens_per_second", 2)), rope_theta=float(vis_rope.get("rope_theta", 1e4)))
    out_hidden = vis.get("out_hidden_size", text_cfg.hidden_size)
    if out_hidden != text_cfg.hidden_size:
        raise ValueError(f"vision out_hidden_size={out_hidden} != text hidden_size={text_cfg.hidden_size}")
    comp_fields = {**(hf.get("compressor") or {}), **(compressor or {})} if model_type == EXPORT_MODEL_TYPE else (
        compressor or {})
    comp = CompressorConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in comp_fields.items()})
    audio = AudioConfig(**hf["audio"]) if model_type == EXPORT_MODEL_TYPE and hf.get("audio") else AudioConfig()
    return ModelConfig(
        vision=vision_cfg, text=text_cfg, compressor=comp, audio=audio,
        image_token_id=hf.get("image_token_id", _IDS.image_pad_id),
        video_token_id=hf.get("video_token_id", _IDS.video_pad_id),
        vision_start_token_id=hf.get("vision_start_token_id", _IDS.vision_start_id),
        vision_end_token_id=hf.get("vision_end_token_id", _IDS.vision_end_id),
        dtype=dtype, param_dtype=param_dtype or dtype)


# safetensors dtype names -> numpy (bfloat16 through ml_dtypes, which JAX ships).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class TensorReader:
    """Lazy reader over one or many safetensors files (local or a URI); names normalised to the file layout
    (``model.layers.*``, ``visual.*``) whichever of HF's prefixes the files use. ``get`` reads one tensor's bytes
    and nothing else."""

    def __init__(self, path: str):
        index = storage.join(path, "model.safetensors.index.json")
        if storage.isfile(index):
            files = sorted(set(storage.read_json(index)["weight_map"].values()))
        else:
            files = [f for f in storage.listdir(path) if f.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"{path!r} has no *.safetensors weights")
        # normalised name -> (file, dtype, shape, absolute byte offset, byte length)
        self._where: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        for name in files:
            full = storage.join(path, name)
            if not storage.isfile(full):
                raise FileNotFoundError(f"weight shard {full!r} named in the index is missing")
            with storage.open(full, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{full}: tensor {key} has dtype {info['dtype']}; readable: {sorted(_ST_DTYPES)}")
                start, end = info["data_offsets"]
                self._where[_normalise(key)] = (full, info["dtype"], tuple(info["shape"]), 8 + size + start,
                                                end - start)

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(key)
        full, dtype, shape, offset, length = self._where[key]
        with storage.open(full, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        return np.frombuffer(raw, dtype=np.dtype(jnp.dtype(_ST_DTYPES[dtype]))).reshape(shape)


def _normalise(key: str) -> str:
    for old, new in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def place(value: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A host array as a JAX array: on the default device, or assembled from this host's shards of
    ``sharding`` (every host holds the full ``value``; only the pieces its devices own are copied)."""
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_entries(reader: TensorReader, entries: list[hf_names.Entry], pure: dict, dtype,
                 shardings: dict | None = None) -> set[str]:
    """Fills ``pure`` (our pure-dict state of ShapeDtypeStructs) from ``reader``, one tensor at a time, each
    placed in its sharding from ``shardings`` (same tree; None: the default device); returns the keys used."""
    missing = sorted({k for e in entries for k in e.hf_keys if k not in reader._where})
    if missing:
        raise ValueError(f"{len(missing)} weight(s) missing from the checkpoint, e.g. {missing[:5]}")
    used: set[str] = set()
    for entry in entries:
        arrays = [hf_names.hf_to_ours(reader.get(k), entry.kind) for k in entry.hf_keys]
        used.update(entry.hf_keys)
        value = arrays[0] if len(arrays) == 1 and entry.path[:2] != ("compressor", "experts") else np.stack(arrays)
        want = tuple(_get(pure, entry.path).shape)
        if tuple(value.shape) != want:
            raise ValueError(f"shape of {entry.hf_keys[0]} does not fit: checkpoint gives {tuple(value.shape)} "
                             f"(after conversion), the config needs {want} for {'/'.join(map(str, entry.path))}")
        _set(pure, entry.path, place(value.astype(dtype), _get(shardings, entry.path) if shardings else None))
        del arrays, value  # only one tensor (and its converted copy) lives on the host at a time
    return used


def _iter_paths(tree, prefix=()) -> Iterator[tuple]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _iter_paths(v, prefix + (k,))
    else:
        yield prefix


def _init_routing(pure: dict, config: ModelConfig, seed: int, shardings: dict | None = None) -> None:
    """The gate (paper mode) or router (scale mode) do not exist in Qwen2.5-VL: initialise them fresh."""
    cdt = dict(dtype=as_dtype(config.dtype), param_dtype=as_dtype(config.param_dtype))
    comp = pure["compressor"]
    if comp.get("gate") is not None:
        gate = GateNetwork(config.vision.hidden_size, config.compressor, rngs=nnx.Rngs(seed), **cdt)
        comp["gate"] = nnx.to_pure_dict(nnx.state(gate))
    if comp.get("router") is not None:
        v = config.vision
        router = Linear(v.hidden_size * v.merge_unit, config.compressor.num_experts, use_bias=False,
                        axes=("merge", None), rngs=nnx.Rngs(seed), **cdt)
        comp["router"] = nnx.to_pure_dict(nnx.state(router))
    if shardings is not None:  # small modules: built on one device, then placed
        for key in ("gate", "router"):
            if comp.get(key) is not None:
                comp[key] = jax.tree.map(lambda v, sh: place(np.asarray(v), sh), comp[key],
                                         shardings["compressor"][key])


def _perturb_experts(experts: dict, std: float, seed: int, shardings: dict | None = None) -> dict:
    """Experts 1.. get N(0, (std * tensor std)^2) noise so token routing can tell them apart; expert 0 stays
    an exact copy of the merger. Jitted, so sharded experts stay in their shardings."""

    def perturb(experts):
        key, out = jax.random.key(seed + 1), {}
        for name in sorted(experts):
            key, sub = jax.random.split(key)
            w = experts[name]
            noise = jax.random.normal(sub, w.shape, jnp.float32) * std * jnp.std(w.astype(jnp.float32))
            out[name] = (w.astype(jnp.float32) + noise.at[0].set(0.0)).astype(w.dtype)
        return out

    return jax.jit(perturb, out_shardings=shardings)(experts)


def from_hf(path: str, dtype: Any = "float32", param_dtype: Any = None, *,
            compressor: Mapping[str, Any] | None = None, seed: int = 0,
            mesh: jax.sharding.Mesh | None = None, **runtime: Any) -> EmotionQwen:
    """Builds ``EmotionQwen`` from a Qwen2.5-VL directory (every expert a copy of HF's merger) or from one of
    our exports (experts, gate and router as exported; ``seed`` unused).

    Args:
      path: directory with config.json and model.safetensors (or sharded files with an index).
      dtype: compute dtype ('float32' for parity, 'bfloat16' for training), as a name or a JAX/numpy dtype
        (``jnp.bfloat16``, ``np.dtype('float32')``); ``param_dtype`` (same spellings) defaults to it.
      compressor: overrides of ``CompressorConfig`` fields (e.g. ``{"num_experts": 2}``).
      seed: initialises the gating network (absent from Qwen2.5-VL).
      runtime: how the model runs, not what it is: ``attention`` ('auto' | 'xla' | 'blockwise' | 'splash' |
        'cudnn'), ``attention_block``, ``scan_layers``, ``remat`` (``ModelConfig`` fields).
      mesh: read each tensor straight into its sharding on this mesh (logical-axis rules); None: one device.
    """
    hf = read_hf_config(path)
    config = config_from_hf(hf, compressor=compressor, dtype=dtype, param_dtype=param_dtype).with_runtime(**runtime)
    reader = TensorReader(path)
    abstract = nnx.eval_shape(lambda: EmotionQwen(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    shardings = None
    if mesh is not None:
        from emoqwen_jax.parallel import pure_param_shardings

        shardings = pure_param_shardings(abstract, mesh)
    np_dtype = np.dtype(as_dtype(config.param_dtype))
    if hf["model_type"] == EXPORT_MODEL_TYPE:
        used = load_entries(reader, hf_names.export_entries(config), pure, np_dtype, shardings)
    else:
        entries = hf_names.backbone_entries(config)
        entries += hf_names.expert_entries(config, [hf_names.HF_MERGER_PREFIX] * config.compressor.num_experts)
        used = load_entries(reader, entries, pure, np_dtype, shardings)
        _init_routing(pure, config, seed, shardings)
        if config.compressor.num_experts > 2 and config.compressor.init_noise_std > 0:
            pure["compressor"]["experts"] = _perturb_experts(
                pure["compressor"]["experts"], config.compressor.init_noise_std, seed,
                shardings["compressor"]["experts"] if shardings else None)
    unfilled = [p for p in _iter_paths(pure) if isinstance(_get(pure, p), jax.ShapeDtypeStruct)]
    if unfilled:
        raise ValueError(f"parameters not provided by the checkpoint: {unfilled[:5]}")
    extra = sorted(set(reader.keys()) - used)
    if extra:
        log.warning("ignoring %d checkpoint tensors not used by the model, e.g. %s", len(extra), extra[:5])
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
