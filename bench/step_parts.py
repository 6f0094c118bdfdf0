r"""Where the `small` train step's time goes, part by part, ours against HF torch eager (same sizes, same batch).

  python bench/step_parts.py [--runs 7] [--warmup 2]

Forward + backward (gradients to every weight) of, on ``bench/train_step.py``'s batch (one 224² image + one
16-frame 224² video, B = 2, padded to 578 tokens like HF):
  vit        the vision tower alone (2,304 patches in, features out; loss = sum(features * r));
  decoder    the 8 decoder layers + final norm on fixed input embeddings [2, 578, 512] (loss = sum(h * r)),
             gradients also to the embeddings;
  attention  one decoder layer's attention core: q [2, 578, 8, 64], k/v [2, 578, 2, 64], causal, the image
             row's padding masked. Ours: ``emoqwen_jax.model.attention`` as the decoder calls it ('auto':
             'xla' at 578 keys); torch: what HF's sdpa path runs (``repeat_kv``, then
             ``scaled_dot_product_attention`` with the boolean causal+padding mask);
and, forward only, the machine's float32 matmul rate for each framework:
  matmul     one [1156, 512] x [512, 1408] product (the decoder MLP's up projection on the batch's 1,156
             token rows), reported in GFLOP/s too.
What the parts leave out of ``bench/train_step.py``'s step: the merger, the embedding, the LM head and loss,
the optimizer.

Each framework runs in its own process with the malloc settings of ``emoqwen_jax/runtime/malloc.py`` and
``OMP_WAIT_POLICY=PASSIVE`` (as ``bench/train_step.py``); within a process the parts take turns step by step;
medians. Prints a table and, last, a JSON line {"parts": {part: {"jax_ms", "torch_ms", "ratio"}}, "machine"}
(the matmul part adds "jax_gflops" and "torch_gflops").
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_step  # noqa: E402  (puts configs/ and the repository on sys.path)

from emoqwen_jax.runtime.commands import command_parser  # noqa: E402

PARTS = ("vit", "decoder", "attention", "matmul")
MATMUL = (1156, 512, 1408)  # M, K, N
ATTN = dict(b=2, t=578, heads=8, kv_heads=2, head_dim=64, real=(130, 578))  # the bench batch's rows


def _attention_inputs():
    rng = np.random.default_rng(0)
    a = ATTN
    q = rng.standard_normal((a["b"], a["t"], a["heads"], a["head_dim"])).astype(np.float32)
    k, v = (rng.standard_normal((a["b"], a["t"], a["kv_heads"], a["head_dim"])).astype(np.float32) for _ in "kv")
    dout = rng.standard_normal(q.shape).astype(np.float32)
    real = np.arange(a["t"])[None, :] < np.array(a["real"])[:, None]  # bool[B, T]
    return q, k, v, dout, real


def jax_parts(mcfg, batch) -> dict:
    """{part: zero-argument callable running one forward + backward to completion}."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emoqwen_jax.model import EmotionQwen
    from emoqwen_jax.model.attention import attention

    inputs = jax.device_put(batch)
    vis, text = inputs.vision, inputs.text
    graphdef, params = nnx.split(EmotionQwen(mcfg, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(1)
    r_vit = jnp.asarray(rng.standard_normal((vis.pixel_values.shape[0], mcfg.vision.hidden_size)), jnp.float32)
    shape = text.input_ids.shape + (mcfg.text.hidden_size,)
    embeds, r_text = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    segment_ids = jnp.where(text.attention_mask > 0, 1, -1)

    def vit(p):
        feats = nnx.merge(graphdef, p).visual(vis.pixel_values, pos_hw=vis.pos_hw, window_index=vis.window_index,
                                              frame_segment=vis.frame_segment, window_segment=vis.window_segment)
        return jnp.sum(feats * r_vit)

    def decoder(p, e):
        hidden, _ = nnx.merge(graphdef, p).language_model(e, text.position_ids, segment_ids)
        return jnp.sum(hidden * r_text)

    q, k, v, dout, real = map(jnp.asarray, _attention_inputs())
    seg = jnp.where(real, 1, -1)

    def attn(q, k, v):
        out = attention(q, k, v, scale=ATTN["head_dim"] ** -0.5, q_segment_ids=seg, kv_segment_ids=seg,
                        causal=True, implementation=mcfg.attention)
        return jnp.sum(out * dout)

    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (MATMUL[:2], MATMUL[1:]))
    compiled = {"vit": (jax.jit(jax.grad(vit)), (params,)),
                "matmul": (jax.jit(jnp.matmul), (a, b)),
                "decoder": (jax.jit(jax.grad(decoder, argnums=(0, 1))), (params, embeds)),
                "attention": (jax.jit(jax.grad(attn, argnums=(0, 1, 2))), (q, k, v))}
    return {name: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for name, (f, a) in compiled.items()}


def torch_parts(mcfg, batch) -> dict:
    import torch
    import torch.nn.functional as F

    model = train_step.hf_model(mcfg)
    raw, inputs = batch["raw"], batch["jax"]
    pixels = torch.as_tensor(np.concatenate([raw["pixel_values"], raw["pixel_values_videos"]]))
    grid = torch.as_tensor(np.concatenate([raw["image_grid_thw"], raw["video_grid_thw"]]))
    rng = np.random.default_rng(1)
    r_vit = None  # sized on the first call: HF's visual returns merged tokens
    shape = raw["input_ids"].shape + (mcfg.text.hidden_size,)
    embeds = torch.tensor(rng.standard_normal(shape), dtype=torch.float32, requires_grad=True)
    r_text = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
    mask = torch.as_tensor(raw["attention_mask"])
    positions = torch.as_tensor(inputs.text.position_ids.astype(np.int64))

    def vit():
        nonlocal r_vit
        out = model.model.visual(pixels, grid_thw=grid)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if r_vit is None:
            r_vit = torch.tensor(rng.standard_normal(tuple(feats.shape)), dtype=torch.float32)
        (feats * r_vit).sum().backward()
        model.zero_grad(set_to_none=True)

    def decoder():
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=positions).last_hidden_state
        (hidden * r_text).sum().backward()
        model.zero_grad(set_to_none=True)
        embeds.grad = None

    q, k, v, dout, real = _attention_inputs()
    groups = ATTN["heads"] // ATTN["kv_heads"]
    qt = torch.tensor(q.transpose(0, 2, 1, 3), requires_grad=True)  # HF's [B, N, T, H]
    kt, vt = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (k, v))
    do = torch.tensor(dout.transpose(0, 2, 1, 3))
    t = ATTN["t"]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None] & torch.as_tensor(real)[:, None, None, :]

    def attn():
        out = F.scaled_dot_product_attention(qt, kt.repeat_interleave(groups, 1), vt.repeat_interleave(groups, 1),
                                             attn_mask=allowed)
        (out * do).sum().backward()
        qt.grad = kt.grad = vt.grad = None

    a, b = (torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in (MATMUL[:2], MATMUL[1:]))

    def matmul():
        with torch.no_grad():
            torch.matmul(a, b)

    return {"vit": vit, "decoder": decoder, "attention": attn, "matmul": matmul}


