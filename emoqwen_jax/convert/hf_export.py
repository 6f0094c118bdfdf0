"""Export a model of ours as a Hugging Face directory that transformers loads (``emoqwen-convert to-hf``).

    DIR/config.json                     Qwen2.5-VL config (+ ``compressor`` and ``auto_map`` for 'emotion_qwen')
    DIR/generation_config.json          greedy decoding, stops at <|im_end|> / <|endoftext|>
    DIR/model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    DIR/tokenizer.json, tokenizer_config.json, chat_template.jinja   the Qwen2 tokenizer built for the vocab
    DIR/preprocessor_config.json, video_preprocessor_config.json     Qwen2-VL image / video processors
    DIR/configuration_emotion_qwen.py, modeling_emotion_qwen.py      remote code ('emotion_qwen' only)

Formats: 'emotion_qwen' (any compressor; ``trust_remote_code=True`` loads
``EmotionQwenForConditionalGeneration`` from ``hf_remote/``) and 'qwen2_5_vl' (a single expert only: a plain
``Qwen2_5_VLForConditionalGeneration``, no remote code; its expert becomes ``visual.merger``). Weight names
come from ``hf_names`` (the table ``from_hf`` reads back). Only safetensors and JSON are written; no torch
needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from emoqwen_jax.convert import hf_names
from emoqwen_jax.convert.hf_import import EXPORT_MODEL_TYPE
from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.config import dtype_name
from emoqwen_jax.model.lora import lora_modules
from emoqwen_jax.runtime import storage

FORMATS = (EXPORT_MODEL_TYPE, "qwen2_5_vl")
REMOTE_DIR = os.path.join(os.path.dirname(__file__), "hf_remote")
REMOTE_FILES = ("configuration_emotion_qwen.py", "modeling_emotion_qwen.py")
AUTO_MAP = {
    "AutoConfig": "configuration_emotion_qwen.EmotionQwenConfig",
    "AutoModel": "modeling_emotion_qwen.EmotionQwenModel",
    "AutoModelForImageTextToText": "modeling_emotion_qwen.EmotionQwenForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_emotion_qwen.EmotionQwenForConditionalGeneration",
}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Every file an export writes (plus weight shards): what ``overwrite`` removes first, nothing else.
_OWN_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json") + REMOTE_FILES
# Qwen2.5-VL-Instruct's chat template (default system prompt, one vision block per image/video entry).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '100KB' (powers of 1000, as transformers) or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}; give bytes or a size such as '5GB', '500MB', '100KB'")
    return int(float(m.group(1)) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def check_format(config: ModelConfig, fmt: str) -> None:
    """ValueError unless ``config`` can be written as ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; choose one of {FORMATS}")
    comp = config.compressor
    if config.audio.enabled and fmt != EXPORT_MODEL_TYPE:
        raise ValueError(f"format {fmt!r} has no audio encoder; a model with model.audio.enabled exports only as "
                         f"'{EXPORT_MODEL_TYPE}' (loaded with trust_remote_code=True)")
    a = config.audio
    if a.enabled and (a.position_rule != "text" or a.layer_norm_eps != 1e-5 or a.gate_audio):
        raise ValueError(f"audio.position_rule={a.position_rule!r}, layer_norm_eps={a.layer_norm_eps}, gate_audio="
                         f"{a.gate_audio}: the export's remote code implements position_rule 'text', HF's "
                         f"Qwen2AudioEncoder (layer norm eps 1e-5) and a gate without audio input only")
    if fmt == "qwen2_5_vl":
        if comp.num_experts != 1:
            raise ValueError(f"format 'qwen2_5_vl' has a single patch merger, but this checkpoint has "
                             f"num_experts={comp.num_experts} ({', '.join(config.expert_names)}); export it with "
                             f"format '{EXPORT_MODEL_TYPE}' (loaded with trust_remote_code=True)")
        if comp.routing == "token" and 0 < comp.capacity_factor < 1:
            raise ValueError(f"a single token-routed expert with capacity_factor={comp.capacity_factor} < 1 drops "
                             f"tokens, which a plain Qwen2.5-VL merger cannot; use format '{EXPORT_MODEL_TYPE}'")


