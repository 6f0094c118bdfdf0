r"""Emotion-Qwen run configs: model sizes, data, mesh and (with the trainer) the three stages.

  emoqwen-run-sample --config=configs/emotion_qwen.py:tiny
  emoqwen-run-sample --config=configs/emotion_qwen.py:tiny --config.model.compressor.num_experts=3

Presets (the part after the colon):
  tiny   — a few-thousand-parameter model for tests and the CPU (vocab 1024, tiny tokenizer layout).
  small  — large enough that matmuls dominate on a CPU (benchmarks).
  7b     — the released sizes: Qwen2.5-VL-7B ViT (depth 32, hidden 1280, window 112 px, full attention in
           blocks 7/15/23/31) + Qwen2.5-7B decoder + 2 compressor experts (general, emotion).
Override any field with ``--config.a.b=value``.
"""

import ml_collections

from emoqwen_jax.data.defaults import data_config
from emoqwen_jax.data.tokenizer import tokenizer_info


def vision_config(preset: str) -> ml_collections.ConfigDict:
    v = ml_collections.ConfigDict()
    v.depth = 32  # number of ViT blocks
    v.hidden_size = 1280  # ViT width
    v.num_heads = 16  # ViT attention heads
    v.intermediate_size = 3420  # gated-SiLU MLP width
    v.in_channels = 3
    v.patch_size = 14  # spatial patch side in pixels
    v.temporal_patch_size = 2  # frames per patch (a still image is repeated to 2 frames)
    v.spatial_merge_size = 2  # the compressor merges 2x2 patches into one LLM token
    v.window_size = 112  # window-attention side in pixels (4x4 merged tokens)
    v.fullatt_block_indexes = (7, 15, 23, 31)  # blocks that attend over the whole frame
    v.tokens_per_second = 2.0  # M-RoPE temporal ids per second of video
    v.rms_norm_eps = 1e-6
    v.rope_theta = 10000.0  # 2-D rotary base
    if preset == "tiny":
        v.update(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56, fullatt_block_indexes=(1,))
    elif preset == "small":
        v.update(depth=8, hidden_size=256, num_heads=4, intermediate_size=512, fullatt_block_indexes=(3, 7))
    return v


def text_config(preset: str) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.vocab_size = 152064  # embedding rows (Qwen2.5: 151,643 BPE + specials, padded)
    t.hidden_size = 3584
    t.num_layers = 28
    t.num_heads = 28
    t.num_kv_heads = 4  # grouped-query attention
    t.intermediate_size = 18944  # SwiGLU width
    t.rms_norm_eps = 1e-6
    t.rope_theta = 1_000_000.0
    t.mrope_section = (16, 24, 24)  # rotary frequency pairs for (t, h, w); sums to head_dim / 2
    t.tie_word_embeddings = False
    if preset == "tiny":
        t.update(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 mrope_section=(2, 3, 3))
    elif preset == "small":
        t.update(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                 mrope_section=(8, 12, 12))
    return t


def compressor_config(preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.routing = "sample"  # 'sample': the paper's per-image/video gate | 'token': per-token top-k (scale mode)
    c.num_experts = 2  # patch-merger experts; 1 = plain Qwen2.5-VL
    c.expert_names = ("general", "emotion")  # one name per expert (used in logs and exports); () = generic
    c.gate_input = "pooled"  # 'pooled': mean ViT feature per item (as released) | 'tokens': all item tokens
    c.gate_num_heads = 8  # heads of the gate's self-attention (must divide the ViT width)
    c.gate_hidden_size = 512  # width of the gate's two Linear-ReLU-LayerNorm layers (inferred; not published)
    c.top_k = 2  # scale mode: experts per token
    c.capacity_factor = 1.25  # scale mode: per-expert capacity multiplier (<= 0: dropless)
    c.dispatch = "einsum"  # scale mode: 'einsum' (GSPMD) | 'shard_map' (all-to-all) | 'ragged'
    c.lb_loss_weight = 0.01  # scale mode: Switch load-balancing loss weight
    c.z_loss_weight = 0.0  # scale mode: router z-loss weight
    c.init_noise_std = 0.0  # noise added to copies of the HF merger when importing more than 2 experts
    if preset == "tiny":
        c.update(gate_num_heads=2, gate_hidden_size=16)
    elif preset == "small":
        c.update(gate_num_heads=4, gate_hidden_size=128)
    return c


def model_config(preset: str) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vision = vision_config(preset)
    m.text = text_config(preset)
    m.compressor = compressor_config(preset)
    # Special ids follow the tokenizer's layout for this vocabulary (real Qwen2 ids at the full size).
    info = tokenizer_info(m.text.vocab_size)
    m.image_token_id = info.image_pad_id  # <|image_pad|>
    m.video_token_id = info.video_pad_id  # <|video_pad|>
    m.vision_start_token_id = info.vision_start_id  # <|vision_start|>
    m.vision_end_token_id = info.vision_end_id  # <|vision_end|>
    m.dtype = "float32" if preset == "tiny" else "bfloat16"  # activation / matmul dtype
    m.param_dtype = "float32"  # weight storage (float32 master weights)
    m.remat = "none" if preset in ("tiny", "small") else "block"  # 'block' recomputes blocks in the backward
    return m


def mesh_config() -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data parallelism; -1 = all devices not used by the other axes
    mesh.fsdp = 1  # parameter sharding (ZeRO-3 style)
    mesh.expert = 1  # expert parallelism of the compressor (extra data parallelism elsewhere)
    mesh.tensor = 1  # attention heads / MLP width
    return mesh


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in ("tiny", "small", "7b"):
        raise ValueError(f"unknown preset {preset!r}; choose tiny, small or 7b")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0  # parameter init and sampling
    config.workdir = ""  # where checkpoints, metrics and plots go
    config.init_from = ""  # a HF Qwen2.5-VL directory or one of our model directories to start from
    config.model = model_config(preset)
    config.data = data_config()
    config.data.tokenizer_vocab_size = config.model.text.vocab_size
    config.mesh = mesh_config()
    return config
