r"""Train-step benchmark: our jitted step (ViT + compressor + LLM, forward, backward, AdamW) against the same
step in Hugging Face's torch Qwen2.5-VL (eager mode, same sizes, same batch, AdamW), interleaved.

  python bench/train_step.py --preset small [--runs 7] [--experts 1 2] [--threads 0]
  python bench/train_step.py --preset gpu            # ~1.5B LLM + the 7B's ViT, bfloat16 (MFU on a GPU)

The batch: one 224x224 image (grid 1x16x16 = 256 patches) and one 16-frame 224x224 video (grid 8x16x16 =
2048 patches), each in a short conversation (B = 2). Both frameworks train every parameter with AdamW
(b2 0.95, weight decay 0.1, global-norm clip 1.0). Our model runs with 1 expert (exactly Qwen2.5-VL's merger,
the architecture HF has: that row gives the ratio) and with the paper's 2 experts + gate. HF gets explicit
M-RoPE position ids (computed once on the host, outside the timing), and its default attention (sdpa).

Timing: after ``--warmup`` steps of each, ``--runs`` rounds of (one JAX step, one torch step), so both see the
same machine load; medians. Prints a table and, last, a JSON line {"jax_ms", "torch_ms", "ratio", ...}.
On a machine without a GPU, ``--preset gpu`` only compiles ahead of time and prints the step's memory and FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT))

IMAGE_GRID = (1, 16, 16)
VIDEO_GRID = (8, 16, 16)  # 16 frames, temporal patch 2


def bench_config(preset: str, experts: int):
    import emotion_qwen

    if preset == "small":
        config = emotion_qwen.get_config("small")
    elif preset == "gpu":  # the 7B's ViT + a Qwen2.5-1.5B-sized decoder, bfloat16
        config = emotion_qwen.get_config("7b")
        config.model.text.update(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)
        config.model.remat = "none"
    else:
        raise ValueError(f"--preset {preset!r}; choose 'small' or 'gpu'")
    config.model.vision.frame_block = 256  # a 224x224 frame is 16x16 patches
    config.model.compressor.num_experts = experts
    config.model.compressor.expert_names = () if experts != 2 else ("general", "emotion")
    return config


def make_batch(mcfg, seed: int = 0) -> dict:
    """Host arrays for B=2: an image conversation and a video conversation, right-padded; labels on text."""
    from emoqwen_jax.layout import build_model_inputs
    from emoqwen_jax.model import layout_spec
    from emoqwen_jax.tokens import IGNORE

    rng = np.random.default_rng(seed)
    vocab = min(mcfg.text.vocab_size, 4000) - 10

    def row(pad_id, grid, prompt, answer):
        n = int(np.prod(grid)) // 4
        return [*rng.integers(0, vocab, prompt), mcfg.vision_start_token_id, *[pad_id] * n,
                mcfg.vision_end_token_id, *rng.integers(0, vocab, answer)]

    rows = [row(mcfg.image_token_id, IMAGE_GRID, 24, 40), row(mcfg.video_token_id, VIDEO_GRID, 24, 40)]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pix = lambda g: rng.standard_normal((int(np.prod(g)), mcfg.vision.patch_dim)).astype(np.float32)  # noqa: E731
    image, video = pix(IMAGE_GRID), pix(VIDEO_GRID)
    inputs = build_model_inputs(ids, mask, image, np.array([IMAGE_GRID]), video, np.array([VIDEO_GRID]), [1.0],
                                spec=layout_spec(mcfg))
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
                block.attn.local_block = 0

        vision.VisionTransformer.__init__ = dense_init
        try:
            return jax_step(config, batch)
        finally:
            vision.VisionTransformer.__init__ = init_vit

    from emoqwen_jax.train.plan import build_train_step
    from emoqwen_jax.model import EmotionQwen

    mcfg, step, tx, init = build_train_step(config, "stage3_video", trainable=(r".*",))
    model = EmotionQwen(mcfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = jax.jit(init)(params)
    batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()})
    fn = jax.jit(step, donate_argnums=0)
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
    kw["position_ids"] = torch.as_tensor(inputs["position_ids"].astype(np.int64))
    kw["labels"] = torch.as_tensor(inputs["labels"].astype(np.int64))

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


def load() -> str:
    try:
        return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load n/a"


def flops_per_step(mcfg, inputs) -> float:
    from emoqwen_jax.train import flops

    return flops.batch_train_flops(mcfg, inputs)


def aot_only(config) -> dict:
    """No GPU: compile the step ahead of time on abstract arrays and report its memory and FLOPs."""
    from emoqwen_jax.model import ModelConfig
    from emoqwen_jax.train.plan import plan

    return plan(config, num_devices=1, batch=make_batch(ModelConfig.from_run_config(config))["jax"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=("small", "gpu"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 2], help="our compressor's expert counts")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--no-torch", action="store_true", help="time only our step (profiling)")
    ap.add_argument("--dense-vit", action="store_true", help="add a row: E=1 with the dense-mask ViT (before)")
    args = ap.parse_args(argv)

    import jax

    from emoqwen_jax.model import ModelConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = jax.default_backend()
    if args.preset == "gpu" and backend == "cpu":
        report = aot_only(bench_config("gpu", 2))
        print(json.dumps({"preset": "gpu", "backend": "cpu", "compiled_only": True, **report}))
        return report

    configs = {e: bench_config(args.preset, e) for e in args.experts}
    mcfgs = {e: ModelConfig.from_run_config(c) for e, c in configs.items()}
    batch = make_batch(mcfgs[args.experts[0]])
    n_patch = batch["raw"]["pixel_values"].shape[0] + batch["raw"]["pixel_values_videos"].shape[0]
    print(f"preset {args.preset}: LLM {mcfgs[args.experts[0]].text.hidden_size}x{mcfgs[args.experts[0]].text.num_layers}"
          f", ViT {mcfgs[args.experts[0]].vision.hidden_size}x{mcfgs[args.experts[0]].vision.depth}; batch 2 "
          f"(image {IMAGE_GRID} + 16-frame video {VIDEO_GRID}), {n_patch} patches, text length "
          f"{batch['raw']['input_ids'].shape[1]}; {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cpus, jax {jax.__version__} ({backend}); {load()}")
    runners, states = {}, {}
    for e in args.experts:
        run, state, compile_s, _ = jax_step(configs[e], batch["jax"])
        runners[f"jax E={e}"], states[f"jax E={e}"] = run, state
        print(f"  compiled ours (E={e}) in {compile_s:.1f} s")
    if args.dense_vit:
        e = args.experts[0]
        run, state, compile_s, _ = jax_step(configs[e], batch["jax"], dense_vit=True)
        runners[f"jax E={e} dense ViT"], states[f"jax E={e} dense ViT"] = run, state
        print(f"  compiled ours (E={e}, dense ViT masks) in {compile_s:.1f} s")
    if not args.no_torch:
        import torch

        runners["torch"], states["torch"] = torch_step(mcfgs[args.experts[0]] if 1 not in mcfgs else mcfgs[1],
                                                       batch), None
        print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = {k: [] for k in runners}
    for i in range(args.warmup + args.runs):
        for name, run in runners.items():
            states[name], ms = timed(run, states[name])
            if i >= args.warmup:
                times[name].append(ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = flops_per_step(mcfgs[args.experts[0]], batch["jax"])
    print(f"\n| step | median ms | min ms | max ms | analytic GFLOP/s |\n|---|---|---|---|---|")
    for name, v in times.items():
        e = int(name.split("=")[1].split()[0]) if "=" in name else (1 if 1 in mcfgs else args.experts[0])
        f = flops_per_step(mcfgs[e], batch["jax"])
        print(f"| {name} | {med[name]:.0f} | {min(v):.0f} | {max(v):.0f} | {f / med[name] / 1e6:.1f} |")
    ours = med.get("jax E=1", med[f"jax E={args.experts[0]}"])
    out = {"jax_ms": round(ours, 1), "torch_ms": round(med["torch"], 1) if "torch" in med else None,
           "ratio": round(med["torch"] / ours, 2) if "torch" in med else None,
           "jax_ms_by_experts": {k: round(v, 1) for k, v in med.items() if k != "torch"},
           "runs": args.runs, "train_flops": flops, "load": load()}
    print(f"({load()})")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
