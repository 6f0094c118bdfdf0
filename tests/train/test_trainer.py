"""The training system: determinism, freezing, safety (resume after SIGKILL / SIGTERM: test_resume.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_files import ROOT, load_config, optimizer_config
from flax import nnx
from train_configs import write_config

from emoqwen_jax.model_dir import load_model
from emoqwen_jax.train.metrics import read_metrics
from emoqwen_jax.train.trainer import train_and_evaluate

STEPS = 8  # per stage; checkpoints every 2 steps


def losses(workdir):
    """{(stage, step): loss} keeping the last row per step (a resumed run re-logs steps after its checkpoint)."""
    return {(r["stage"], r["step"]): r["loss"] for r in read_metrics(str(workdir))}


def params_of(path):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(str(path)), nnx.Param)))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("ref")
    config = load_config(write_config(root / "cfg.py", demo_dir, steps=STEPS))
    config.workdir = str(root / "run")
    summary = train_and_evaluate(config)
    return root, config, summary


@pytest.mark.slow
def test_same_seed_gives_bit_identical_losses(reference_run, tmp_path, demo_dir):
    root, _, summary = reference_run
    again = load_config(write_config(tmp_path / "cfg.py", demo_dir, steps=STEPS))
    again.workdir = str(tmp_path / "run")
    train_and_evaluate(again)
    first, second = losses(root / "run"), losses(tmp_path / "run")
    assert len(first) == 2 * STEPS and first == second  # float equality: bit-identical loss column
    rows = read_metrics(str(root / "run"))
    for key in ("stage", "step", "loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                "data_rejected", "gate_weights"):
        assert key in rows[-1]
    assert os.path.exists(summary["stages"]["stage2_emotion"]["plot"])
    assert os.listdir(root / "run" / "tensorboard")


@pytest.mark.slow
def test_freezing_per_stage(reference_run):
    root, config, _ = reference_run
    from emoqwen_jax.model import ModelConfig
    from emoqwen_jax.train.trainer import init_params

    init = jax.tree.map(np.asarray, init_params(ModelConfig.from_run_config(config), config.seed))  # its own start
    s1, s2 = params_of(root / "run/stages/stage1_align"), params_of(root / "run/stages/stage2_emotion")

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    # Stage 1 trains the compressor only: the gate and each of the two experts change.
    assert same(s1["visual"], init["visual"]) and same(s1["language_model"], init["language_model"])
    assert not same(s1["compressor"]["gate"], init["compressor"]["gate"])
    for e, expert in enumerate(("general", "emotion")):
        for name, stacked in s1["compressor"]["experts"].items():
            assert not np.array_equal(stacked[e], init["compressor"]["experts"][name][e]), (expert, name)
    # Stage 2 trains the emotion expert (index 1) and the gate; the general expert is bit-identical.
    for name, stacked in s2["compressor"]["experts"].items():
        np.testing.assert_array_equal(stacked[0], s1["compressor"]["experts"][name][0])
    assert not np.array_equal(s2["compressor"]["experts"]["mlp_0_kernel"][1],
                              s1["compressor"]["experts"]["mlp_0_kernel"][1])
    assert not same(s2["compressor"]["gate"], s1["compressor"]["gate"])
    assert same(s2["language_model"], s1["language_model"]) and same(s2["visual"], s1["visual"])


def _tiny_step(patterns, opt):
    """A tiny model's params, a text batch, and a jitted train step training ``patterns`` with ``opt``."""
    from emoqwen_jax.model import EmotionQwen, ModelConfig
    from emoqwen_jax.train.optim import make_optimizer, select_trainable
    from emoqwen_jax.train.step import make_train_step

    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    mc = ModelConfig.from_run_config(emotion_qwen.get_config("tiny"))
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    labels = select_trainable(params, patterns, expert_names=mc.expert_names, expert_roles=mc.expert_roles)
    opt = optimizer_config(**opt)
    tx, schedule = make_optimizer(opt, 10, labels)
    step = jax.jit(make_train_step(graphdef, tx, labels, schedule, grad_accum=int(opt["grad_accum"])))
    ids = np.arange(1, 9, dtype=np.int32).reshape(1, 8)
    batch = jax.tree.map(jnp.asarray, model.prepare_inputs(ids, labels=ids))
    return params, batch, tx, step


