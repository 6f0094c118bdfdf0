r"""emoqwen-serve: an OpenAI-compatible API, an emotion endpoint and a web page for one checkpoint.

  emoqwen-serve --ckpt ckpt/emoqwen-7b
  emoqwen-serve --ckpt C --port 8000 --max_batch 16 --max_len 8192 --media_root /data/clips --api_key "$KEY"

Endpoints: GET /healthz, GET /v1/models, POST /v1/chat/completions, POST /v1/emotion, GET /metrics, GET /
(the page). Listens on 127.0.0.1 unless --host says otherwise; see docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys

from emoqwen_jax.cli.args import parse_sets
from emoqwen_jax.runtime.commands import command_parser


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="our model directory (emoqwen-convert from-hf or the trainer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=8, help="decode slots (requests generated at once)")
    p.add_argument("--max_len", type=int, default=4096, help="tokens per slot: prompt + completion")
    p.add_argument("--media_root", default=None, help="folder whose files requests may name as file:// URLs")
    p.add_argument("--api_key", default=None, help="require Authorization: Bearer <key> on /v1/* and /metrics")
    p.add_argument("--max_upload_mb", type=float, default=64.0, help="largest request body (and file:// file)")
    p.add_argument("--decode_steps", type=int, default=1,
                   help="tokens per slot that one decode call draws: more cuts the host's cost per token (small "
                        "models, many clients), and streams and admits new requests every that many tokens")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data setting, e.g. --set fps=1.0 (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: the checkpoint's)")
    return p


def main(argv: list[str] | None = None) -> int:
    from emoqwen_jax.serve import ServeConfig, run_server

    args = build_parser().parse_args(argv)
    try:
        config = ServeConfig(ckpt=args.ckpt, max_batch=args.max_batch, max_len=args.max_len,
                             media_root=args.media_root, api_key=args.api_key, max_upload_mb=args.max_upload_mb,
                             data=parse_sets(args.set), dtype=args.dtype, decode_steps=args.decode_steps)
    except (FileNotFoundError, ValueError) as err:
        print(f"emoqwen-serve: error: {err}", file=sys.stderr)
        return 2
    run_server(config, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