def run_side(args) -> dict:
    from emoqwen_jax.model import ModelConfig

    mcfg = ModelConfig.from_run_config(train_step.bench_config("small", 1))
    batch = train_step.make_batch(mcfg)
    parts = jax_parts(mcfg, batch["jax"]) if args.side == "jax" else torch_parts(mcfg, batch)

    def stateless(fn):  # a part keeps no state between steps
        def run(state):
            fn()
            return state
        return run

    runners = {name: stateless(fn) for name, fn in parts.items()}
    return {"side": args.side,
            "times_ms": train_step.interleaved_times(runners, dict.fromkeys(parts), args.warmup, args.runs)}


def _child(args, side: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--runs", str(args.runs), "--warmup", str(args.warmup)]
    return train_step.run_json(cmd, echo=False)


def main(argv=None) -> dict:
    ap = command_parser(__doc__, prog="python bench/step_parts.py")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--side", choices=("both", "jax", "torch"), default="both", help="internal: one framework")
    args = ap.parse_args(argv)
    if args.side == "both":
        return compare(args)
    out = run_side(args)  # a child process: its JSON line goes back to the parent
    print(json.dumps(out))
    return out


def compare(args) -> dict:
    from machine import describe, machine_info

    before = machine_info()
    print(f"small preset, bench/train_step.py's batch; {describe(before)}")
    ours, theirs = _child(args, "jax"), _child(args, "torch")
    machine = machine_info(before)
    parts = {}
    print("\n| part | ours ms | HF torch ms | torch / ours |\n|---|---|---|---|")
    for name in PARTS:
        j, t = statistics.median(ours["times_ms"][name]), statistics.median(theirs["times_ms"][name])
        parts[name] = {"jax_ms": round(j, 2), "torch_ms": round(t, 2), "ratio": round(t / j, 2)}
        print(f"| {name} | {j:.2f} | {t:.2f} | {t / j:.2f}x |")
    gflop = 2 * np.prod(MATMUL) / 1e9
    parts["matmul"].update(jax_gflops=round(gflop / parts["matmul"]["jax_ms"] * 1e3, 1),
                           torch_gflops=round(gflop / parts["matmul"]["torch_ms"] * 1e3, 1))
    print(f"matmul {MATMUL[0]}x{MATMUL[1]} @ {MATMUL[1]}x{MATMUL[2]}: ours {parts['matmul']['jax_gflops']} "
          f"GFLOP/s, torch {parts['matmul']['torch_gflops']} GFLOP/s")
    print(f"({describe(machine)})")
    out = {"parts": parts, "runs": args.runs, "machine": machine}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
