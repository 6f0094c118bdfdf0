"""User paths as URIs (emoqwen_jax.runtime.storage): file:// URIs and an fsspec filesystem registered for the test (no
network), through manifests, media decoding, metrics and the safetensors reader. The ``scratch`` fixture (a
``scratch://`` filesystem) lives in tests/conftest.py."""

import json

import numpy as np
import pytest

from emoqwen_jax.runtime import storage
from emoqwen_jax.train.metrics import MetricsWriter, read_metrics


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from emoqwen_jax.data import demo

    out = tmp_path_factory.mktemp("demo_data")
    demo.build_demo(str(out))
    return out


def test_normalize_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("gs://bucket/run/") == "gs://bucket/run"
    assert storage.normalize("run") == str(tmp_path / "run")
    assert storage.normalize(f"file://{tmp_path}/run") == str(tmp_path / "run")
    assert storage.join("gs://bucket/run", "stages", "s1") == "gs://bucket/run/stages/s1"
    assert storage.scheme("gs://b") == "gs" and storage.scheme("file:///x") == "" and storage.scheme("/a/b") == ""
    assert not storage.is_uri("C:/x") and storage.is_uri("s3://b/k")
    with pytest.raises(ValueError, match="empty path"):
        storage.normalize("")


def test_file_ops_on_a_registered_filesystem(scratch):
    path = storage.join(scratch, "a", "b.json")
    storage.write_json(path, {"x": 1})
    assert storage.exists(path) and storage.isfile(path) and storage.isdir(storage.join(scratch, "a"))
    assert storage.read_json(path) == {"x": 1}
    assert storage.listdir(storage.join(scratch, "a")) == ["b.json"]
    with storage.local_file(path) as local:
        assert json.load(open(local)) == {"x": 1}
    storage.remove(storage.join(scratch, "a"))
    assert not storage.exists(path)


def test_glob_dirname_and_resolve(scratch, tmp_path):
    """The helpers the benchmark readers and suite configs use, on a URI and on a local folder alike."""
    for root in (storage.join(scratch, "bench"), str(tmp_path / "bench")):
        for name in ("b.txt", "a.txt", "c.jpg"):
            storage.write_text(storage.join(root, "q", name), name)
        txt = storage.glob(storage.join(root, "q"), "*.txt")
        assert txt == [storage.join(root, "q", n) for n in ("a.txt", "b.txt")]
        assert storage.glob(storage.join(root, "missing"), "*") == []
        assert storage.dirname(storage.join(root, "q", "a.txt")) == storage.join(root, "q")
    assert storage.resolve("scratch://bucket/cfg", "../data/POPE") == "scratch://bucket/data/POPE"
    assert storage.resolve("scratch://bucket/cfg", "gs://other/x") == "gs://other/x"
    assert storage.resolve("scratch://bucket/cfg", "/abs/x") == "/abs/x"
    assert storage.resolve(str(tmp_path / "cfg"), "../data") == str(tmp_path / "data")
    assert storage.resolve(str(tmp_path), f"file://{tmp_path}/d") == str(tmp_path / "d")


def test_manifest_and_media_from_a_uri_data_root(scratch, upload, demo_dir):
    """The demo set copied to scratch:// reads as the local one (paths are URIs, clips decode from bytes)."""
    from emoqwen_jax.data.manifests import load_manifest
    from emoqwen_jax.data.video_io import read_video
    from emoqwen_jax.data.vision import load_image

    root = storage.join(scratch, "demo")
    upload(demo_dir, root)
    remote = load_manifest(storage.join(root, "train.jsonl"), root)
    local = load_manifest(str(demo_dir / "train.jsonl"), str(demo_dir))
    assert len(remote) == len(local) > 0
    for r, lo in zip(remote, local, strict=True):
        assert r.get("conversations") == lo.get("conversations")
        if "media" in r:
            assert [m["path"] for m in r["media"]] == [
                m["path"].replace(str(demo_dir), root) for m in lo["media"]]
    media = [m for r in remote for m in r.get("media", [])]
    image = next(m["path"] for m in media if m["kind"] == "image")
    video = next(m["path"] for m in media if m["kind"] == "video")
    local_image = image.replace(root, str(demo_dir))
    np.testing.assert_array_equal(np.asarray(load_image(image)), np.asarray(load_image(local_image)))
    first_two = lambda n, fps: np.arange(2)  # noqa: E731
    np.testing.assert_array_equal(read_video(video, first_two)[0],
                                  read_video(video.replace(root, str(demo_dir)), first_two)[0])
    # The clip's sound too, opened on its own and through the one open the prompts share.
    from emoqwen_jax.data.audio import read_audio
    from emoqwen_jax.data.video_io import MediaFile

    local_wave = read_audio(video.replace(root, str(demo_dir)))
    np.testing.assert_array_equal(read_audio(video), local_wave)
    with MediaFile(video) as opened:
        np.testing.assert_array_equal(read_audio(opened), local_wave)


