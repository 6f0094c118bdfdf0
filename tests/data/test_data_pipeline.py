"""grain pipeline: buckets, padding, determinism, sharding, mixtures, reject limit, exact resume (0 and 2 workers)."""

import collections

import numpy as np
import pytest
from data_helpers import conv, numbered_frames

from emoqwen_jax.data import manifests, pipeline, video_io
from emoqwen_jax.data.reasons import TooManyRejectsError
from emoqwen_jax.data.text import IGNORE


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """8 short clips of different lengths, 4 images of different sizes, 1 missing clip."""
    root = tmp_path_factory.mktemp("pipe")
    from PIL import Image

    recs = []
    for i in range(8):
        video_io.write_video(str(root / f"v{i}.mp4"), numbered_frames(6 + 3 * i, 48, 64 + 16 * (i % 2)), 10.0)
        recs.append(conv("video", f"v{i}.mp4", answer="happy " * (1 + i), sample_id=f"v{i}"))
    for i in range(4):
        Image.fromarray(np.full((40 + 30 * i, 60, 3), 40 * i, np.uint8)).save(root / f"i{i}.png")
        recs.append(conv("image", f"i{i}.png", sample_id=f"i{i}"))
    recs.append(conv("video", "gone.mp4", sample_id="gone"))
    return [manifests.conversation_record(r, str(root), "m", k) for k, r in enumerate(recs)]


def ids_of(batches):
    return [i for b in batches for i, m in zip(b["id"].tolist(), b["sample_mask"], strict=True) if m]


def one_epoch(records, cfg, **kw):
    cfg.num_epochs = 1
    it, counter = pipeline.make_iterator(records, cfg, **kw)
    return list(it), counter


def test_batches_are_padded_to_buckets(records, cfg, tiny_tok):
    _, info = tiny_tok
    cfg.batch_size, cfg.drop_remainder = 5, False  # 12 good samples: 5 + 5 + 2
    batches, counter = one_epoch(records, cfg)
    assert counter.summary()["ok"] == 12 and counter.summary()["rejected"] == {"missing_file": 1}
    assert sorted(ids_of(batches)) == sorted(r["id"] for r in records if r["id"] != "gone")
    for b in batches:
        L = b["input_ids"].shape[1]
        assert L in cfg.length_buckets and b["input_ids"].shape[0] == 5
        lengths = b["attention_mask"].sum(1)
        assert L == pipeline.bucket(int(lengths.max()), cfg.length_buckets)
        pad = np.arange(L)[None] >= lengths[:, None]
        assert (b["input_ids"][pad] == info.pad_id).all() and (b["labels"][pad] == IGNORE).all()
        assert (b["input_ids"][~pad] != info.pad_id).all()
        for pix, grid, index in (("pixel_values", "image_grid_thw", "image_sample_index"),
                                 ("pixel_values_videos", "video_grid_thw", "video_sample_index")):
            rows = int(np.prod(b[grid], axis=1).sum())
            assert b[pix].shape[0] == (pipeline.bucket(rows, cfg.patch_buckets) if rows else 0)
            assert not b[pix][rows:].any()  # zero rows pad to the bucket
            assert len(b[index]) == len(b[grid]) and set(b[index]) <= set(np.flatnonzero(b["sample_mask"]))
            pad_id = info.image_pad_id if grid == "image_grid_thw" else info.video_pad_id
            # Every row's pad tokens equal its grids' merged patches.
            for row in range(5):
                want = int(np.prod(b[grid][b[index] == row], axis=1).sum()) // 4
                assert (b["input_ids"][row] == pad_id).sum() == want
        assert len(b["second_per_grid_ts"]) == len(b["video_grid_thw"])
    last = batches[-1]
    assert not last["sample_mask"].all() and (last["attention_mask"][~last["sample_mask"]] == 0).all()


def test_same_seed_same_order_new_seed_new_order_and_epochs_reshuffle(records, cfg):
    cfg.batch_size = 2
    cfg.num_epochs = 2
    a = ids_of(pipeline.make_iterator(records, cfg)[0])
    b = ids_of(pipeline.make_iterator(records, cfg)[0])
    assert a == b and len(a) == 24
    assert sorted(a[:12]) == sorted(a[12:]) and a[:12] != a[12:]  # each epoch whole, shuffled differently
    cfg.shuffle_seed = 1
    assert ids_of(pipeline.make_iterator(records, cfg)[0]) != a


def test_shards_are_disjoint_and_cover_the_data(records, cfg):
    cfg.batch_size, cfg.drop_remainder = 2, False
    shards = [ids_of(one_epoch(records, cfg, shard_index=i, shard_count=3)[0]) for i in range(3)]
    assert sum(len(s) for s in shards) == 12
    assert set().union(*map(set, shards)) == {r["id"] for r in records} - {"gone"}
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.make_dataset(records, cfg, shard_index=3, shard_count=3)


def test_mixture_follows_weights(records, cfg):
    videos = [r for r in records if r["id"].startswith("v")]
    images = [r for r in records if r["id"].startswith("i")]
    cfg.batch_size = 4
    it, _ = pipeline.make_iterator([(videos, 3.0), (images, 1.0)], cfg)
    ids = ids_of([next(it) for _ in range(10)])
    share = collections.Counter(i[0] for i in ids)
    assert share["v"] == 30 and share["i"] == 10  # grain mixes by exact proportions


def test_reject_fraction_stops_the_run_naming_examples(records, cfg):
    bad = [dict(r, id=f"bad{k}", media=[{"kind": "video", "path": "/nonexistent.mp4"}]) for k, r in
           enumerate(records[:6])]
    cfg.max_reject_fraction, cfg.reject_check_after, cfg.batch_size = 0.3, 4, 1
    it, _ = pipeline.make_iterator(records[:4] + bad, cfg)
    with pytest.raises(TooManyRejectsError, match=r"missing_file.*bad\d"):
        for _ in range(20):
            next(it)


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_after_save_restore(records, cfg, workers):
    cfg.batch_size, cfg.num_epochs, cfg.worker_count = 2, 2, workers
    it, counter = pipeline.make_iterator(records, cfg)
    for _ in range(4):
        next(it)
    state = it.get_state()
    counts = counter.summary()
    rest = [next(it) for _ in range(5)]
    it2, counter2 = pipeline.make_iterator(records, cfg)
    it2.set_state(state)
    assert counter2.summary() == counts  # rejection counts resume too
    _assert_same_batches([next(it2) for _ in range(5)], rest)
    assert counter2.summary() == counter.summary()
    if workers:
        cfg.worker_count = 0  # workers change nothing in what comes out
        serial, _ = pipeline.make_iterator(records, cfg)
        _assert_same_batches([next(serial) for _ in range(9)][4:], rest)
