r"""emoqwen-run-sample: one forward pass of the model on a bundled, synthetic sample.

  emoqwen-run-sample --config=configs/emotion_qwen.py:tiny [--ckpt DIR] [--config.seed=1]

The sample is generated deterministically (no downloads): a short synthetic clip — a bright disc drifting
over a colour gradient — and a still image, each with a user question in the Qwen chat template. It goes
through the real data path (sampling, smart resize, patchify, tokenizer) and the real model; the command
prints the shapes at each stage, the gate weights and a checksum of the logits.
"""

from __future__ import annotations

import json

import numpy as np

from emoqwen_jax.cli.args import add_config_arg, parse_config_args
from emoqwen_jax.runtime.commands import command_parser


def build_parser():
    parser = command_parser(__doc__)
    add_config_arg(parser, "configs/emotion_qwen.py:tiny")
    parser.add_argument("--ckpt", default="", help="model directory (emoqwen-convert from-hf output) or a Hugging "
                                                   "Face Qwen2.5-VL directory (default: random weights)")
    return parser


def synthetic_clip(num_frames: int = 8, height: int = 120, width: int = 160) -> np.ndarray:
    """uint8[T, H, W, 3]: a colour gradient with a disc moving left to right (deterministic)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(num_frames):
        img = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, 40.0 + 20 * t)], -1)
        cx, cy = 20 + t * (width - 40) / max(num_frames - 1, 1), height / 2
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (height / 6) ** 2
        img[disc] = (250, 230, 60)
        frames.append(img.astype(np.uint8))
    return np.stack(frames)


def sample_batch(config, model_config) -> dict:
    """The bundled sample as Hugging Face-named arrays: a video row and an image row, right-padded."""
    from emoqwen_jax.data import load_tokenizer, process_image, process_video
    from emoqwen_jax.data.text import num_vision_tokens, prompt_ids

    d = config.data
    tok, info = load_tokenizer(model_config.text.vocab_size, d.tokenizer_cache_dir)
    want = (info.image_pad_id, info.video_pad_id, info.vision_start_id, info.vision_end_id)
    have = (model_config.image_token_id, model_config.video_token_id, model_config.vision_start_token_id,
            model_config.vision_end_token_id)
    if want != have:
        raise ValueError(f"the model's vision token ids {have} (image, video, start, end) differ from the Qwen2 "
                         f"tokenizer layout for vocab {model_config.text.vocab_size}: {want}")
    clip = synthetic_clip()
    video = process_video(clip, fps=d.fps, min_frames=d.min_frames, max_frames=d.max_frames,
                          min_pixels=d.video_min_pixels, max_pixels=d.video_max_pixels, video_fps=4.0)
    image = process_image(clip[0], min_pixels=d.image_min_pixels, max_pixels=d.image_max_pixels)
    rows = []
    for kind, pad_id, grid in (("video", info.video_pad_id, video["video_grid_thw"][0]),
                               ("image", info.image_pad_id, image["image_grid_thw"][0])):
        turns = [{"role": "user", "content": f"<{kind}>\nWhat emotion does this {kind} convey?"}]
        rows.append(prompt_ids(turns, [[(pad_id, num_vision_tokens(grid))]], tok, info,
                               system_prompt=d.system_prompt, max_length=d.max_length))
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), info.pad_id, np.int32)
    attention_mask = np.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)], attention_mask[i, : len(r)] = r, 1
    # Images come first in the visual-token order, so put the image row's pixels in pixel_values.
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=image["pixel_values"],
                image_grid_thw=image["image_grid_thw"], pixel_values_videos=video["pixel_values_videos"],
                video_grid_thw=video["video_grid_thw"], second_per_grid_ts=video["second_per_grid_ts"]), tok


def main(argv: list[str] | None = None) -> None:
    from emoqwen_jax.model import ModelConfig, count_params
    from emoqwen_jax.model_dir import build_model

    args = parse_config_args(build_parser(), argv)
    config = args.config
    mcfg = ModelConfig.from_run_config(config)
    model = build_model(config, args.ckpt)
    print(f"model: {config.preset} preset, {count_params(model):,} parameters, experts {mcfg.expert_names}")
    batch, tok = sample_batch(config, model.config)
    for name, value in batch.items():
        print(f"  {name:22s} {str(np.asarray(value).shape):16s} {np.asarray(value).dtype}")
    out = model(**batch)
    logits = np.asarray(out.logits)
    last = batch["attention_mask"].sum(1) - 1
    next_ids = logits[np.arange(len(last)), last].argmax(-1)
    summary = {
        "logits_shape": list(logits.shape),
        "logits_checksum": float(np.round(np.abs(logits).astype(np.float64).sum(), 4)),
        "gate_weights": np.round(np.asarray(out.gate_weights), 4).tolist(),
        "next_token": [tok.decode([int(i)]) for i in next_ids],
    }
    print("gate weights per item (image, video) over experts", list(mcfg.expert_names), ":",
          summary["gate_weights"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
