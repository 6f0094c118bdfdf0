r"""emoqwen-describe: ask a checkpoint about one clip (and/or image) and print its answer.

  emoqwen-describe --ckpt ckpt/emoqwen-7b --video clip.mp4
  emoqwen-describe --ckpt ckpt/emoqwen-7b --video clip.mp4 --subtitle "I can't believe you did that."
  emoqwen-describe --ckpt ckpt/emoqwen-7b --image face.jpg --prompt "What emotion does this face show?"
  emoqwen-describe --ckpt C --video clip.mp4 --temperature 0.7 --top_p 0.9 --seed 1 --set fps=1.0
  emoqwen-describe --ckpt C --audio voice.wav --prompt "How does the speaker feel?"

With a checkpoint that has an audio encoder (``model.audio.enabled``), a video's own audio track goes into the
prompt after its frames (docs/audio.md); ``--audio`` adds an audio-only file (wav, flac, mp3…).

Defaults: the emotion-reasoning prompt (``emoqwen_jax.eval.emotion.emer.REASONING_PROMPT``), greedy decoding, and
the tokenizer/processor settings stored with the checkpoint (``config.json`` ``meta.data``; the data
defaults otherwise). ``--set key=value`` overrides a data setting (e.g. ``fps``, ``video_max_pixels``).
With ``--json`` the last line is ``{"response", "num_tokens", "prompt_tokens"}`` instead of the bare text.
"""

from __future__ import annotations

import argparse
import json
import sys

from emoqwen_jax.cli.args import add_generation_args, parse_sets, run_command
from emoqwen_jax.runtime.commands import command_parser


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    add_generation_args(parser, max_new_tokens=512)
    parser.add_argument("--video", default=None, help="a video file")
    parser.add_argument("--image", default=None, help="an image file")
    parser.add_argument("--audio", default=None, help="an audio file (needs a checkpoint with an audio encoder)")
    parser.add_argument("--prompt", default=None, help="the question (default: the emotion-reasoning prompt)")
    parser.add_argument("--subtitle", default=None, help="what is said in the clip (appended as 'Subtitle: …')")
    parser.add_argument("--json", action="store_true", help="print a JSON line instead of the bare answer")
    return parser


def run(args: argparse.Namespace) -> dict:
    from emoqwen_jax.eval.emotion.emer import REASONING_PROMPT
    from emoqwen_jax.infer.engine import Engine, SamplingParams
    from emoqwen_jax.infer.feed import cache_length
    from emoqwen_jax.infer.session import Session, pixel_range_warning

    media = [(kind, path) for kind, path in (("video", args.video), ("image", args.image), ("audio", args.audio))
             if path]
    if not media:
        raise ValueError("give --video, --image and/or --audio")
    session = Session.from_checkpoint(args.ckpt, parse_sets(args.set), dtype=args.dtype)
    warning = pixel_range_warning(session)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    prompt = session.prompt(args.prompt or REASONING_PROMPT, media, args.subtitle)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    engine = Engine(session, max_batch=1, max_len=cache_length(len(prompt.input_ids) + args.max_new_tokens))
    done = engine.generate([prompt], params)[0]
    return {"response": done.text, "num_tokens": len(done.token_ids), "prompt_tokens": done.prompt_tokens}


def main(argv: list[str] | None = None) -> int:
    return run_command("emoqwen-describe", build_parser(), run, argv,
                       lambda args, out: json.dumps(out) if args.json else out["response"])


if __name__ == "__main__":
    sys.exit(main())
