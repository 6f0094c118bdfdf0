r"""Train-step benchmark: our jitted step (ViT + compressor + LLM, forward, backward, AdamW) against the same
step in Hugging Face's torch Qwen2.5-VL (eager mode, same sizes, same batch, AdamW).

  python bench/train_step.py --preset small [--runs 7] [--rounds 3] [--experts 1 2] [--threads 0] [--packed]
  python bench/train_step.py --preset small --routing token --experts 2 64 --no-torch   # scale mode vs E
  python bench/train_step.py --preset gpu            # configs/emotion_qwen.py:gpu (~1.5B LLM + the 7B's ViT), MFU

The batch: one 224x224 image (grid 1x16x16 = 256 patches) and one 16-frame 224x224 video (grid 8x16x16 =
2048 patches), each in a short conversation (B = 2). Both frameworks train every parameter with AdamW
(b2 0.95, weight decay 0.1, global-norm clip 1.0). Our model runs with 1 expert (exactly Qwen2.5-VL's merger,
the architecture HF has: that row gives the ratio) and with the paper's 2 experts + gate. HF gets explicit
M-RoPE position ids (computed once on the host, outside the timing), and its default attention (sdpa).

Timing: JAX and torch each run in their OWN process, one after the other (torch's OpenMP threads keep spinning
after a step and slow a JAX step in the same process; docs/design.md, Timing torch and JAX: one process each),
each with the malloc settings of ``emoqwen_jax/runtime/malloc.py`` (GLIBC_TUNABLES) and ``OMP_WAIT_POLICY=PASSIVE``;
``--warmup`` steps, then ``--runs`` timed steps, medians; within a process the rows (expert counts, --packed)
take turns step by step.
``--rounds N`` repeats the pair of processes N times (JAX, torch, JAX, torch, ...): each round's ratio compares
two neighbouring processes, so a slow drift of the machine moves both sides of it; ``ratio`` is then the median
of the rounds' ratios (``ratios_by_round``), and the table's medians pool every round's steps.
Prints a table and, last, a JSON line {"jax_ms", "torch_ms", "ratio", "machine", ...}
where ``machine`` is ``bench/machine.py``'s ``machine_info()`` (cores, load, and ``reliable``: false when the
load exceeded the core count before or after). On a GPU, ``--preset gpu`` uses ``model.attention='cudnn'`` and
reports MFU against the card's bf16 peak; without a GPU it only compiles ahead of time and prints the step's
memory and FLOPs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from emoqwen_jax.runtime.commands import command_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STAGE = "stage3_video"  # whose optimiser settings the step takes (every parameter trains: trainable=(r".*",))
IMAGE_GRID = (1, 16, 16)
VIDEO_GRID = (8, 16, 16)  # 16 frames, temporal patch 2


def bench_config(preset: str, experts: int, routing: str = "sample"):
    """``get_config(preset)`` (the ``small`` or ``gpu`` preset of configs/emotion_qwen.py) for this benchmark's
    batch, with ``experts`` compressor experts routed by ``routing``."""
    import emotion_qwen

    if preset not in ("small", "gpu"):
        raise ValueError(f"--preset {preset!r}; choose 'small' or 'gpu'")
    config = emotion_qwen.get_config(preset)
    if preset == "gpu":
        import jax

        if jax.default_backend() == "gpu":
            config.model.attention = "cudnn"  # fused attention (bf16); the CPU AOT path keeps 'auto'
    config.model.vision.frame_block = 256  # blockwise block of the full layers: a 224x224 frame is 16x16 patches
    config.model.compressor.update(num_experts=experts, routing=routing)  # names generated from the roles
    return config


def make_batch(mcfg, seed: int = 0, packed: bool = False) -> dict:
    """Host arrays for B=2: an image conversation and a video conversation, right-padded; labels on text.
    ``packed``: the same two conversations side by side in one row (``data.packing``'s layout: segment ids 1
    and 2, positions restarting, no padding); only ``"jax"`` then (HF's eager model has no packed rows)."""
    from emoqwen_jax.layout import build_model_inputs
    from emoqwen_jax.model import layout_spec
    from emoqwen_jax.tokens import IGNORE

    rng = np.random.default_rng(seed)
    specials = (mcfg.image_token_id, mcfg.video_token_id, mcfg.vision_start_token_id, mcfg.vision_end_token_id)
    vocab = min(mcfg.text.vocab_size - 10, 4000, *specials)  # ordinary text ids only

    def row(pad_id, grid, prompt, answer):
        n = int(np.prod(grid)) // 4
        return [*rng.integers(0, vocab, prompt), mcfg.vision_start_token_id, *[pad_id] * n,
                mcfg.vision_end_token_id, *rng.integers(0, vocab, answer)]

    rows = [row(mcfg.image_token_id, IMAGE_GRID, 24, 40), row(mcfg.video_token_id, VIDEO_GRID, 24, 40)]
    segment_ids = None
    if packed:
        segment_ids = np.concatenate([np.full(len(r), i + 1, np.int32) for i, r in enumerate(rows)])[None]
        rows = [[t for r in rows for t in r]]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pix = lambda g: rng.standard_normal((int(np.prod(g)), mcfg.vision.patch_dim)).astype(np.float32)  # noqa: E731
    image, video = pix(IMAGE_GRID), pix(VIDEO_GRID)
    inputs = build_model_inputs(ids, mask, image, np.array([IMAGE_GRID]), video, np.array([VIDEO_GRID]), [1.0],
                                spec=layout_spec(mcfg), segment_ids=segment_ids)
    vision_ids = (ids == mcfg.image_token_id) | (ids == mcfg.video_token_id)
    inputs.text.labels = np.where((mask > 0) & ~vision_ids, ids, IGNORE).astype(np.int32)
    raw = dict(input_ids=ids, attention_mask=mask, pixel_values=image, pixel_values_videos=video,
               image_grid_thw=np.array([IMAGE_GRID]), video_grid_thw=np.array([VIDEO_GRID]),
               second_per_grid_ts=np.array([1.0], np.float32))
    return {"jax": inputs, "raw": raw}


# ---- ours --------------------------------------------------------------------------------------------------
def jax_step(config, batch, dense_vit: bool = False):
    """A compiled, donated train step over all parameters and its initial state. ``dense_vit``: every ViT layer
    with the dense [P, P] segment mask (the code before block-local attention), for the before/after row."""
    import jax
    from flax import nnx

    from emoqwen_jax.model import vision

    if dense_vit:
        init_vit = vision.VisionTransformer.__init__

        def dense_init(self, *a, **kw):
            init_vit(self, *a, **kw)
            for block in self.blocks:
                block.attn.attention, block.attn.band = "xla", None

        vision.VisionTransformer.__init__ = dense_init
        try:
            return jax_step(config, batch)
        finally:
            vision.VisionTransformer.__init__ = init_vit

    from emoqwen_jax.model import EmotionQwen
    from emoqwen_jax.train.plan import build_train_step
    from emoqwen_jax.train.step import with_stage_adapters

    mcfg, _, built = build_train_step(config, STAGE, trainable=(r".*",))
    model = with_stage_adapters(EmotionQwen(mcfg, rngs=nnx.Rngs(0)), config, STAGE)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = jax.jit(built.init)(params)
    batch = jax.device_put(batch)
    fn = jax.jit(built.train_step, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    def run(state):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        return state

    return run, state, compile_s, compiled


# ---- Hugging Face torch ------------------------------------------------------------------------------------
def hf_model(mcfg):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t, v = mcfg.text, mcfg.vision
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                         num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                         intermediate_size=t.intermediate_size, rms_norm_eps=t.rms_norm_eps, bos_token_id=None,
                         eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                                             "mrope_section": list(t.mrope_section)}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                           intermediate_size=v.intermediate_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                           tokens_per_second=int(v.tokens_per_second), out_hidden_size=t.hidden_size),
        image_token_id=mcfg.image_token_id, video_token_id=mcfg.video_token_id,
        vision_start_token_id=mcfg.vision_start_token_id, vision_end_token_id=mcfg.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).train()


