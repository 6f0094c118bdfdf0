r"""Emotion-Qwen run configs, in big_vision's shape: ``get_config("PRESET[,OPTION...]")``.

  emoqwen-train --config=configs/emotion_qwen.py:demo --config.workdir=runs/demo
  emoqwen-train --config=configs/emotion_qwen.py:7b --config.workdir=gs://bucket/run \
      --config.init_from=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.stages.stage1_align.mixture="({'manifest': '/data/align.jsonl', 'data_root': '/data'},)" ...
  emoqwen-train --config=configs/emotion_qwen.py:7b,runlocal --config.workdir=runs/try ...   # a quick local run
  emoqwen-run-sample --config=configs/emotion_qwen.py:tiny

The fields below are the real defaults (the released 7B recipe), written once. A preset picks the model size
(``emoqwen_jax/sizes.py``) and, for the small ones, implies ``runlocal``: the one shrink block at the end of
``get_config`` (``runlocal``). Presets (configs/README.md):
  7b      — the released sizes: Qwen2.5-VL-7B ViT + Qwen2.5-7B decoder + 2 compressor experts (general, emotion);
            no default data: every stage to run needs its ``mixture``.
  gpu     — the 7B's ViT + a Qwen2.5-1.5B-sized decoder for one GPU (bench/train_step.py --preset gpu); no data.
  small   — large enough that matmuls dominate on a CPU (benchmarks); runlocal; no default data.
  tiny    — a ~300k-parameter model for tests and the CPU (vocab 1024, tiny tokenizer layout); runlocal; trains
            on the bundled demo set.
  demo    — the tiny model trained through all three stages on the bundled demo set, then scored on its held-out
            clips (CPU, a few minutes).
  demo_rl — the demo's stages 1 and 2, a short stage 3 whose answers use the <think>/<answer> format (a weak
            start), then stage4_rl (GRPO) on the demo training clips; held-out clips scored after stages 3 and 4
            (docs/rl.md).
Options (after a comma): ``runlocal`` — the shrink block (few steps, batch 2, short samples, float32, one-device
mesh, frequent checkpoints and logs). Override any field with ``--config.a.b=value``.

LoRA: every stage has ``stages.<name>.lora`` (``enabled`` False by default). ``stages.stage3_lora`` is the
released LoRA recipe (docs/design.md: rank 64, alpha 64, dropout 0.05 on the LLM's q/k/v/o projections, lr 1e-4,
AdamW b2 0.95, weight decay 0.1, cosine, 1% warmup) on stage 3's data. It is not in ``run_stages`` by default:
  emoqwen-train --config=configs/emotion_qwen.py:7b --config.workdir=runs/lora \
      --config.init_from=/ckpt/emoqwen-7b --config.run_stages='("stage3_lora",)' \
      --config.stages.stage3_lora.mixture="({'manifest': '/data/video.jsonl', 'data_root': '/data'},)"
"""

import json

import ml_collections

from emoqwen_jax.data.defaults import data_config
from emoqwen_jax.parallel.rules import DEFAULT_RULES
from emoqwen_jax.sizes import size as model_size
from emoqwen_jax.tokens import tokenizer_info

PRESETS = ("demo", "demo_rl", "tiny", "small", "gpu", "7b")
OPTIONS = ("runlocal",)
RUNLOCAL = ("demo", "demo_rl", "tiny", "small")  # presets that always take the shrink block
DEMO_DATA = ("demo", "demo_rl", "tiny")  # presets whose stages read the bundled demo set by default
SIZE = {"demo": "tiny", "demo_rl": "tiny"}  # preset -> emoqwen_jax/sizes.py entry (default: the preset's name)
STAGES = ("stage1_align", "stage2_emotion", "stage3_video")
EXTRA_STAGES = ("stage3_lora", "stage_audio_align", "stage4_rl")  # defined for every preset, run only when named
# in run_stages
DEMO_MIXTURE = ({"manifest": "{demo}/train.jsonl", "data_root": "{demo}", "weight": 1.0},)  # {demo}: the bundled set


