"""Sequence packing in the grain pipeline: every sample once, rows within the capacity, per-sample segment ids,
the samples' own tokens and labels, fewer padding tokens, exact resume."""

import numpy as np
import pytest
from data_helpers import conv, numbered_frames

from emoqwen_jax.data import manifests, packing, pipeline, video_io


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """6 short clips of different lengths and 4 images of different sizes."""
    root = tmp_path_factory.mktemp("pack")
    from PIL import Image

    recs = []
    for i in range(6):
        video_io.write_video(str(root / f"v{i}.mp4"), numbered_frames(6 + 3 * i, 48, 64), 10.0)
        recs.append(conv("video", f"v{i}.mp4", answer="happy " * (1 + 4 * i), sample_id=f"v{i}"))
    for i in range(4):
        Image.fromarray(np.full((40 + 30 * i, 60, 3), 40 * i, np.uint8)).save(root / f"i{i}.png")
        recs.append(conv("image", f"i{i}.png", answer="sad " * (1 + 3 * i), sample_id=f"i{i}"))
    return [manifests.conversation_record(r, str(root), "m", k) for k, r in enumerate(recs)]


def epoch(records, cfg, packed: bool):
    cfg.num_epochs, cfg.packing = 1, packed
    it, _ = pipeline.make_iterator(records, cfg)
    return list(it)


def real_rows(batch):
    return [i for i, m in enumerate(batch["sample_mask"]) if m]


def test_packed_rows_hold_each_sample_once_with_its_tokens_and_labels(records, cfg):
    cfg.batch_size, cfg.drop_remainder, cfg.max_length = 2, False, 256
    cfg.length_buckets = (64, 128, 256)
    single = {}
    for b in epoch(records, cfg, packed=False):
        for i in real_rows(b):
            n = int(b["attention_mask"][i].sum())
            single[b["id"][i]] = (b["input_ids"][i, :n], b["labels"][i, :n])
    seen, real, slots = [], 0, 0
    for b in epoch(records, cfg, packed=True):
        length = b["input_ids"].shape[1]
        assert length in cfg.length_buckets and b["segment_ids"].shape == b["input_ids"].shape
        for i in real_rows(b):
            ids, seg = b["id"][i].split(","), b["segment_ids"][i]
            n = int(b["attention_mask"][i].sum())
            assert n <= 256 and (seg[:n] > 0).all() and not seg[n:].any()  # 0 exactly on the padding
            assert list(np.unique(seg[:n])) == list(range(1, len(ids) + 1))
            for k, sample_id in enumerate(ids):
                where = seg == k + 1
                assert np.ptp(np.flatnonzero(where)) + 1 == where.sum()  # one contiguous run per sample
                np.testing.assert_array_equal(b["input_ids"][i, where], single[sample_id][0])
                np.testing.assert_array_equal(b["labels"][i, where], single[sample_id][1])  # labels unchanged
            seen += ids
        real += int(b["attention_mask"].sum())
        slots += b["attention_mask"].size
        # The visual items are listed in row order, each naming its row.
        for grid, index in (("image_grid_thw", "image_sample_index"), ("video_grid_thw", "video_sample_index")):
            assert (np.diff(b[index]) >= 0).all() and len(b[index]) == len(b[grid])
    assert sorted(seen) == sorted(single)  # every sample exactly once
    assert any("," in i for b in epoch(records, cfg, packed=True) for i in b["id"])  # some rows are packed
    unpacked = epoch(records, cfg, packed=False)
    unpacked_fraction = sum(int(b["attention_mask"].sum()) for b in unpacked) / sum(
        b["attention_mask"].size for b in unpacked)
    assert real / slots > unpacked_fraction  # packing wastes fewer slots on padding


def test_packed_iterator_resumes_exactly(records, cfg):
    cfg.batch_size, cfg.num_epochs, cfg.packing, cfg.max_length = 2, 2, True, 256
    cfg.length_buckets = (128, 256)
    it, _ = pipeline.make_iterator(records, cfg)
    next(it)
    state = it.get_state()  # a sample that did not fit is held: the state is from before it
    rest = [next(it) for _ in range(3)]
    it2, _ = pipeline.make_iterator(records, cfg)
    it2.set_state(state)
    for x, y in zip([next(it2) for _ in range(3)], rest, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_merge_row_and_capacity_errors():
    a = {"id": "a", "input_ids": np.arange(3), "attention_mask": np.ones(3), "labels": np.full(3, -100),
         "pixel_values": np.zeros((0, 4)), "image_grid_thw": np.zeros((0, 3)), "pixel_values_videos": np.zeros((0, 4)),
         "video_grid_thw": np.zeros((0, 3)), "second_per_grid_ts": np.zeros(0)}
    row = packing.merge_row([a, dict(a, id="b", input_ids=np.arange(2), attention_mask=np.ones(2),
                                     labels=np.arange(2))])
    assert row["id"] == "a,b"
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(row["labels"], [-100, -100, -100, 0, 1])
    with pytest.raises(ValueError, match="at least one"):
        packing.merge_row([])
    with pytest.raises(ValueError, match="batch_size"):
        packing.PackRows(None, 0, 8, False)


def _text_sample(sample_id: str, n: int) -> dict:
    empty = {"pixel_values": np.zeros((0, 4)), "image_grid_thw": np.zeros((0, 3)),
             "pixel_values_videos": np.zeros((0, 4)), "video_grid_thw": np.zeros((0, 3)),
             "second_per_grid_ts": np.zeros(0)}
    return {"id": sample_id, "input_ids": np.arange(n), "attention_mask": np.ones(n), "labels": np.arange(n), **empty}


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_first_fit_rows_and_the_held_sample_resume(drop_remainder):
    import grain

    lengths = [5, 3, 4, 2, 6, 1]
    source = grain.MapDataset.source([_text_sample(f"s{i}", n) for i, n in enumerate(lengths)]).to_iter_dataset()
    ds = packing.PackRows(source, batch_size=2, capacity=8, drop_remainder=drop_remainder)
    it = iter(ds)
    assert [r["id"] for r in next(it)] == ["s0,s1", "s2,s3"]  # 6 fits no row: it opens the next batch
    state = it.get_state()
    rest = [[r["id"] for r in rows] for rows in it]
    assert rest == ([] if drop_remainder else [["s4,s5"]])  # the last, one-row batch
    it2 = iter(ds)
    it2.set_state(state)  # from before the held sample: it is read again
    assert [[r["id"] for r in rows] for rows in it2] == rest
    with pytest.raises(ValueError, match="capacity"):
        next(iter(packing.PackRows(source, batch_size=2, capacity=4, drop_remainder=False)))