def torch_step(mcfg, batch):
    import torch

    model = hf_model(mcfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-6, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    raw, inputs = batch["raw"], batch["jax"]
    kw = {k: torch.as_tensor(v) for k, v in raw.items()}
    kw["input_ids"] = kw["input_ids"].long()
    kw["position_ids"] = torch.as_tensor(inputs.text.position_ids.astype(np.int64))
    kw["labels"] = torch.as_tensor(inputs.text.labels.astype(np.int64))

    def run(_):
        model.model.rope_deltas = None
        loss = model(**kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return None

    return run


def timed(fn, state):
    t0 = time.perf_counter()
    state = fn(state)
    return state, (time.perf_counter() - t0) * 1e3


def flops_per_step(mcfg, inputs) -> float:
    from emoqwen_jax.train import flops

    return flops.batch_train_flops(mcfg, inputs)


# Dense bf16 peak FLOP/s per device by name (MFU); unknown cards fall back to config.train.peak_flops_per_device.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(config) -> float:
    import jax

    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), float(config.train.peak_flops_per_device))


def aot_only(config) -> dict:
    """No GPU: compile the step ahead of time on abstract arrays and report its memory and FLOPs."""
    from emoqwen_jax.model import ModelConfig
    from emoqwen_jax.train.plan import plan

    return plan(config, num_devices=1, stage=STAGE, batch=make_batch(ModelConfig.from_run_config(config))["jax"])