def parse_arg(arg: str | None) -> tuple[str, frozenset[str]]:
    """``"7b,runlocal"`` -> ("7b", {"runlocal"}); ValueError naming the choices for an unknown preset/option."""
    preset, *options = [part.strip() for part in (arg or "tiny").split(",")]
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown config option(s) {unknown} in {arg!r}; the options are {OPTIONS}")
    return preset, frozenset(options)


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    """The run config of ``arg`` = ``PRESET[,OPTION...]`` (module docstring)."""
    preset, options = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0  # parameter init and sampling
    config.workdir = ""  # where checkpoints, metrics, plots and stage weights go (required for training)
    config.init_from = ""  # a HF Qwen2.5-VL directory or one of our model directories to start stage 1 from
    # Stages whose mixture names the bundled demo set ({demo}) refuse to run unless this is True (a demo manifest
    # left in a real run's config must not train a 7B model on cartoons); the demo presets set it.
    config.allow_demo_data = False
    config.model = model_config(SIZE.get(preset, preset))
    config.data = run_data_config(config.model)
    config.mesh = mesh_config()
    config.run_stages = STAGES  # stage names, run in order; each starts from the previous one's weights
    config.stages = ml_collections.ConfigDict({name: stage_config(name) for name in STAGES + EXTRA_STAGES})
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 200  # micro-steps between checkpoints
    config.checkpoint.max_to_keep = 3
    config.checkpoint.async_save = True  # write in the background while training continues
    config.train = ml_collections.ConfigDict()
    config.train.log_every = 10  # micro-steps between metrics.jsonl rows
    # Peak FLOP/s of one device for MFU (bf16 dense: 989e12 H100 SXM, 459e12 TPU v5p; CPU: a nominal 1e11).
    config.train.peak_flops_per_device = 989e12
    config.train.max_nonfinite_in_a_row = 5  # consecutive skipped (NaN/Inf) updates before the run stops
    # Poll the GCE metadata server's maintenance-event; a notice saves like SIGTERM (launch/tpu_pod.sh sets it).
    config.train.watch_maintenance_events = False
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""  # host:port of process 0 ('' = single process / auto)
    config.distributed.num_processes = 0
    config.distributed.process_id = -1
    config.distributed.local_device_count = 0  # CPU only: host devices per process (testing multi-host)
    config.distributed.auto = False  # jax.distributed.initialize() from the cluster environment (TPU, SLURM)

    if preset == "gpu":  # one GPU: the whole model trains without recomputation on a data-parallel mesh of one
        config.model.remat = "none"
        config.mesh.update(data=-1, fsdp=1, tensor=1)
        config.data.num_shards = 0
    if preset in DEMO_DATA:
        config.allow_demo_data = True
        for stage in config.stages.values():
            stage.mixture = DEMO_MIXTURE
    if "runlocal" in options or preset in RUNLOCAL:
        runlocal(config)
    if preset in ("demo", "demo_rl"):
        demo(config)
    if preset == "demo_rl":
        demo_rl(config)
    return config


def runlocal(config: ml_collections.ConfigDict) -> None:
    """The shrink block: a quick run on one machine (CPU) with the preset's model — a few steps of batch 2 on short
    samples and small frames, float32 without recomputation or layer scan, a one-device-friendly mesh, checkpoints
    every 5 steps and a metrics row every step."""
    config.model.update(dtype="float32", remat="none", scan_layers=False)
    config.data.update(**DEMO_FRAMES, length_buckets=(512,), patch_buckets=(512,), max_length=512, num_shards=0)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.checkpoint.every_steps = 5
    config.train.update(log_every=1, peak_flops_per_device=1e11)
    for name, s in config.stages.items():
        s.update(num_steps=3, batch_size=2, max_length=512)
        s.optimizer.update(learning_rate=3e-3, warmup_fraction=0.1)
        if name == "stage4_rl":
            s.batch_size = 8  # 2 prompts x 4 completions
            s.rl.group_size = 4
            s.rl.max_new_tokens = 16
            s.optimizer.learning_rate = 1e-4
            s.optimizer.warmup_fraction = 0.0


def demo(config: ml_collections.ConfigDict) -> None:
    """README command 1 (after the shrink block): the tiny model with audio on the demo set's cartoon clips."""
    config.model.audio.enabled = True  # README command 1 exercises the audio path
    # Small frames and one bucket per size, so the CPU compiles few shapes (a demo sample is ~140 tokens).
    config.data.update(length_buckets=(DEMO_LENGTH,), patch_buckets=(DEMO_BATCH * 128,), max_length=DEMO_LENGTH)
    config.checkpoint.every_steps = 50  # a few hundred steps: checkpoint and log less often than every 5 and every step
    config.train.log_every = 5
    for name, s in config.stages.items():
        s.num_steps = 12
        lora = name == "stage3_lora"
        demo_stage(s, "stage3_video" if lora or name == "stage4_rl" else name, lora)


