"""Patch rows of a step: the real rows, rounded up to one of the data's patch buckets (one compiled shape)."""

import numpy as np

from emoqwen_jax.train import batching


def fake_batch(image_grids, video_grids, *, image_rows, video_rows, length=192):
    """A pipeline batch whose image and video rows are padded separately (as ``data.pipeline.Collate`` does)."""
    return {"input_ids": np.zeros((8, length), np.int32),
            "image_grid_thw": np.asarray(image_grids, np.int64).reshape(-1, 3),
            "video_grid_thw": np.asarray(video_grids, np.int64).reshape(-1, 3),
            "pixel_values": np.zeros((image_rows, 1176), np.float32),
            "pixel_values_videos": np.zeros((video_rows, 1176), np.float32)}


def test_a_batch_with_stills_gets_the_same_patch_rows_as_one_without():
    videos_only = fake_batch([], [[2, 8, 8]] * 8, image_rows=0, video_rows=1024)
    mixed = fake_batch([[1, 6, 8]] * 2, [[2, 8, 8]] * 6, image_rows=1024, video_rows=1024)  # 96 + 768 real rows
    # (length, real patch rows, items, audio windows): no audio in these batches
    assert batching.needs(videos_only) == (192, 1024, 8, 0) and batching.needs(mixed) == (192, 864, 8, 0)
    sizes = {batching.agreed_sizes([batching.needs(b)], 8, (1024,)) for b in (videos_only, mixed)}
    assert sizes == {(192, 1024, 8, 0)}
    assert batching.agreed_sizes([(100, 864, 3), (120, 500, 8)], 4, (512, 1024, 4096))[:3] == (120, 1024, 8)
    assert batching.agreed_sizes([(100, 5000, 3)], 4, (512, 1024, 4096))[:3] == (100, 8192, 4)  # past the last bucket
    assert batching.agreed_sizes([(100, 864, 3)], 4)[:3] == (100, 864, 4)  # no buckets: the maximum itself


def test_patch_rows_and_text_rows_split_evenly_over_the_batch_devices():
    # one shard (one process) over 8 data devices: P and P / 4 units must both divide by 8 -> P a multiple of 32
    assert batching.layout_multiples(4, 1, 8) == (32, 8)
    assert batching.layout_multiples(4, 8, 8) == (4, 1)  # one shard per device: whole shards per device already
    assert batching.layout_multiples(4, 2, 8) == (16, 4)
    sizes = batching.agreed_sizes([(100, 888, 2, 3)], 2, (512,), *batching.layout_multiples(4, 1, 8))
    assert sizes == (100, 1024, 8, 8)  # past the bucket: 2 x 512; items and audio windows: the 8 padded rows
    for shards, devices, real in ((1, 8, 888), (2, 8, 36), (3, 4, 100), (1, 6, 52)):
        patch_multiple, row_multiple = batching.layout_multiples(4, shards, devices)
        p = batching.agreed_sizes([(10, real, 1)], 1, (), patch_multiple, row_multiple)[1]
        assert p >= real and (shards * p) % devices == 0 and (shards * p // 4) % devices == 0, (shards, devices, p)
        assert (shards * row_multiple) % devices == 0