def test_path_escaping_a_uri_root_is_rejected(scratch):
    from emoqwen_jax.data.manifests import resolve_path
    from emoqwen_jax.data.reasons import Rejected

    assert resolve_path(storage.join(scratch, "root"), "v/a.mp4") == "scratch://bucket/root/v/a.mp4"
    with pytest.raises(Rejected, match="outside"):
        resolve_path(storage.join(scratch, "root"), "../other/a.mp4")


def test_metrics_and_tensorboard_on_a_uri_workdir(scratch):
    workdir = storage.join(scratch, "run")
    writer = MetricsWriter(workdir)
    for step in (1, 2):
        writer.write({"stage": "s", "step": step, "global_step": step, "loss": 1.0 / step})
    writer.close()
    assert [r["loss"] for r in read_metrics(workdir)] == [1.0, 0.5]
    events = storage.listdir(storage.join(workdir, "tensorboard"))
    assert events and events[0].startswith("events.out.tfevents")
    again = MetricsWriter(workdir)  # a resumed run appends
    again.write({"stage": "s", "step": 3, "global_step": 3, "loss": 0.25})
    again.close()
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]


def test_tensor_reader_reads_one_tensor_at_a_time_from_a_uri(scratch):
    import ml_dtypes
    from safetensors.numpy import save

    from emoqwen_jax.convert.hf_import import TensorReader

    rng = np.random.default_rng(0)
    tensors = {"model.language_model.norm.weight": rng.normal(size=(7,)).astype(np.float32),
               "visual.blocks.0.attn.qkv.weight": rng.normal(size=(6, 5)).astype(np.float16),
               "lm_head.weight": rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16)}
    with storage.open(storage.join(scratch, "hf", "model.safetensors"), "wb") as f:
        f.write(save(tensors))
    reader = TensorReader(storage.join(scratch, "hf"))
    assert sorted(reader.keys()) == ["lm_head.weight", "model.norm.weight", "visual.blocks.0.attn.qkv.weight"]
    np.testing.assert_array_equal(reader.get("model.norm.weight"), tensors["model.language_model.norm.weight"])
    np.testing.assert_array_equal(reader.get("visual.blocks.0.attn.qkv.weight"),
                                  tensors["visual.blocks.0.attn.qkv.weight"])
    got = reader.get("lm_head.weight")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), tensors["lm_head.weight"].astype(np.float32))


def test_export_to_a_uri_and_import_back(scratch):
    """emoqwen-convert to-hf into scratch:// (staged locally, then uploaded) and from_hf straight from it."""
    import sys
    from pathlib import Path

    import jax
    from flax import nnx

    from emoqwen_jax.convert import from_hf, to_hf
    from emoqwen_jax.model import EmotionQwen, ModelConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
    import emotion_qwen

    model = EmotionQwen(ModelConfig.from_dict(emotion_qwen.get_config("tiny").model.to_dict()), rngs=nnx.Rngs(1))
    target = storage.join(scratch, "export")
    summary = to_hf(model, target, tokenizer=False, max_shard_size="100KB")
    assert summary["out_dir"] == target and "model.safetensors.index.json" in storage.listdir(target)
    back = from_hf(target)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="not empty"):
        to_hf(model, target, tokenizer=False)


def test_emotion_eval_labels_and_clips_from_a_uri_root(scratch, upload, demo_dir):
    """emoqwen-eval / emoqwen-score inputs (label CSV, predictions, video root) on scratch://."""
    from emoqwen_jax.eval.emotion.benchmarks import get_benchmark, read_labels, read_predictions
    from emoqwen_jax.eval.emotion.runner import locate

    root = storage.join(scratch, "dfew")
    upload(demo_dir, root, (".csv", ".mp4"))
    labels = read_labels(storage.join(root, "eval_dfew.csv"), get_benchmark("dfew"))
    assert labels == read_labels(str(demo_dir / "eval_dfew.csv"), get_benchmark("dfew"))
    paths = locate(list(labels), root)
    assert all(p and p.startswith(root + "/videos/") and storage.isfile(p) for p in paths.values())
    storage.write_text(storage.join(root, "pred.jsonl"), '{"id": "videos/clip_000", "response": "happy"}\n')
    assert read_predictions(storage.join(root, "pred.jsonl")) == {"videos/clip_000": "happy"}