def vision_config(size: str) -> ml_collections.ConfigDict:
    # Sizes from emoqwen_jax/sizes.py: depth (ViT blocks), hidden_size (width), num_heads, intermediate_size
    # (gated-SiLU MLP width), in_channels, patch_size (patch side in pixels), temporal_patch_size (frames per
    # patch; a still image is repeated), spatial_merge_size (the compressor merges 2x2 patches into one LLM
    # token), window_size (window-attention side in pixels), fullatt_block_indexes (blocks that attend over the
    # whole frame), tokens_per_second (M-RoPE temporal ids per second of video).
    v = ml_collections.ConfigDict(model_size(size)["vision"])
    v.rms_norm_eps = 1e-6
    v.rope_theta = 10000.0  # 2-D rotary base
    # Block size (patches) of the full-attention layers under model.attention='blockwise' (any frame size is
    # exact: frames up to 768*28*28 px = 3072 patches); 0 = model.attention_block.
    v.frame_block = 0
    return v


def text_config(size: str) -> ml_collections.ConfigDict:
    # Sizes from emoqwen_jax/sizes.py: vocab_size (embedding rows; Qwen2.5: 151,643 BPE + specials, padded),
    # hidden_size, num_layers, num_heads, num_kv_heads (grouped-query attention), intermediate_size (SwiGLU
    # width), mrope_section (rotary frequency pairs for (t, h, w); sums to head_dim / 2), tie_word_embeddings.
    t = ml_collections.ConfigDict({"tie_word_embeddings": False, **model_size(size)["text"]})
    t.rms_norm_eps = 1e-6
    t.rope_theta = 1_000_000.0
    return t