def run_side(args) -> dict:
    """One framework's timings in this process: {"side", "compile_s", "times_ms": {row: [ms...]}, ...}."""
    if args.side == "torch":
        import torch

        from emoqwen_jax.model import ModelConfig

        if args.threads:
            torch.set_num_threads(args.threads)
        mcfg = ModelConfig.from_run_config(bench_config(args.preset, 1))
        run = torch_step(mcfg, make_batch(mcfg))
        runners, states = {"torch": run}, {"torch": None}
        extra = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    else:
        import jax

        from emoqwen_jax.model import ModelConfig

        configs = {e: bench_config(args.preset, e, args.routing) for e in args.experts}
        batch = make_batch(ModelConfig.from_run_config(configs[args.experts[0]]))
        runners, states, extra = {}, {}, {"jax": jax.__version__, "backend": jax.default_backend(), "compile_s": {}}
        for e in args.experts:
            run, state, compile_s, _ = jax_step(configs[e], batch["jax"])
            runners[f"jax E={e}"], states[f"jax E={e}"] = run, state
            extra["compile_s"][f"jax E={e}"] = round(compile_s, 1)
        if args.packed:  # the same conversations packed into one row (data.packing): no padding tokens
            e = args.experts[0]
            packed = make_batch(ModelConfig.from_run_config(configs[e]), packed=True)["jax"]
            run, state, compile_s, _ = jax_step(configs[e], packed)
            runners[f"jax E={e} packed"], states[f"jax E={e} packed"] = run, state
            extra["packed_flops"] = flops_per_step(ModelConfig.from_run_config(configs[e]), packed)
        if args.dense_vit:
            e = args.experts[0]
            run, state, compile_s, _ = jax_step(configs[e], batch["jax"], dense_vit=True)
            runners[f"jax E={e} dense ViT"], states[f"jax E={e} dense ViT"] = run, state
        extra["train_flops"] = {f"jax E={e}": flops_per_step(ModelConfig.from_run_config(configs[e]), batch["jax"])
                                for e in args.experts}
        if args.packed:
            extra["train_flops"][f"jax E={args.experts[0]} packed"] = extra.pop("packed_flops")
        if jax.default_backend() == "gpu":
            extra["peak_flops"] = peak_flops(configs[args.experts[0]])
            extra["device"] = jax.devices()[0].device_kind
    return {"side": args.side, "times_ms": interleaved_times(runners, states, args.warmup, args.runs), **extra}


def interleaved_times(runners: dict, states: dict, warmup: int, runs: int) -> dict:
    """{row: [ms, ...]} of ``runs`` timed steps per row after ``warmup`` untimed ones; ``runners[row](state)``
    returns the row's next state (kept in ``states``). Interleaved rounds (one step of every row, then the next
    round): a slow drift of the machine lands on every row alike, so the ratios between rows hold. Steps still
    run one at a time."""
    times = {k: [] for k in runners}
    for i in range(warmup + runs):
        for name, run in runners.items():
            states[name], ms = timed(run, states[name])
            if i >= warmup:
                times[name].append(ms)
    return times


def _child(args, side: str) -> dict:
    """Runs ``--side side`` in a fresh process (``run_json``); returns its JSON line."""
    cmd = [sys.executable, __file__, "--side", side, "--preset", args.preset, "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--experts", *map(str, args.experts),
           "--routing", args.routing]
    if args.dense_vit:
        cmd.append("--dense-vit")
    if args.packed:
        cmd.append("--packed")
    return run_json(cmd)


def run_json(cmd: list[str], echo: bool = True) -> dict:
    """Runs ``cmd`` in a fresh process with the malloc settings of ``emoqwen_jax/runtime/malloc.py`` and a passive
    OpenMP wait; returns the JSON object on its last stdout line (``echo``: print its output too)."""
    from emoqwen_jax.runtime.malloc import GLIBC_ENV

    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_ENV, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    if echo:
        print(out, end="")
    return json.loads(out.strip().splitlines()[-1])


