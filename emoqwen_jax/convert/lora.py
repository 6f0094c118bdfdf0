"""LoRA checkpoints out of our model directories: merged into the base weights, or as a PEFT adapter.

    emoqwen-convert merge-lora --ckpt C --out C2          C2 = a plain model directory (adapters folded in)
    emoqwen-convert to-hf --ckpt C --out HF --lora_adapter [ADAPTER_DIR]
        HF           the base model (adapters NOT applied), exactly as ``to-hf`` writes any model
        ADAPTER_DIR  (default ``HF-lora``, next to it) adapter_config.json + adapter_model.safetensors:
                     ``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(HF, ...), ADAPTER_DIR)``

PEFT names an adapter after the module it wraps as transformers builds it in memory (transformers 5.x:
``model.language_model.layers.N.self_attn.q_proj``, ``model.visual.blocks.N.attn.qkv``, ``lm_head``), not after
the safetensors names (``model.layers.N...``, ``visual.blocks.N...``). Tensors are stored as
``base_model.model.<module>.lora_A.weight`` float[R, I] (= our lora_a transposed) and ``...lora_B.weight``
float[O, R] (= our lora_b transposed); the scale is PEFT's ``lora_alpha / r``, as ours.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from emoqwen_jax.convert import hf_names
from emoqwen_jax.convert.hf_export import FORMATS, check_format, to_hf
from emoqwen_jax.model import EmotionQwen
from emoqwen_jax.model.lora import LoRALinear, lora_meta, merge_lora, module_path
from emoqwen_jax.runtime import storage

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# safetensors file-name prefixes -> transformers 5 in-memory module prefixes (Qwen2.5-VL and our export).
_MEMORY_PREFIXES = (("model.", "model.language_model."), ("visual.", "model.visual."), ("lm_head", "lm_head"),
                    # our exports' audio modules, saved at the top level, live under ``model`` in memory
                    ("audio_tower.", "model.audio_tower."), ("audio_projector.", "model.audio_projector."))


def memory_name(file_key: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.language_model.layers.0.self_attn.q_proj' (the module
    name PEFT sees)."""
    module = file_key.rsplit(".", 1)[0]
    for file_prefix, memory_prefix in _MEMORY_PREFIXES:
        if module.startswith(file_prefix):
            return memory_prefix + module[len(file_prefix):]
    raise ValueError(f"no in-memory module name for HF tensor {file_key!r}")


def hf_module_names(model: EmotionQwen, fmt: str) -> dict[str, str]:
    """Our '/'-joined Linear module path -> the HF in-memory module name, for every exported Linear."""
    config = model.config
    check_format(config, fmt)
    if fmt == "qwen2_5_vl":
        entries = hf_names.backbone_entries(config) + hf_names.expert_entries(config, [hf_names.HF_MERGER_PREFIX])
    else:
        entries = hf_names.export_entries(config)
    return {module_path(e.path[:-1]): memory_name(e.hf_keys[0]) for e in entries
            if e.kind == "linear" and e.path[-1] == "kernel" and len(e.hf_keys) == 1}