def hf_config(config: ModelConfig, fmt: str = EXPORT_MODEL_TYPE, *, dtype: Any = None,
              eos_ids: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Our config -> the HF config.json dict (transformers 5 nested layout); inverse of ``config_from_hf``."""
    check_format(config, fmt)
    t, v = config.text, config.vision
    tps = v.tokens_per_second
    text = {
        "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
        "max_position_embeddings": 128000, "use_sliding_window": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                            "mrope_section": list(t.mrope_section)},
        "bos_token_id": None, "eos_token_id": list(eos_ids) if eos_ids else None, "pad_token_id": None,
    }
    vision = {
        "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size, "in_channels": v.in_channels, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
        # transformers types it int (strict config); a fractional rate stays a float for our own import.
        "tokens_per_second": int(tps) if float(tps).is_integer() else tps,
        "out_hidden_size": t.hidden_size, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    out: dict[str, Any] = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "dtype": dtype_name(dtype) if dtype is not None else config.param_dtype,
        "tie_word_embeddings": t.tie_word_embeddings,
        "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
        "text_config": text, "vision_config": vision,
    }
    if fmt == EXPORT_MODEL_TYPE:
        comp = dataclasses.asdict(config.compressor)
        out.update(architectures=["EmotionQwenForConditionalGeneration"], model_type=EXPORT_MODEL_TYPE,
                   auto_map=dict(AUTO_MAP), compressor={k: list(x) if isinstance(x, tuple) else x
                                                        for k, x in comp.items()},
                   audio=dataclasses.asdict(config.audio))
    return out


def hf_tensors(model: EmotionQwen, fmt: str = EXPORT_MODEL_TYPE) -> dict[str, np.ndarray]:
    """HF file name -> array in HF layout, in the storage dtype of our parameters (no copy of the dtype)."""
    config = model.config
    check_format(config, fmt)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if fmt == EXPORT_MODEL_TYPE:
        entries = hf_names.export_entries(config)
    else:
        entries = hf_names.backbone_entries(config) + hf_names.expert_entries(config, [hf_names.HF_MERGER_PREFIX])
    v = config.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        value = pure
        for p in entry.path:
            value = value[p]
        stacked = entry.path[:2] == ("compressor", "experts")
        for i, key in enumerate(entry.hf_keys):
            array = value[i] if stacked else value
            out[key] = np.ascontiguousarray(hf_names.ours_to_hf(array, entry.kind, conv_shape))
    return out


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_size: int | str) -> list[str]:
    """Writes one ``model.safetensors`` or, above ``max_shard_size`` bytes, shards in name order plus
    ``model.safetensors.index.json`` (transformers' layout). Returns the file names."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > limit:  # a tensor larger than the limit gets a shard of its own
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format tag
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(out_dir, name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return names + ["model.safetensors.index.json"]


def check_tokenizer_fits(config: ModelConfig) -> None:
    """ValueError unless the Qwen2 tokenizer built for the model's vocab gives its vision token ids."""
    from emoqwen_jax.tokens import tokenizer_info  # noqa: PLC0415

    info = tokenizer_info(config.text.vocab_size)
    pairs = (("image_token_id", info.image_pad_id), ("video_token_id", info.video_pad_id),
             ("vision_start_token_id", info.vision_start_id), ("vision_end_token_id", info.vision_end_id))
    bad = [f"{name}={getattr(config, name)} (tokenizer: {tid})" for name, tid in pairs if getattr(config, name) != tid]
    if bad:
        raise ValueError(f"the Qwen2 tokenizer for vocab_size={config.text.vocab_size} does not fit this model: "
                         f"{', '.join(bad)}; export without the tokenizer (tokenizer=False, --no_tokenizer)")


def write_tokenizer(config: ModelConfig, out_dir: str, cache_dir: str = "") -> Any:
    """tokenizer.json (our Qwen2 BPE for the model's vocab), tokenizer_config.json, chat_template.jinja.

    Returns the ``TokenizerInfo``; ValueError when the model's vision token ids are not the tokenizer's."""
    from emoqwen_jax.data.tokenizer import hf_tokenizer_json, load_tokenizer  # noqa: PLC0415 — builds once

    check_tokenizer_fits(config)
    _, info = load_tokenizer(config.text.vocab_size, cache_dir)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(hf_tokenizer_json(info), f, ensure_ascii=False)
    tok_cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "processor_class": "Qwen2_5_VLProcessor",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 131072, "errors": "replace", "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    return info


def write_processor_configs(config: ModelConfig, out_dir: str) -> None:
    """Qwen2-VL image and video processor settings from our data defaults (CLIP mean/std, smart_resize
    bounds, fps); HF's video processor needs torchvision, the image processor does not."""
    from emoqwen_jax.data.defaults import data_config  # noqa: PLC0415
    from emoqwen_jax.data.vision import CLIP_MEAN, CLIP_STD  # noqa: PLC0415

    d, v = data_config(), config.vision
    common = {
        "processor_class": "Qwen2_5_VLProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [float(x) for x in CLIP_MEAN], "image_std": [float(x) for x in CLIP_STD],
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
    }
    image = {**common, "image_processor_type": "Qwen2VLImageProcessor",
             "size": {"shortest_edge": d.image_min_pixels, "longest_edge": d.image_max_pixels},
             "min_pixels": d.image_min_pixels, "max_pixels": d.image_max_pixels}
    video = {**common, "video_processor_type": "Qwen2VLVideoProcessor", "fps": d.fps, "min_frames": d.min_frames,
             "max_frames": d.max_frames, "do_sample_frames": False,
             "size": {"shortest_edge": d.video_min_pixels, "longest_edge": d.video_max_pixels},
             "min_pixels": d.video_min_pixels, "max_pixels": d.video_max_pixels}
    for name, blob in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(blob, f, indent=2)


def _prepare_dir(out_dir: str, overwrite: bool) -> str:
    out_dir = storage.normalize(out_dir)
    if storage.isdir(out_dir) and storage.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to "
                                  f"replace the export in it")
        for name in storage.listdir(out_dir):  # only what an export writes: stale shards must not survive
            if name in _OWN_FILES or name.endswith(".safetensors"):
                storage.remove(storage.join(out_dir, name))
    return out_dir


def to_hf(model: EmotionQwen, out_dir: str, *, format: str = EXPORT_MODEL_TYPE,  # noqa: A002 — the CLI's name
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, tokenizer: bool = True, overwrite: bool = False,
          tokenizer_cache_dir: str = "", base_only: bool = False) -> dict[str, Any]:
    """Writes ``model`` as a Hugging Face directory (layout in the module docstring).

    Args:
      model: any EmotionQwen (weights are written in their storage dtype, e.g. float32 or bfloat16).
      format: 'emotion_qwen' (remote code, any compressor) or 'qwen2_5_vl' (single expert, no remote code).
      max_shard_size: bytes or '5GB'-style; larger exports are sharded with an index.
      tokenizer: also write the tokenizer files (needs the model's vision token ids to be the tokenizer's).
      overwrite: replace the export files in a non-empty ``out_dir`` (other files are left alone).
      base_only: for a model with LoRA adapters, write only the base weights (the adapters go to a PEFT
        directory: ``emoqwen_jax.convert.lora.export_hf``); otherwise such a model is an error, since its
        adapters would silently be lost.
    Returns:
      a summary dict: out_dir, format, files, num_tensors, bytes.
    """
    config = model.config
    if lora_modules(model) and not base_only:
        raise ValueError("the model has LoRA adapters, which a plain export would drop: merge them first "
                         "(emoqwen_jax.model.lora.merge_lora, `emoqwen-convert merge-lora`) or export them as a PEFT "
                         "adapter (emoqwen_jax.convert.lora.export_hf, `to-hf --lora_adapter`)")
    check_format(config, format)
    info = None
    if tokenizer:
        check_tokenizer_fits(config)  # fail before writing anything
    tensors = hf_tensors(model, format)
    dtypes = {str(t.dtype) for t in tensors.values()}
    out_dir = _prepare_dir(out_dir, overwrite)
    with storage.staged_dir(out_dir) as local:  # a URI target (gs://…) is written locally, then uploaded
        files = write_safetensors(tensors, local, max_shard_size)
        if tokenizer:
            info = write_tokenizer(config, local, tokenizer_cache_dir)
            files += ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
        eos = (info.im_end_id, info.endoftext_id) if info else None
        cfg = hf_config(config, format, dtype="bfloat16" if dtypes == {"bfloat16"} else "float32", eos_ids=eos)
        gen = {"do_sample": False, "eos_token_id": list(eos) if eos else None,
               "pad_token_id": info.endoftext_id if info else None,
               "bos_token_id": info.endoftext_id if info else None}
        for name, blob in (("config.json", cfg), ("generation_config.json", gen)):
            with open(os.path.join(local, name), "w") as f:
                json.dump(blob, f, indent=2)
        write_processor_configs(config, local)
        files += ["config.json", "generation_config.json", "preprocessor_config.json",
                  "video_preprocessor_config.json"]
        if format == EXPORT_MODEL_TYPE:
            for name in REMOTE_FILES:
                shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(local, name))
            files += list(REMOTE_FILES)
    return {"out_dir": out_dir, "format": format, "files": sorted(files), "num_tensors": len(tensors),
            "bytes": int(sum(t.nbytes for t in tensors.values()))}
