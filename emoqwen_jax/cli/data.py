r"""emoqwen-data: build the demo set, check a manifest, prepare a TFDS array_record dataset.

  emoqwen-data demo --out DIR
  emoqwen-data check --manifest M --data_root R [--format auto|conversation|dfew|mafw|mer] [--workers N]
  emoqwen-data check --prepared DIR [--split train]
  emoqwen-data prepare --manifest M --data_root R --out DIR [--split train]

Data settings come from ``emoqwen_jax.data.defaults.data_config()``, or from a run config's ``config.data``
with ``--config configs/emotion_qwen.py:tiny``; ``--set fps=3.0 --set faces.fusion=extra`` overrides fields.
``check`` runs every sample through the same processing as training and prints, as its last line, a JSON
summary ``{"ok": n, "rejected": {reason: count}, "examples": {reason: [...]}}``; it exits 1 when the
rejected fraction passes ``max_reject_fraction``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import grain
from tqdm import tqdm

from emoqwen_jax.cli.args import load_config
from emoqwen_jax.data import defaults, demo, manifests, prepare
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.data.reasons import RejectCounter
from emoqwen_jax.runtime.commands import command_parser, subcommand


def load_data_config(config: str, overrides: list[str]):
    """``config.data`` of ``FILE[:ARG]`` (or the defaults) with ``key=value`` overrides applied."""
    try:
        cfg = load_config(config).data if config else defaults.data_config()
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    try:
        parsed = defaults.parse_overrides(overrides)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    for keys, value in parsed:
        *path, leaf = keys
        key = ".".join(keys)
        node = cfg
        for part in path:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"unknown data config field {key!r}; fields: {sorted(node.keys())}")
        old = node[leaf]
        # ConfigDict fields are typed: convert to the default's type (3 → 3.0 for a float field).
        if isinstance(old, (tuple, list)):
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        elif isinstance(old, float) and not isinstance(old, bool):
            value = float(value)
        node[leaf] = value
    return cfg


def _records(args) -> grain.MapDataset:
    if args.prepared:
        return prepare.load_prepared(args.prepared, split=args.split)
    if not (args.manifest and args.data_root):
        raise SystemExit("give --manifest and --data_root (or --prepared DIR)")
    return grain.MapDataset.source(manifests.load_manifest(args.manifest, args.data_root, args.format))


def cmd_check(args) -> int:
    cfg = load_data_config(args.config, args.set)
    records = _records(args)
    it = records.map(SampleProcessor(cfg)).to_iter_dataset()
    if args.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=args.workers))
    counter = RejectCounter()  # check reports everything; the verdict comes after the summary
    for out in tqdm(it, total=len(records), desc="check", unit="sample"):
        if "rejected" in out:
            counter.add_rejected(out["rejected"], out["id"], out.get("detail", ""))
        else:
            counter.add_ok()
    print(json.dumps(counter.summary(), ensure_ascii=False))
    return 1 if counter.fraction > cfg.max_reject_fraction else 0


def cmd_prepare(args) -> int:
    records = manifests.load_manifest(args.manifest, args.data_root, args.format)
    summary = prepare.prepare_dataset(records, args.out, split=args.split)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def cmd_demo(args) -> int:
    paths = demo.build_demo(args.out)
    print(f"Built the synthetic smoke-test set (not emotion data) under {args.out}.", file=sys.stderr)
    print(json.dumps({"data_root": args.out, **paths}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def source_args(p, prepared: bool):
        p.add_argument("--manifest", default="", help="JSON/JSONL conversations or a DFEW/MAFW/MER CSV")
        p.add_argument("--data_root", default="", help="media paths in the manifest resolve under this folder")
        p.add_argument("--format", default="auto", choices=["auto", "conversation", "dfew", "mafw", "mer"])
        p.add_argument("--split", default="train", help="split name of the prepared dataset")
        if prepared:
            p.add_argument("--prepared", default="", help="a dataset written by `emoqwen-data prepare --out`")

    check = subcommand(sub, "check", __doc__, "run every sample through processing; print a JSON summary")
    source_args(check, prepared=True)
    check.add_argument("--config", default="", help="run config FILE[:ARG] whose config.data to use")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a data field")
    check.add_argument("--workers", type=int, default=0, help="grain worker processes")
    check.set_defaults(fn=cmd_check)

    prep = subcommand(sub, "prepare", __doc__, "write a TFDS array_record dataset (annotations + media bytes)")
    source_args(prep, prepared=False)
    prep.add_argument("--out", required=True, help="output data_dir")
    prep.set_defaults(fn=cmd_prepare)

    dem = subcommand(sub, "demo", __doc__, "build the deterministic synthetic smoke-test set")
    dem.add_argument("--out", required=True)
    dem.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "prepare" and not (args.manifest and args.data_root):
        raise SystemExit("prepare needs --manifest and --data_root")
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"emoqwen-data {args.command}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