def round_ratio(ours: dict, theirs: dict, first_experts: int) -> dict:
    """One round's torch / ours median ratios from the two processes' ``times_ms``: ``ratio`` against E = 1
    (HF's architecture) when timed, else the first expert count; ``ratio_packed`` when a packed row ran."""
    torch_ms = statistics.median(theirs["torch"])
    mine = {name: statistics.median(v) for name, v in ours.items()}
    out = {"ratio": torch_ms / mine.get("jax E=1", mine[f"jax E={first_experts}"])}
    if f"jax E={first_experts} packed" in mine:
        out["ratio_packed"] = torch_ms / mine[f"jax E={first_experts} packed"]
    return out


def main(argv=None) -> dict:
    ap = command_parser(__doc__, prog="python bench/train_step.py")
    ap.add_argument("--preset", default="small", choices=("small", "gpu"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the JAX and torch processes this many times; ratio = median of the rounds'")
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 2], help="our compressor's expert counts")
    ap.add_argument("--routing", default="sample", choices=("sample", "token"),
                    help="compressor routing: the paper's per-item gate or scale mode (token top-k)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--no-torch", action="store_true", help="time only our step (profiling)")
    ap.add_argument("--packed", action="store_true",
                    help="add a row: the same two conversations packed into one row (data.packing), unpadded")
    ap.add_argument("--dense-vit", action="store_true", help="add a row: E=1 with the dense-mask ViT (before)")
    ap.add_argument("--side", choices=("both", "jax", "torch"), default="both",
                    help="internal: time one framework in this process ('both' spawns one process per side)")
    args = ap.parse_args(argv)
    from machine import describe, machine_info

    if args.side != "both":
        out = run_side(args)
        print(json.dumps(out))
        return out

    import jax

    from emoqwen_jax.model import ModelConfig

    before = machine_info()
    if args.preset == "gpu" and jax.default_backend() == "cpu":
        report = aot_only(bench_config("gpu", 2))
        out = {"preset": "gpu", "backend": "cpu", "compiled_only": True, **report, "machine": machine_info(before)}
        print(json.dumps(out))
        return out
    mcfg = ModelConfig.from_run_config(bench_config(args.preset, args.experts[0], args.routing))
    batch = make_batch(mcfg)
    n_patch = batch["raw"]["pixel_values"].shape[0] + batch["raw"]["pixel_values_videos"].shape[0]
    print(f"preset {args.preset}: LLM {mcfg.text.hidden_size}x{mcfg.text.num_layers}, ViT {mcfg.vision.hidden_size}x"
          f"{mcfg.vision.depth}; batch 2 (image {IMAGE_GRID} + 16-frame video {VIDEO_GRID}), {n_patch} patches, "
          f"text length {batch['raw']['input_ids'].shape[1]}; {platform.processor() or platform.machine()}; "
          f"{describe(before)}")
    times, round_ratios = {}, {"ratio": [], "ratio_packed": []}
    for _ in range(args.rounds):
        ours = _child(args, "jax")
        theirs = None if args.no_torch else _child(args, "torch")
        for name, v in dict(ours["times_ms"], **(theirs["times_ms"] if theirs else {})).items():
            times.setdefault(name, []).extend(v)
        if theirs:
            for key, r in round_ratio(ours["times_ms"], theirs["times_ms"], args.experts[0]).items():
                round_ratios[key].append(r)
    machine = machine_info(before)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| step | median ms | min ms | max ms | analytic GFLOP/s |\n|---|---|---|---|---|")
    flops = ours["train_flops"]
    for name, v in times.items():
        f = (flops.get(name) or flops.get(name.replace(" dense ViT", "")) or flops.get("jax E=1")
             or next(iter(flops.values())))
        print(f"| {name} | {med[name]:.0f} | {min(v):.0f} | {max(v):.0f} | {f / med[name] / 1e6:.1f} |")
    jax_ms = med.get("jax E=1", med[f"jax E={args.experts[0]}"])
    ratio = {k: round(statistics.median(v), 2) if v else None for k, v in round_ratios.items()}
    out = {"jax_ms": round(jax_ms, 1), "torch_ms": round(med["torch"], 1) if "torch" in med else None,
           "ratio": ratio["ratio"], "ratio_packed": ratio["ratio_packed"], "rounds": args.rounds,
           "ratios_by_round": {k: [round(r, 2) for r in v] for k, v in round_ratios.items() if v},
           "jax_ms_by_experts": {k: round(v, 1) for k, v in med.items() if k != "torch"},
           "compile_s": ours.get("compile_s"), "routing": args.routing, "runs": args.runs, "train_flops": flops,
           "machine": machine}
    if "peak_flops" in ours:
        name = f"jax E={args.experts[0]}"
        out["mfu"] = round(flops[name] / (med[name] / 1e3) / ours["peak_flops"], 4)
        out["device"] = ours["device"]
    print(f"({describe(machine)})")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