def test_nonfinite_update_is_skipped():
    from emoqwen_jax.train.step import init_state

    params, batch, tx, step = _tiny_step((r"^compressor/",), {"learning_rate": 1e-3})
    # Optimizer state exists only for trainable leaves.
    opt_arrays = sum(x.size for x in jax.tree.leaves(tx.init(params)) if x.ndim > 0)
    trainable = sum(x.size for x in jax.tree.leaves(params["compressor"]))
    assert opt_arrays == 2 * trainable  # Adam mu and nu (beside scalar step counts), nothing for frozen leaves
    params["language_model"]["norm"]["weight"] = params["language_model"]["norm"]["weight"].at[0].set(jnp.nan)
    state0 = init_state(params, tx, 0)
    state1, metrics = step(state0, batch)
    assert not bool(metrics["finite"]) and int(state1.nonfinite) == 1
    for a, b in zip(jax.tree.leaves((state1.params, state1.opt_state)),
                    jax.tree.leaves((state0.params, state0.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_updates_every_k_micro_steps():
    from emoqwen_jax.train.step import init_state

    params, batch, tx, step = _tiny_step((r"^language_model/norm/",), {
        "learning_rate": 1e-2, "warmup_fraction": 0.0, "grad_accum": 2})
    s0 = init_state(params, tx, 0)
    s1, _ = step(s0, batch)
    s2, _ = step(s1, batch)
    w = lambda s: np.asarray(s.params["language_model"]["norm"]["weight"])  # noqa: E731
    np.testing.assert_array_equal(w(s1), w(s0))  # first micro-step only accumulates
    assert not np.array_equal(w(s2), w(s1))  # the second applies the averaged update


@pytest.mark.slow
def test_demo_preset_runs_three_stages_from_the_readme_command(tmp_path):
    """README command 1 as written: three stages, then the final weights score the held-out demo clips, and
    the tiny model has learned the five cartoon expressions (UAR >= 0.6; chance is 0.2)."""
    res = subprocess.run([sys.executable, "-m", "emoqwen_jax.cli.train", "--config=configs/emotion_qwen.py:demo",
                          f"--config.workdir={tmp_path / 'demo'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary["final_loss"]) == {"stage1_align", "stage2_emotion", "stage3_video"}
    rows = read_metrics(str(tmp_path / "demo"))
    stage3 = [r["loss"] for r in rows if r["stage"] == "stage3_video"]
    assert stage3[-1] < stage3[0]  # the LLM stage learns the demo answers
    for stage in summary["final_loss"]:
        assert (tmp_path / "demo" / "stages" / stage / "config.json").exists()
        assert (tmp_path / "demo" / "plots" / f"{stage}_loss.png").exists()
    dfew = summary["eval"]["dfew"]
    assert set(dfew) == {"uar", "war", "invalid_rate", "n"} and dfew["n"] == 25  # the held-out clips
    assert dfew["uar"] >= 0.6 and dfew["invalid_rate"] <= 0.2, dfew
    assert f"stage3_video eval dfew: uar {dfew['uar']}" in res.stdout
    report = json.loads((tmp_path / "demo" / "eval" / "stage3_video" / "report.json").read_text())
    assert report["benchmarks"]["dfew"]["uar"] == dfew["uar"]
    assert report["settings"]["overrides"]["video_max_pixels"] == 112 * 112  # the demo's frames, recorded


def test_optimizer_state_is_sharded_like_its_parameters():
    """Freshly initialised Adam moments must not be laid out replicated (7B memory depends on it)."""
    from emoqwen_jax.parallel import make_mesh, pure_param_shardings
    from emoqwen_jax.train.step import init_state, state_shardings

    params, _, tx, _ = _tiny_step((r"^compressor/", r"^language_model/layers/0/"), {"learning_rate": 1e-3})
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    from emoqwen_jax.model import ModelConfig

    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    from emoqwen_jax.model import EmotionQwen

    abstract = nnx.eval_shape(lambda: EmotionQwen(ModelConfig.from_run_config(emotion_qwen.get_config("tiny")),
                                                  rngs=nnx.Rngs(0)))
    shardings = pure_param_shardings(abstract, mesh)
    init = lambda p: init_state(p, tx, 0)  # noqa: E731
    target = state_shardings(jax.eval_shape(init, params), shardings, mesh)
    state = jax.jit(init, out_shardings=target)(jax.device_put(params, shardings))
    q_kernel = shardings["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if "layers/0/self_attn/q_proj/kernel" in "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                                                                 for k in path)]
    assert len(moments) == 2 and all(m.sharding.spec == q_kernel.spec for m in moments)  # mu and nu
    assert q_kernel.spec != jax.sharding.PartitionSpec()
