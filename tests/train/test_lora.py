"""LoRA: exact start at the base model, merge == adapters, frozen base weights, adapter-only optimiser state,
sharded == single device, generation, the trainer's LoRA stage and ``emoqwen-convert merge-lora``."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_files import load_config
from flax import nnx
from train_configs import write_config

from emoqwen_jax.cli.convert import main as convert_main
from emoqwen_jax.infer import SamplingConfig, generate, left_pad
from emoqwen_jax.model import EmotionQwen, ModelConfig, abstract_model
from emoqwen_jax.model.lora import ADAPTER_PATTERN, LoRAConfig, apply_lora, dropout_key, lora_modules, merge_lora
from emoqwen_jax.model.sharding import axis_rules
from emoqwen_jax.model_dir import load_model, read_model_config, save_model
from emoqwen_jax.parallel import DEFAULT_RULES, make_mesh, shard_batch, shard_model
from emoqwen_jax.train.loss import loss_fn
from emoqwen_jax.train.optim import make_optimizer, stage_trainable
from emoqwen_jax.train.plan import build_train_step
from emoqwen_jax.train.trainer import init_params, train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "tests" / "parallel"))
import emotion_qwen  # noqa: E402
from test_sharding import make_batch, tiny_config  # noqa: E402

CFG = LoRAConfig(rank=5, alpha=7.0, dropout=0.0)  # rank 5, scale 1.4: distinct from every model dimension


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _randomize_b(model, seed, std=0.05):
    """Non-zero lora_b (as after training), so merged-vs-adapter comparisons mean something."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(seed)
    for path, var in flat.items():
        if path[-1] == "lora_b":
            var[...] = jnp.asarray(rng.standard_normal(var.shape).astype(np.float32) * std)
    return model


def _text_inputs(model):
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    mask = (np.arange(7)[None] < np.array([[7], [4]])).astype(np.int64)
    return ids, mask


def test_zero_b_is_exactly_the_base_model_and_merge_matches_adapters():
    mc = tiny_config("paper")
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, make_batch(mc, 4))
    logits = nnx.jit(lambda m, b: m.forward(b).logits)
    base = np.asarray(logits(model, batch))
    paths = apply_lora(model, CFG, rngs=nnx.Rngs(1))
    assert paths == lora_modules(model) and len(paths) == 4 * mc.text.num_layers
    np.testing.assert_array_equal(np.asarray(logits(model, batch)), base)  # B = 0: bit-identical
    _randomize_b(model, 0)
    adapted = np.asarray(logits(model, batch))
    assert np.abs(adapted - base).max() > 1e-2
    merged = np.asarray(logits(merge_lora(nnx.clone(model)), batch))
    assert np.abs(merged - adapted).max() / np.abs(adapted).max() <= 1e-5


def test_targets_errors_and_dropout():
    model = EmotionQwen(tiny_config("paper"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"match no Linear module"):
        apply_lora(model, LoRAConfig(targets=(r"self_attn/qkv_proj$",)))
    with pytest.raises(ValueError, match="lora.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="unknown lora field"):
        LoRAConfig.from_dict({"rnak": 4})
    # Other Linear layers can be targeted too (ViT attention, the gate).
    assert len(apply_lora(nnx.clone(model), LoRAConfig(rank=2, targets=(r"^visual/blocks/\d+/attn/qkv$",
                                                                        r"^compressor/gate/fc1$")))) == 3
    apply_lora(model, LoRAConfig(rank=4, alpha=4, dropout=0.5), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, CFG)
    _randomize_b(model, 1)
    ids, mask = _text_inputs(model)
    batch = jax.tree.map(jnp.asarray, model.prepare_inputs(ids, mask))
    run = nnx.jit(lambda m, b, k: m.forward(b).logits if k is None else _with_key(m, b, k))
    plain = run(model, batch, None)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(run(model, batch, k1), run(model, batch, k1))  # reproducible per key
    assert float(jnp.abs(run(model, batch, k1) - run(model, batch, k2)).max()) > 1e-4
    assert float(jnp.abs(run(model, batch, k1) - plain).max()) > 1e-4
    # Under block remat (the 7b setting) the recomputed forward draws the same masks: equal loss and grads.
    remat = nnx.clone(model)
    remat.language_model.remat = True
    grads = nnx.jit(lambda m, b, k: _grad_with_key(m, b, k))
    (l0, g0), (l1, g1) = grads(model, batch, k1), grads(remat, batch, k1)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(g0)), jax.tree.leaves(nnx.to_pure_dict(g1)), strict=True):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * max(float(jnp.abs(y).max()), 1e-30)


