r"""emoqwen-convert: move weights between Hugging Face and our model directories.

  emoqwen-convert from-hf --hf_dir /path/to/Qwen2.5-VL-7B-Instruct --out /path/to/emoqwen-7b \
      [--dtype float32|bfloat16] [--num_experts 2] [--expert_names general,emotion] [--seed 0] [--overwrite]
  emoqwen-convert to-hf --ckpt /path/to/emoqwen-7b --out /path/to/emoqwen-7b-hf \
      [--format emotion_qwen|qwen2_5_vl] [--max_shard_size 5GB] [--no_tokenizer] [--overwrite] \
      [--lora_adapter [ADAPTER_DIR]]
  emoqwen-convert merge-lora --ckpt /path/to/lora-run/stages/stage3_lora --out /path/to/merged [--overwrite]

``from-hf`` copies HF's patch merger into every compressor expert (so the imported model computes exactly
what Qwen2.5-VL computes) and initialises the gating network from ``--seed``; it needs no torch. It also reads
our own exports back (experts, gate and router as exported). ``to-hf`` writes a directory that transformers
loads: ``AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)`` for 'emotion_qwen', or a
plain Qwen2.5-VL for a single-expert checkpoint with ``--format qwen2_5_vl``.

LoRA checkpoints (a model directory whose meta records ``lora``): ``to-hf`` exports the merged model, or with
``--lora_adapter`` the base model plus a PEFT adapter directory (default ``OUT-lora``) that
``PeftModel.from_pretrained`` loads on it; ``merge-lora`` folds the adapters into a plain model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from emoqwen_jax.runtime.commands import command_parser, subcommand


def _from_hf(args: argparse.Namespace) -> int:
    from emoqwen_jax.convert import from_hf
    from emoqwen_jax.model import count_params
    from emoqwen_jax.model_dir import save_model

    compressor = {"num_experts": args.num_experts}
    names = [n for n in args.expert_names.split(",") if n] if args.expert_names is not None else None
    if names is None and args.num_experts != 2:
        names = []  # generic names expert_0..expert_{E-1}
    if names is not None:
        compressor["expert_names"] = tuple(names)
    start = time.time()
    model = from_hf(args.hf_dir, dtype=args.dtype, compressor=compressor, seed=args.seed)
    out = save_model(model, args.out, meta={"source": "hf", "hf_dir": args.hf_dir, "seed": args.seed},
                     overwrite=args.overwrite)
    print(json.dumps({"out": out, "parameters": count_params(model), "num_experts": args.num_experts,
                      "dtype": args.dtype, "seconds": round(time.time() - start, 1)}))
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from emoqwen_jax.convert.hf_export import check_format
    from emoqwen_jax.convert.lora import export_hf
    from emoqwen_jax.model_dir import load_model, read_model_config

    start = time.time()
    config, meta = read_model_config(args.ckpt)
    check_format(config, args.format)  # a clear error before restoring any weights
    if args.lora_adapter is not None and not meta.get("lora"):
        raise ValueError(f"--lora_adapter: {args.ckpt} has no LoRA adapters (its config.json meta has no 'lora')")
    summary = export_hf(load_model(args.ckpt), args.out, lora_adapter=args.lora_adapter, format=args.format,
                        max_shard_size=args.max_shard_size, tokenizer=not args.no_tokenizer,
                        overwrite=args.overwrite)
    summary.pop("files")
    print(json.dumps({**summary, "seconds": round(time.time() - start, 1)}))
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    from emoqwen_jax.convert.lora import merge_model_dir

    start = time.time()
    summary = merge_model_dir(args.ckpt, args.out, overwrite=args.overwrite)
    print(json.dumps({**summary, "seconds": round(time.time() - start, 1)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = subcommand(sub, "from-hf", __doc__, "Qwen2.5-VL directory -> our model directory (orbax + config.json)")
    p.add_argument("--hf_dir", required=True, help="HF directory with config.json and *.safetensors")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--num_experts", type=int, default=2, help="compressor experts, each a copy of HF's merger")
    p.add_argument("--expert_names", default=None, help="comma-separated expert names (default general,emotion)")
    p.add_argument("--seed", type=int, default=0, help="seed of the gating network's initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=_from_hf)
    p = subcommand(sub, "to-hf", __doc__, "our model directory -> Hugging Face directory (safetensors, config, "
                   "tokenizer)")
    p.add_argument("--ckpt", required=True, help="our model directory (config.json + params/)")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--format", default="emotion_qwen", choices=["emotion_qwen", "qwen2_5_vl"],
                   help="emotion_qwen: remote code, any compressor; qwen2_5_vl: plain Qwen2.5-VL, one expert only")
    p.add_argument("--max_shard_size", default="5GB", help="shard the weights above this size (e.g. 5GB, 500MB)")
    p.add_argument("--no_tokenizer", action="store_true",
                   help="skip the tokenizer files (needed when the model's vision token ids are not the tokenizer's)")
    p.add_argument("--overwrite", action="store_true", help="replace the export files in a non-empty --out")
    p.add_argument("--lora_adapter", "--lora-adapter", nargs="?", const="", default=None, metavar="ADAPTER_DIR",
                   help="LoRA checkpoints: export the base model to --out and a PEFT adapter to ADAPTER_DIR "
                        "(default: OUT-lora); without it a LoRA checkpoint is exported merged")
    p.set_defaults(func=_to_hf)
    p = subcommand(sub, "merge-lora", __doc__, "fold a LoRA checkpoint's adapters into a plain model directory")
    p.add_argument("--ckpt", required=True, help="our model directory with LoRA adapters")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=_merge_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"emoqwen-convert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