def compressor_config(size: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.routing = "sample"  # 'sample': the paper's per-image/video gate | 'token': per-token top-k (scale mode)
    c.num_experts = 2  # patch-merger experts; 1 = plain Qwen2.5-VL
    # One name per expert (logs, exports, trainable regexes); () = generated from the roles: paper mode
    # 'general', then 'emotion' (E = 2) or 'emotion_1'… ; scale mode 'expert_0'…
    c.expert_names = ()
    c.gate_input = "pooled"  # 'pooled': mean ViT feature per item (as released) | 'tokens': all item tokens
    # gate_num_heads (the gate's self-attention heads; must divide the ViT width) and gate_hidden_size (width
    # of the gate's two Linear-ReLU-LayerNorm layers; inferred, not published) come from emoqwen_jax/sizes.py.
    c.update(model_size(size)["compressor"])
    c.top_k = 2  # scale mode: experts per token
    c.capacity_factor = 1.25  # scale mode: per-expert capacity multiplier (<= 0: dropless)
    c.dispatch = "einsum"  # scale mode: 'einsum' (GSPMD) | 'shard_map' (all-to-all) | 'ragged' (dropless)
    c.group_size = 128  # scale mode: tokens per routing group; capacity and drops per group (same on any mesh)
    c.lb_loss_weight = 0.01  # scale mode: Switch load-balancing loss weight
    c.z_loss_weight = 0.0  # scale mode: router z-loss weight
    c.init_noise_std = 0.0  # noise added to copies of the HF merger when importing more than 2 experts
    return c


def audio_config(size: str) -> ml_collections.ConfigDict:
    """``config.model.audio``: Qwen2-Audio's encoder and its projector (docs/audio.md)."""
    # Sizes from emoqwen_jax/sizes.py (HF Qwen2AudioEncoderConfig names): num_mel_bins (log-mel bins), d_model
    # (encoder width), encoder_layers, encoder_attention_heads, encoder_ffn_dim (GELU MLP width),
    # max_source_positions (positions after the stride-2 conv: 2 * 1500 = 3000 mel frames = 30 s windows).
    a = ml_collections.ConfigDict({"enabled": False})  # the demo preset turns it on
    a.update(model_size(size)["audio"])
    a.scale_embedding = False
    a.layer_norm_eps = 1e-5
    a.projector = "linear"  # 'linear' (Qwen2-Audio's multi_modal_projector) | 'mlp' (Linear, GELU, Linear)
    a.projector_hidden_size = 0  # 'mlp' hidden width; 0 = the LLM width
    a.position_rule = "text"  # 'text': audio block after the vision block, text-like M-RoPE ids | 'interleave'
    a.interleave_seconds = 2.0  # 'interleave': seconds of video and of audio per chunk (Qwen2.5-Omni TMRoPE)
    a.freeze_encoder = True  # the encoder never trains (no gradient through it) unless this is False
    a.gate_audio = False  # the compressor's gate also sees the sample's pooled audio features (option)
    return a


def model_config(size: str) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vision = vision_config(size)
    m.text = text_config(size)
    m.compressor = compressor_config(size)
    # Special ids follow the tokenizer's layout for this vocabulary (real Qwen2 ids at the full size).
    info = tokenizer_info(m.text.vocab_size)
    m.image_token_id = info.image_pad_id  # <|image_pad|>
    m.video_token_id = info.video_pad_id  # <|video_pad|>
    m.vision_start_token_id = info.vision_start_id  # <|vision_start|>
    m.vision_end_token_id = info.vision_end_id  # <|vision_end|>
    m.audio = audio_config(size)
    m.audio.audio_bos_token_id = info.audio_bos_id  # <|audio_bos|>, right after the tokenizer's pad
    m.audio.audio_token_id = info.audio_id  # <|AUDIO|>
    m.audio.audio_eos_token_id = info.audio_eos_id  # <|audio_eos|>
    m.dtype = "bfloat16"  # activation / matmul dtype
    m.param_dtype = "float32"  # weight storage (float32 master weights)
    # Backward-pass memory: 'none' keeps activations | 'block' recomputes each ViT/decoder block |
    # 'dots_saveable' keeps only the matmul outputs of each block.
    m.remat = "block"
    m.scan_layers = True  # one lax.scan over the layers (ViT: over its window/full groups): fast compiles
    # 'auto' (decoder: splash on TPU, cudnn on GPU in bf16; else blockwise from 2048 keys, xla below) | 'xla'
    # (dense reference) | 'blockwise' (flash-style pure JAX, O(T*block) memory) | 'splash' | 'cudnn'.
    m.attention = "auto"
    m.attention_block = 512  # query/key block of 'blockwise' attention (decoder; ViT full layers by default)
    return m


def run_data_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.data``: ``emoqwen_jax.data.defaults.data_config()`` (every data field, documented there) with the
    run's buckets and sharding; the audio fields follow ``config.model.audio``."""
    d = data_config()
    d.tokenizer_vocab_size = model.text.vocab_size
    # The data side follows config.model.audio (references: a command-line override changes both).
    audio = model.audio
    d.audio.enabled = audio.get_ref("enabled")
    d.audio.num_mel_bins = audio.get_ref("num_mel_bins")
    d.audio.window_frames = audio.get_ref("max_source_positions") * 2
    d.audio.position_rule = audio.get_ref("position_rule")
    d.audio.interleave_seconds = audio.get_ref("interleave_seconds")
    # Stage 3 trains samples up to 16384 tokens; frames keep Qwen2.5-VL's own budget (768*28*28 px).
    d.length_buckets = (2048, 4096, 8192, 16384)
    d.patch_buckets = (4096, 16384, 65536)
    # Data shards per global batch: 0 = one per process, -1 = one per batch device (data x fsdp x expert), N.
    # Fixes the data order. With a multiple of the batch devices the ViT's attention and window permutation run on
    # each device's own patches (no all-gather of the patch axis; docs/long_context.md).
    d.num_shards = -1
    # Sequence packing (--config.data.packing=True): several samples per row up to the length bucket, attention
    # only within a sample (segment ids), M-RoPE positions restarting per sample, labels unchanged; off by default.
    d.packing = False
    return d


def mesh_config() -> ml_collections.ConfigDict:
    # The layout `emoqwen-plan` fits for the 7B (docs/long_context.md): tensor parallelism over 4 devices, FSDP
    # over the rest; attention 'auto' is blockwise/splash/cudnn at the 7B's lengths and the loss is chunked.
    mesh = ml_collections.ConfigDict()
    mesh.data = 1  # data parallelism; -1 = all devices not used by the other axes
    mesh.fsdp = -1  # parameter sharding (ZeRO-3 style)
    mesh.expert = 1  # expert parallelism of the compressor (extra data parallelism elsewhere)
    mesh.tensor = 4  # attention heads / MLP width
    mesh.num_devices = 0  # use only the first N devices (0 = every global device)
    # Multislice: data / fsdp factors across slices (DCN); the sizes above then describe one slice.
    mesh.dcn_data = 1
    mesh.dcn_fsdp = 1
    # Logical axis -> mesh axes, the table training and emoqwen-plan read (parameters by their ``logical_axes``,
    # activations by the model's ``constrain`` calls). Parameters: embed / merge / embed_out over fsdp (+ expert:
    # outside the MoE layer the expert axis is extra FSDP); mlp, heads, qkv, vocab over tensor (Megatron-style);
    # expert over expert; the gate replicated. Activations: batch-like axes over data x fsdp x expert, heads and
    # MLP width over tensor. Starts from emoqwen_jax/parallel/rules.py's table (which inference uses); override
    # with --config.mesh.rules='(("embed", "fsdp"), ...)'.
    mesh.rules = DEFAULT_RULES
    return mesh


# What trains (see emoqwen_jax/train/optim.py): compressor parts by role, whatever the number of experts —
# 'general' (paper-mode expert 0), 'emotion' (the other paper-mode experts), 'routed' (every scale-mode
# expert), 'gate' (the gating network or the router); other parameters by path regex.
COMPRESSOR_ROLES = ("general", "emotion", "routed", "gate")
EMOTION_ROLES = ("emotion", "routed", "gate")  # everything in the compressor but the general expert
COMPRESSOR = (r"^compressor/",)  # path regexes for presets that train whole parts (the demo's stage 3)
VISION = (r"^visual/",)
LLM = (r"^language_model/",)
AUDIO_PROJECTOR = (r"^audio_(projector|gate_proj)/",)  # the audio projector (and the gate's audio input)
# Module-path regexes (see emoqwen_jax/model/lora.py) of the released LoRA recipe: the LLM's q/k/v/o.
LLM_ATTENTION = (r"^language_model/layers/\d+/self_attn/(q_proj|k_proj|v_proj|o_proj)$",)


def lora_config(enabled: bool = False) -> ml_collections.ConfigDict:
    """Adapter settings of a stage; defaults are the released recipe's (docs/design.md, The released fine-tuning
    recipe and its LoRA)."""
    lora = ml_collections.ConfigDict()
    lora.enabled = enabled  # swap LoRA adapters into the targets; base weights stay frozen unless `trainable`
    lora.rank = 64
    lora.alpha = 64.0  # scale = alpha / rank, as PEFT
    lora.dropout = 0.05  # on the adapter input, one mask per micro-step (TrainState rng folded with the step)
    lora.targets = LLM_ATTENTION  # regexes re.search'ed against '/'-joined Linear module paths
    return lora


def stage_config(name: str) -> ml_collections.ConfigDict:
    """One stage: data mixture, what trains (the rest is frozen), optimiser, schedule and length.

    Following the paper as far as it is published (docs/design.md, The three training stages; the freeze sets are
    our inference):
      stage1_align    general alignment on image-text data: compressor + gate train (ViT and LLM frozen)
      stage2_emotion  emotion pretraining: emotion expert(s) + gate train, general expert frozen (any E; in
                      scale mode every routed expert + the router)
      stage3_video    video instruction tuning: LLM + emotion expert(s) + gate
      stage3_lora     stage 3 with the released LoRA recipe: adapters on the LLM's q/k/v/o train, nothing else
                      (inferred: the release does not say whether its LoRA run also trained the emotion expert
                      and gate; set `trainable_roles` to EMOTION_ROLES for that)
      stage4_rl       GRPO from verifiable rewards (kind 'rl', docs/rl.md) on stage 3's data and freeze set:
                      `batch_size` counts completions (prompts x rl.group_size), `max_length` prompt + completion
    """
    lora = name == "stage3_lora"
    audio_align = name == "stage_audio_align"
    rl = name == "stage4_rl"
    # stage3_lora: stage 3's data, length and batch; stage_audio_align: stage 1's (alignment of a new projector)
    name = "stage3_video" if lora or rl else "stage1_align" if audio_align else name
    s = ml_collections.ConfigDict()
    s.kind = "rl" if rl else "supervised"  # 'supervised' (next-token loss) | 'rl' (emoqwen_jax.rl, GRPO)
    # Manifests + weights ({'manifest', 'data_root', 'weight'?} or {'prepared', 'split'?, 'weight'?}; docs/data.md).
    # No default: a stage that runs needs one (the demo presets read the bundled demo set, DEMO_MIXTURE).
    s.mixture = ()
    s.trainable = {"stage1_align": (), "stage2_emotion": (), "stage3_video": LLM}[name]  # path regexes
    s.trainable_roles = {"stage1_align": COMPRESSOR_ROLES, "stage2_emotion": EMOTION_ROLES,
                         "stage3_video": EMOTION_ROLES}[name]  # compressor parts by role
    s.optimizer = ml_collections.ConfigDict()
    s.optimizer.learning_rate = {"stage1_align": 1e-3, "stage2_emotion": 2e-5, "stage3_video": 1e-6}[name]
    s.optimizer.b1 = 0.9
    s.optimizer.b2 = 0.95  # as the released recipe
    s.optimizer.eps = 1e-8
    s.optimizer.weight_decay = 0.1  # matrices only
    s.optimizer.clip_norm = 1.0
    s.optimizer.warmup_fraction = 0.01  # linear warmup, then cosine
    s.optimizer.end_lr_fraction = 0.0
    s.optimizer.grad_accum = 1  # micro-batches per optimiser update
    s.num_steps = {"stage1_align": 2000, "stage2_emotion": 2000, "stage3_video": 3000}[name]  # optimiser updates
    s.batch_size = {"stage1_align": 256, "stage2_emotion": 128, "stage3_video": 64}[name]  # global, per micro-step
    s.max_length = 16384 if name == "stage3_video" else 2048  # longer samples are rejected, never truncated
    # Benchmarks run on the stage's final weights ('' = none): "suite.json:general" or a JSON list of specs
    # such as '[{"benchmark": "pope", "root": "/data/POPE", "limit": 200}]' (see docs/evaluation.md).
    s.eval_suite = ""
    s.lora = lora_config(enabled=lora)
    # With config.model.audio.enabled, the audio projector trains too (stage 3, and the audio alignment stage).
    s.train_audio_projector = name == "stage3_video" and not lora
    if audio_align:  # only the audio projector trains: encoder, ViT, compressor and LLM stay as they are
        s.trainable = AUDIO_PROJECTOR
        s.trainable_roles = ()
    if lora:
        s.trainable = ()  # only the adapters (added by the trainer)
        s.trainable_roles = ()
        s.optimizer.learning_rate = 1e-4
    if rl:
        s.rl = rl_config()
        s.num_steps = 1000  # rollout + update rounds (each does rl.num_iterations optimiser updates)
        s.optimizer.warmup_fraction = 0.0
        s.optimizer.weight_decay = 0.0
    return s


def rl_config() -> ml_collections.ConfigDict:
    """The GRPO settings of an RL stage (docs/rl.md); defaults follow R1-Omni's recipe (TRL's GRPO trainer)."""
    r = ml_collections.ConfigDict()
    r.group_size = 8  # completions sampled per prompt (G)
    r.temperature = 1.0  # sampling temperature; the loss's log-probabilities use the same scaled logits
    r.top_p = 1.0
    r.max_new_tokens = 512  # completion budget
    r.clip_eps = 0.2  # ratio clip: [1 - clip_eps, 1 + clip_eps_high]
    r.clip_eps_high = 0.2  # DAPO's clip-higher sets it above clip_eps (e.g. 0.28)
    r.beta = 0.04  # k3 KL weight to the frozen reference (the stage's incoming weights); 0 = no reference
    r.num_iterations = 1  # optimiser passes over each rollout batch (mu)
    r.normalization = "sequence"  # 'sequence' (per-completion mean, then batch mean) | 'token' (DAPO)
    r.std_normalize = True  # divide advantages by the group's std (False: Dr. GRPO)
    r.rewards = {"accuracy": 1.0, "format": 1.0}  # registered reward name -> weight (emoqwen_jax.rl.rewards)
    r.length_buffer = 0  # length_penalty's ramp in tokens (0: max_new_tokens // 4)
    # Appended to every prompt's user turn (R1-Omni's inference prompt asks the same): the rewards read the tags.
    r.format_instruction = (" Output the thinking process in <think> </think> and final emotion in "
                            "<answer> </answer> tags.")
    return r


def demo_stage(s: ml_collections.ConfigDict, name: str, lora: bool) -> None:
    """README command 1: the tiny model, from random weights, learns the demo set's five cartoon expressions
    in a few CPU minutes and is scored on held-out clips. Stages 1 and 2 keep the paper's freeze sets for a
    few steps (they show the pipeline; with a random LLM they cannot teach much); stage 3 trains the whole
    model (nothing pretrained to protect) long enough to learn, then runs the held-out DFEW-style fold."""
    s.batch_size = DEMO_BATCH
    s.max_length = DEMO_LENGTH
    if name == "stage3_video" and not lora:
        s.num_steps = DEMO_STAGE3_STEPS
        s.trainable = VISION + COMPRESSOR + LLM
        s.eval_suite = json.dumps([{"benchmark": "dfew", "labels": "{demo}/eval_dfew.csv", "video_root": "{demo}"}])
        # Frame sizes as the demo trained on them (the standard eval's >= 128*28^2 pixels would upscale the 112-px
        # clips to a grid the model never saw); the report lists these overrides. (The 1-s clips give the same 4
        # frames at the standard 3 fps as at the training 2 fps.)
        s.eval_set = ml_collections.ConfigDict({k: v for k, v in DEMO_FRAMES.items() if k != "fps"})
        s.eval_batch_size = 8


# The demo preset's frames (4 of each 1-s clip, at most 112x112: 4x4 merged tokens per frame pair),
# batch and lengths (a demo sample is ~140 tokens), and its stage-3 length.
DEMO_FRAMES = dict(fps=2.0, video_min_pixels=56 * 56, video_max_pixels=112 * 112, video_total_pixels=0,
                   image_min_pixels=56 * 56, image_max_pixels=112 * 112)
DEMO_BATCH, DEMO_LENGTH, DEMO_STAGE3_STEPS = 8, 192, 300


# demo_rl: stage 3's steps on {demo}/train_format.jsonl (a start that names about half the held-out clips: the
# plain demo's 300 steps name all of them; after the think span the class word is learned more slowly), the RL
# rounds, completions per prompt and prompts per round. 400 rounds at 5e-4: at 1e-3 the policy's entropy
# collapses after about 300 rounds, and from one seed's start the reward falls back (docs/rl.md, The demo).
DEMO_RL_STAGE3_STEPS, DEMO_RL_STEPS, DEMO_RL_GROUP, DEMO_RL_PROMPTS = 300, 400, 8, 8


def demo_rl(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The demo preset with a weak stage 3 on answers in the think/answer format (``{demo}/train_format.jsonl``:
    the same think text for every clip, then the class word; the prompt is the DFEW question the evaluation
    asks, so the RL stage adds no instruction), then stage4_rl on the same training clips, scored like stage 3.
    docs/rl.md (The demo) gives the runs behind these values."""
    config.preset = "demo_rl"
    config.run_stages = STAGES + ("stage4_rl",)
    answers = ({"manifest": "{demo}/train_format.jsonl", "data_root": "{demo}", "weight": 1.0},)
    s3, rl = config.stages.stage3_video, config.stages.stage4_rl
    s3.mixture = answers
    s3.num_steps = DEMO_RL_STAGE3_STEPS
    rl.mixture = answers
    rl.num_steps = DEMO_RL_STEPS
    rl.batch_size = DEMO_RL_GROUP * DEMO_RL_PROMPTS
    rl.trainable = LLM
    rl.trainable_roles = EMOTION_ROLES
    rl.train_audio_projector = False
    rl.optimizer.learning_rate = 5e-4
    rl.optimizer.warmup_fraction = 0.0
    rl.optimizer.end_lr_fraction = 1.0  # a constant rate: a cosine decay to 0 did worse (docs/rl.md)
    rl.optimizer.weight_decay = 0.0
    # Temperature 1 (R1-Omni's): the start's class words are spread, so a group finds the right one. Token
    # normalisation (DAPO's): every token weighs the same, so the tokens a group's completions share cancel
    # (docs/rl.md, The demo, has the runs with per-sequence means). 32 tokens hold the longest answer.
    rl.rl.update(group_size=DEMO_RL_GROUP, max_new_tokens=32, beta=0.0, format_instruction="",
                 num_iterations=1, temperature=1.0, normalization="token")
    config.checkpoint.every_steps = 10
    config.train.log_every = 1
    return config