def _with_key(model, batch, key):
    with dropout_key(key):
        return model.forward(batch).logits


def _grad_with_key(model, batch, key):
    batch = batch.replace(labels=jnp.where(batch.text.attention_mask > 0, batch.text.input_ids, -100))
    with dropout_key(key):
        return nnx.value_and_grad(lambda m: loss_fn(m, batch)[0])(model)


def test_optimizer_state_holds_only_adapters_and_7b_saving():
    """Adam moments exist for the adapters only; the 7b preset's saving is measured with eval_shape."""

    def adam_bytes(preset, stage):
        config = emotion_qwen.get_config(preset)
        sc = config.stages[stage]
        mc = ModelConfig.from_run_config(config)
        abstract = abstract_model(mc)
        extra = ()
        if sc.lora.enabled:
            lora = LoRAConfig.from_dict(sc.lora.to_dict())
            abstract = nnx.eval_shape(lambda: _with_lora(EmotionQwen(mc, rngs=nnx.Rngs(0)), lora))
            extra = (ADAPTER_PATTERN,)
        view = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _pure(abstract))
        trainable = stage_trainable(view, sc, abstract.config, extra)
        tx, _ = make_optimizer(sc.optimizer, sc.num_steps, trainable)
        state = jax.eval_shape(tx.init, view)
        leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0]
        return sum(x.size * x.dtype.itemsize for x in leaves), leaves, view, trainable.labels

    got, leaves, view, labels = adam_bytes("tiny", "stage3_lora")
    adapters = [x for x, lab in zip(jax.tree.leaves(view), jax.tree.leaves(labels), strict=True) if lab == "trainable"]
    assert {lab for lab in jax.tree.leaves(labels)} == {"trainable", "frozen"}
    assert len(leaves) == 2 * len(adapters) == 2 * 4 * 4  # mu and nu of lora_a/lora_b, 4 projections x 2 layers
    assert got == 2 * sum(x.size * 4 for x in adapters)
    full, *_ = adam_bytes("7b", "stage3_video")
    lora, *_ = adam_bytes("7b", "stage3_lora")
    print(f"\n7b AdamW state: stage3_video (full) {full / 2**30:.2f} GiB, stage3_lora {lora / 2**20:.1f} MiB, "
          f"saved {(full - lora) / 2**30:.2f} GiB ({100 * (1 - lora / full):.2f}%)")
    assert lora < full / 50


def _with_lora(model, cfg):
    apply_lora(model, cfg)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["paper", "token_shard_map"])
def test_sharded_lora_loss_and_grads_equal_single_device(mode):
    """Paper mode (E experts + gate, the expert axis a reduction over expert groups) and token routing with
    the shard_map all-to-all dispatch, each on an (fsdp=2, expert=2, tensor=2) mesh."""
    mc = tiny_config(mode)
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), rngs=nnx.Rngs(1))
    _randomize_b(model, 2)
    batch = make_batch(mc, 4)  # fsdp * expert = 4 batch shards
    step = nnx.jit(lambda m, b: nnx.value_and_grad(lambda m_: loss_fn(m_, b)[0])(m))
    ref_loss, ref_grads = step(model, jax.tree.map(jnp.asarray, batch))
    mesh = make_mesh(dict(fsdp=2, expert=2, tensor=2))
    sharded = shard_model(nnx.clone(model), mesh)
    a = sharded.language_model.layers[0].self_attn.q_proj.lora_a[...]
    assert a.sharding.spec[0] == ("fsdp", "expert")  # adapters follow the kernel's 'embed' rule
    with axis_rules(mesh, DEFAULT_RULES):
        loss, grads = step(sharded, shard_batch(batch, mesh))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    adapters = 0
    for path, got in nnx.to_flat_state(grads):
        ref = ref_flat[path][...]
        err = float(jnp.abs(got[...] - ref).max() / jnp.maximum(jnp.abs(ref).max(), 1e-30))
        assert err <= 1e-5, (path, err)
        adapters += path[-1] in ("lora_a", "lora_b") and float(jnp.abs(ref).max()) > 0
    assert adapters == 2 * 4 * mc.text.num_layers


