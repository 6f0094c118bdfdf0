"""Greedy generation equals Hugging Face ``generate`` token for token (tiny random Qwen2.5-VL via ``from_hf``).

HF computes its own M-RoPE positions inside ``generate`` (from ``mm_token_type_ids``), so the video grids
keep their temporal span (t − 1) · second_per_grid · tokens_per_second within max(h, w)/2 − 1, where
transformers 5.24's rule and the released rule agree (docs/design.md, The M-RoPE position rule). Batches are
left-padded for both.

Random weights give flat logits and a decoder that repeats one token, so the decoder's weights are scaled
by 3 (context matters: the sequences vary) and the LM head by 12 (logits ~±20); every step's top-1/top-2
margin is checked to be far above the float32 mismatch of the two implementations (~1e-4 absolute at that
scale), so equal tokens mean something.
"""

import hf_oracle as O
import numpy as np
import pytest
import torch

from emoqwen_jax.convert import from_hf
from emoqwen_jax.infer import SamplingConfig, generate, left_pad

N = 10
PAD = 0
MIN_MARGIN = 0.01
# One prompt length and one vision bucket for every test, as a benchmark run buckets its prompts: the
# prefill then compiles once per batch size (and once without vision), and the bucketing is tested too.
LENGTH, PATCHES, ITEMS = 44, 128, 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = O.sharpen_(O.build_hf_model("base", seed=3))
    path = tmp_path_factory.mktemp("hf_gen")
    hf.save_pretrained(path)
    return hf, from_hf(str(path), dtype="float32")


def hf_generate(hf, ids, mask, stop_ids, **vision):
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items() if v is not None}
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          mm_token_type_ids=torch.as_tensor(O.mm_token_type_ids(ids)), max_new_tokens=N,
                          do_sample=False, eos_token_id=list(stop_ids) or None, pad_token_id=PAD,
                          output_logits=True, return_dict_in_generate=True, **kwargs)
    logits = torch.stack(out.logits, 1).float().numpy()
    top2 = np.sort(logits, -1)[..., -2:]
    return out.sequences[:, ids.shape[1]:].numpy(), top2[..., 1] - top2[..., 0]


def check(pair, rows, vision=None, stop_from_step=None):
    """Runs both; with ``stop_from_step`` the token HF emits at that step of row 0 becomes the stop id."""
    hf, ours = pair
    vision = vision or {}
    ids, mask = left_pad(rows, PAD, LENGTH)
    buckets = dict(pad_patches_to=PATCHES, pad_items_to=ITEMS) if vision else {}
    stop_ids: tuple[int, ...] = ()
    if stop_from_step is not None:
        free, _ = hf_generate(hf, ids, mask, (), **vision)
        stop_ids = (int(free[0, stop_from_step]),)
    ref, margins = hf_generate(hf, ids, mask, stop_ids, **vision)
    got = generate(ours, ids, mask, sampling=SamplingConfig(max_new_tokens=N, stop_ids=stop_ids, pad_id=PAD),
                   **vision, **buckets)
    # Only steps where a row is still running decide anything (HF pads finished rows too).
    live = np.arange(ref.shape[1])[None, :] < got.num_tokens[:, None]
    assert margins[live[:, :margins.shape[1]]].min() > MIN_MARGIN
    padded = np.full((len(rows), N), PAD, np.int64)
    padded[:, :ref.shape[1]] = ref
    np.testing.assert_array_equal(got.tokens, padded)
    return got, stop_ids


def test_text_prompt(pair):
    rng = np.random.default_rng(0)
    got, _ = check(pair, [list(rng.integers(0, 500, 9))])
    assert got.num_tokens.tolist() == [N] and not got.stopped.any()
    assert len(set(got.tokens[0].tolist())) > N // 2  # not a degenerate repetition


def test_text_prompt_stops_at_stop_id(pair):
    rng = np.random.default_rng(1)
    got, stop = check(pair, [list(rng.integers(0, 500, 7))], stop_from_step=3)
    first = int(np.flatnonzero(got.tokens[0] == stop[0])[0])
    assert got.stopped[0] and got.num_tokens[0] == first + 1
    assert (got.tokens[0, first + 1:] == PAD).all()
    assert got.row(0) == got.tokens[0, :first].tolist()
    assert got.row(0, keep_stop=True)[-1] == stop[0]


def test_image_prompt(pair):
    grid = (1, 6, 10)
    rows = [[7, 8] + O.image_tokens(grid) + [9, 10, 11]]
    check(pair, rows, dict(pixel_values=O.pixels(grid, 1), image_grid_thw=np.array([grid])))


def test_video_prompt(pair):
    grid = (3, 4, 6)  # temporal span (3 - 1) * 0.5 * 2 = 2 <= max(4, 6) / 2 - 1
    rows = [[7] + O.video_tokens(grid) + [9, 10, 11, 12]]
    check(pair, rows, dict(pixel_values_videos=O.pixels(grid, 2), video_grid_thw=np.array([grid]),
                           second_per_grid_ts=np.array([0.5], np.float32)))


def test_batch_of_two_lengths_image_and_video(pair):
    """Row 0: image and long text; row 1: a shorter video prompt (left-padded); row 0 stops early."""
    img, vid = (1, 4, 8), (2, 4, 8)  # video span 1 * 0.5 * 2 = 1 <= 3
    rows = [[5] + O.image_tokens(img) + list(range(20, 34)), [5, 6] + O.video_tokens(vid) + [7, 8]]
    vision = dict(pixel_values=O.pixels(img, 3), image_grid_thw=np.array([img]),
                  pixel_values_videos=O.pixels(vid, 4), video_grid_thw=np.array([vid]),
                  second_per_grid_ts=np.array([0.5], np.float32))
    got, _ = check(pair, rows, vision, stop_from_step=4)
    assert got.num_tokens[0] <= 5


def test_batch_of_two_text_lengths(pair):
    rng = np.random.default_rng(2)
    check(pair, [list(rng.integers(0, 500, 12)), list(rng.integers(0, 500, 4))])