def _adapters(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    return [(module_path(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]


def peft_tensors(model: EmotionQwen, fmt: str) -> dict[str, np.ndarray]:
    """PEFT state-dict name -> array (storage dtype); ValueError for an adapter with no HF module."""
    names = hf_module_names(model, fmt)
    out: dict[str, np.ndarray] = {}
    for path, lora in _adapters(model):
        if path not in names:
            raise ValueError(f"LoRA module {path!r} has no Hugging Face module in format {fmt!r}; merge it instead "
                             f"(emoqwen-convert merge-lora)")
        prefix = f"base_model.model.{names[path]}"
        out[prefix + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(lora.lora_a[...]).T)
        out[prefix + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(lora.lora_b[...]).T)
    return out


def peft_config(model: EmotionQwen, fmt: str, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json: exact module names as targets (PEFT matches a full name by equality)."""
    meta = lora_meta(model)
    if meta is None:
        raise ValueError("the model has no LoRA adapters; nothing to export as a PEFT adapter")
    names = hf_module_names(model, fmt)
    ranks = {int(lora.lora_a.shape[1]) for _, lora in _adapters(model)}
    assert len(ranks) == 1, ranks  # apply_lora uses one rank for every module
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": meta["rank"], "lora_alpha": meta["alpha"], "lora_dropout": meta["dropout"],
        "target_modules": sorted(names[m] for m in meta["modules"]), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(model: EmotionQwen, out_dir: str, *, format: str = FORMATS[0],  # noqa: A002
                       base_model_name_or_path: str = "", overwrite: bool = False) -> dict[str, Any]:
    """Writes ``out_dir/adapter_config.json`` and ``out_dir/adapter_model.safetensors``."""
    cfg = peft_config(model, format, base_model_name_or_path)
    tensors = peft_tensors(model, format)
    out_dir = storage.normalize(out_dir)
    existing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if storage.exists(storage.join(out_dir, f))]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an adapter ({existing}); pass overwrite=True (--overwrite)")
    with storage.staged_dir(out_dir) as local:
        save_file(tensors, os.path.join(local, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(local, ADAPTER_CONFIG), "w") as f:
            json.dump(cfg, f, indent=2)
    return {"adapter_dir": out_dir, "num_modules": len(cfg["target_modules"]), "rank": cfg["r"],
            "bytes": int(sum(t.nbytes for t in tensors.values()))}


def merged_copy(model: EmotionQwen) -> EmotionQwen:
    """A copy with the adapters folded in (``model`` keeps its adapters)."""
    return merge_lora(nnx.clone(model))


def export_hf(model: EmotionQwen, out_dir: str, *, lora_adapter: str | None = None, **to_hf_kwargs) -> dict:
    """``to_hf`` for models with adapters: without ``lora_adapter`` the merged model is exported (what the
    checkpoint computes); with it, the base model goes to ``out_dir`` and the PEFT adapter to
    ``lora_adapter`` ('' = ``out_dir + '-lora'``)."""
    has_lora = bool(_adapters(model))
    if lora_adapter is None:
        return to_hf(merged_copy(model) if has_lora else model, out_dir, **to_hf_kwargs)
    if not has_lora:
        raise ValueError("--lora_adapter needs a checkpoint with LoRA adapters (its config.json meta has no 'lora')")
    fmt = to_hf_kwargs.get("format", FORMATS[0])
    peft_config(model, fmt, "")  # every adapter has an HF name: fail before writing anything
    peft_tensors(model, fmt)
    summary = to_hf(model, out_dir, base_only=True, **to_hf_kwargs)  # adapters go to the PEFT directory
    adapter_dir = lora_adapter or storage.normalize(out_dir) + "-lora"
    summary["adapter"] = write_peft_adapter(model, adapter_dir, format=fmt, base_model_name_or_path=summary["out_dir"],
                                            overwrite=to_hf_kwargs.get("overwrite", False))
    return summary


def merge_model_dir(ckpt: str, out: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Folds a model directory's adapters into its base weights and saves a plain model directory (its meta
    keeps the source's, with ``lora`` moved to ``merged_lora``)."""
    from emoqwen_jax.model_dir import load_model, read_model_config, save_model  # noqa: PLC0415

    _, meta = read_model_config(ckpt)
    if not meta.get("lora"):
        raise ValueError(f"{ckpt} has no LoRA adapters (its config.json meta has no 'lora'); nothing to merge")
    model = merge_lora(load_model(ckpt))
    lora = meta.pop("lora")
    out = save_model(model, out, meta={**meta, "merged_lora": lora, "merged_from": storage.normalize(ckpt)},
                     overwrite=overwrite)
    return {"out": out, "merged_modules": len(lora["modules"]), "rank": lora["rank"]}


def adapter_params(model: nnx.Module) -> dict[str, Any]:
    """'/'-joined adapter leaf path -> array (for tests and logging)."""
    return {f"{path}/{leaf}": getattr(lora, leaf)[...]
            for path, lora in _adapters(model) for leaf in ("lora_a", "lora_b")}


__all__ = ["export_hf", "merge_model_dir", "merged_copy", "peft_config", "peft_tensors", "write_peft_adapter",
           "hf_module_names", "adapter_params"]