def test_generate_with_adapters_equals_merged_model():
    mc = tiny_config("paper")
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    model.language_model.lm_head.kernel[...] = model.language_model.lm_head.kernel[...] * 12.0  # decisive argmax
    apply_lora(model, CFG, rngs=nnx.Rngs(1))
    _randomize_b(model, 3, std=0.2)
    merged = merge_lora(nnx.clone(model))
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0)
    sampling = SamplingConfig(max_new_tokens=6, pad_id=0)
    got, want = generate(model, ids, mask, sampling=sampling), generate(merged, ids, mask, sampling=sampling)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    base = generate(_base_of(model), ids, mask, sampling=sampling)
    assert (np.asarray(base.tokens) != np.asarray(got.tokens)).any()  # the adapters do change the output


def _base_of(model):
    """The model with lora_b zeroed (= its base weights)."""
    return merge_lora(_randomize_b(nnx.clone(model), 0, std=0.0))


def test_trainer_lora_stage_freezes_base_and_merge_lora_cli(tmp_path, demo_dir):
    """A 3-step stage3_lora run: only adapters change, the stage dir carries them, merge-lora folds them."""
    cfg_file = write_config(tmp_path / "cfg.py", demo_dir, stages=("stage3_lora",), steps=3, every=100,
                            extra="c.stages.stage3_lora.lora.update(rank=4, alpha=8.0, dropout=0.1)")
    config = load_config(cfg_file)
    workdir = tmp_path / "run"
    summary = train_and_evaluate(config, str(workdir))
    stage_dir = summary["final"]
    _, meta = read_model_config(stage_dir)
    assert meta["lora"]["rank"] == 4 and len(meta["lora"]["modules"]) == 8
    trained = load_model(stage_dir)
    before = init_params(ModelConfig.from_run_config(config), config.seed)  # the trainer's own start
    after = _pure(trained)
    changed = []
    for path, x in jax.tree_util.tree_leaves_with_path(after):
        keys = tuple(getattr(k, "key", k) for k in path)
        if keys[-1] in ("lora_a", "lora_b"):
            changed.append(keys)
            continue
        ref = before
        for k in keys:
            ref = ref[k]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref), err_msg=str(keys))  # bit-identical base
    assert len(changed) == 16
    assert float(jnp.abs(trained.language_model.layers[0].self_attn.q_proj.lora_b[...]).max()) > 0
    # emoqwen-plan compiles the step this stage trained (one builder): the same trainable set, the adapters.
    _, abstract, built = build_train_step(config, "stage3_lora")
    adapters = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(after)
                   if getattr(path[-1], "key", None) in ("lora_a", "lora_b"))
    last = summary["stages"]["stage3_lora"]
    assert last["trainable_params"] == built.trainable.count(_pure(abstract)) == adapters
    assert last["trained_leaves"] == len(built.trainable.paths) == 16
    # merge-lora: a plain model directory with the same logits (float32, 1e-5).
    out = tmp_path / "merged"
    assert convert_main(["merge-lora", "--ckpt", stage_dir, "--out", str(out)]) == 0
    merged_cfg = json.loads((out / "config.json").read_text())
    assert "lora" not in merged_cfg["meta"] and merged_cfg["meta"]["merged_lora"]["rank"] == 4
    merged = load_model(str(out))
    assert not lora_modules(merged)
    ids, mask = _text_inputs(merged)
    a, b = np.asarray(trained(ids, mask).logits), np.asarray(merged(ids, mask).logits)
    assert np.abs(a - b).max() / np.abs(a).max() <= 1e-5
    assert convert_main(["merge-lora", "--ckpt", str(out), "--out", str(tmp_path / "again")]) == 2  # no adapters
    assert convert_main(["to-hf", "--ckpt", str(out), "--out", str(tmp_path / "hf"), "--lora_adapter"]) == 2
    # A model directory round trip keeps the adapters bit-identical.
    save_model(trained, str(tmp_path / "copy"))
    again = _pure(load_model(str(tmp_path / "copy")))
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
