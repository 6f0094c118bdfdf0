"""The training loss against transformers: ``model(..., labels=labels).loss`` and the trainer's ``loss_fn`` equal
``Qwen2_5_VLForConditionalGeneration(..., labels=labels).loss`` (float32, random weights, saved and imported
with ``from_hf``) on padded image + video batches.

Positions: transformers 5.24 departs from the released M-RoPE rule for videos whose temporal span exceeds the
spatial one (see test_model_parity.py), so HF is given the released rule's positions where that applies.
"""

import hf_oracle as O
import numpy as np
import pytest
import torch
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.convert import from_hf
from emoqwen_jax.model import layout_spec
from emoqwen_jax.tokens import IGNORE
from emoqwen_jax.train.loss import loss_fn

jit_loss_fn = nnx.jit(loss_fn)

TOL = 1e-5  # relative to the loss (a mean of ~log(512) terms)


@pytest.fixture(scope="module", params=sorted(O.CONFIGS))
def pair(request, tmp_path_factory):
    hf = O.build_hf_model(request.param, seed=5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, from_hf(str(path), dtype="float32")


def _hf_out(hf, ids, mask, labels, position_ids=None, **vision):
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items()}
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids, np.int64)),
                 mm_token_type_ids=torch.as_tensor(O.mm_token_type_ids(ids)), labels=torch.as_tensor(labels),
                 **kwargs)
    return float(out.loss), out.logits.float().numpy()


def _labels(ids, mask, rng):
    """Answer-like labels: the token itself on a random ~half of the real text positions, IGNORE on vision
    tokens, padding and the rest; so rows hold different numbers of labelled targets."""
    text = (mask > 0) & (O.mm_token_type_ids(ids) == 0) & (ids != O.VSTART) & (ids != O.VEND)
    keep = text & (rng.random(ids.shape) < 0.5)
    return np.where(keep, ids, IGNORE).astype(np.int64)


def _mixed_batch(rng):
    """Two images and a video with three temporal patches over three right-padded rows."""
    img_a, img_b, vid = (1, 4, 8), (1, 6, 4), (3, 4, 6)
    text = lambda n: list(rng.integers(0, 500, n))  # noqa: E731
    rows = [text(3) + O.image_tokens(img_a) + text(14),
            text(6) + O.video_tokens(vid) + text(5),
            text(2) + O.image_tokens(img_b) + text(4)]
    ids, mask = O.pad_batch(rows)
    assert (mask.sum(1) < ids.shape[1]).sum() == 2  # two rows are right-padded
    vision = dict(pixel_values=np.concatenate([O.pixels(img_a, 11), O.pixels(img_b, 12)]),
                  image_grid_thw=np.array([img_a, img_b]), pixel_values_videos=O.pixels(vid, 13),
                  video_grid_thw=np.array([vid]), second_per_grid_ts=np.array([1.5], np.float32))
    return ids, mask, vision


def test_loss_equals_transformers_on_a_mixed_padded_batch(pair):
    hf, ours = pair
    rng = np.random.default_rng(0)
    ids, mask, vision = _mixed_batch(rng)
    labels = _labels(ids, mask, rng)
    per_row = (labels[:, 1:] != IGNORE).sum(1)
    assert len(set(per_row.tolist())) == 3 and per_row.min() > 0
    pos = layout.get_rope_index(ids, mask, vision["image_grid_thw"], vision["video_grid_thw"], [1.5],
                                layout_spec(ours.config))[0]
    ref_loss, ref_logits = _hf_out(hf, ids, mask, labels, position_ids=pos, **vision)

    out = ours(input_ids=ids, attention_mask=mask, labels=labels, **vision)
    assert O.rel_err(out.logits, ref_logits, mask) <= 1e-4  # what the loss is made of
    assert abs(float(out.loss) - ref_loss) <= TOL * abs(ref_loss)

    batch = ours.prepare_inputs(ids, mask, labels=labels, **vision)
    trained, metrics = jit_loss_fn(ours, batch)
    assert abs(float(trained) - ref_loss) <= TOL * abs(ref_loss)
    assert float(metrics["tokens"]) == per_row.sum()


def test_loss_equals_transformers_with_its_own_positions(pair):
    """An image and a short video (temporal span within the spatial one): HF computes its own positions."""
    hf, ours = pair
    rng = np.random.default_rng(1)
    img, vid = (1, 4, 6), (2, 4, 4)
    rows = [list(rng.integers(0, 500, 4)) + O.image_tokens(img) + list(rng.integers(0, 500, 9)),
            list(rng.integers(0, 500, 2)) + O.video_tokens(vid) + list(rng.integers(0, 500, 3))]
    ids, mask = O.pad_batch(rows)
    vision = dict(pixel_values=O.pixels(img, 21), image_grid_thw=np.array([img]),
                  pixel_values_videos=O.pixels(vid, 22), video_grid_thw=np.array([vid]),
                  second_per_grid_ts=np.array([0.5], np.float32))
    labels = _labels(ids, mask, rng)
    ref_loss, _ = _hf_out(hf, ids, mask, labels, **vision)
    assert abs(float(ours(ids, mask, labels=labels, **vision).loss) - ref_loss) <= TOL * abs(ref_loss)
    trained, _ = jit_loss_fn(ours, ours.prepare_inputs(ids, mask, labels=labels, **vision))
    assert abs(float(trained) - ref_loss) <= TOL * abs(ref_loss)


def test_loss_is_the_float64_formula_and_absent_without_labels(pair):
    """Independent of torch: the mean over labelled targets of -log softmax(logits[i])[labels[i + 1]] in float64
    from our own logits (the shift, the -100 mask and the mean over tokens, not over rows)."""
    _, ours = pair
    rng = np.random.default_rng(2)
    ids, mask = O.pad_batch([list(rng.integers(0, 500, 12)), list(rng.integers(0, 500, 5))])
    labels = _labels(ids, mask, rng)
    out = ours(ids, mask, labels=labels)
    logits = np.asarray(out.logits, np.float64)[:, :-1]
    targets = labels[:, 1:]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
    want = nll[targets != IGNORE].mean()
    assert abs(float(out.loss) - want) <= TOL * abs(want)
    assert ours(ids, mask).loss is None
    with pytest.raises(ValueError, match="labels has shape"):
        ours(ids, mask, labels=labels[:, :-1])
