"""Stacked experts stay stacked in the optimiser: per-expert freezing by masks, roles instead of names, Adam
moments sharded over the expert axis (per-device optimiser bytes fall as the expert axis grows)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.parallel import make_mesh, pure_param_shardings
from emoqwen_jax.train.optim import make_optimizer, select_trainable, stage_trainable
from emoqwen_jax.train.plan import build_train_step, shard_bytes
from emoqwen_jax.train.step import init_state, make_train_step, state_shardings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402
from config_files import optimizer_config

pytestmark = pytest.mark.slow  # trains stacked experts

STAGES = ("stage1_align", "stage2_emotion", "stage3_video")


def tiny(routing="sample", num_experts=2, **compressor):
    config = emotion_qwen.get_config("tiny")
    config.model.compressor.update(routing=routing, num_experts=num_experts, **compressor)
    return config


def abstract_params(mc):
    model = nnx.eval_shape(lambda: EmotionQwen(mc, rngs=nnx.Rngs(0)))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("num_experts", [1, 2, 3, 8])
def test_num_experts_alone_gives_names_roles_and_stage_sets(routing, num_experts):
    config = tiny(routing, num_experts)
    mc = ModelConfig.from_run_config(config)
    assert len(mc.expert_names) == len(set(mc.expert_names)) == num_experts
    params = abstract_params(mc)
    for stage in STAGES:
        t = stage_trainable(params, config.stages[stage], mc)
        experts = t.labels["compressor"]["experts"]
        mask = t.expert_masks.get("compressor/experts/mlp_0_kernel")
        trains = [experts["mlp_0_kernel"] == "trainable"] * num_experts if mask is None else list(mask)
        if routing == "token":
            assert all(trains) and t.labels["compressor"]["router"]["kernel"] == "trainable"
            assert mc.expert_names == tuple(f"expert_{i}" for i in range(num_experts))
        else:  # expert 0 general, the others emotion: stage 1 trains all, stages 2 and 3 freeze the general one
            assert mc.expert_names[0] == "general" and mc.expert_roles[1:] == ("emotion",) * (num_experts - 1)
            assert trains == [stage == "stage1_align"] + [True] * (num_experts - 1), stage
            if num_experts > 1:
                assert t.labels["compressor"]["gate"]["head"]["kernel"] == "trainable"
        llm = t.labels["language_model"]["norm"]["weight"]
        assert llm == ("trainable" if stage == "stage3_video" else "frozen")
    assert ModelConfig.from_run_config(tiny("sample", 2)).expert_names == ("general", "emotion")
    assert ModelConfig.from_run_config(tiny("sample", 3)).expert_names == ("general", "emotion_1", "emotion_2")


def test_regexes_still_address_experts_by_name_and_typos_fail():
    mc = ModelConfig.from_run_config(tiny("sample", 3))
    params = abstract_params(mc)
    t = select_trainable(params, (r"^compressor/experts/[^/]+/emotion_2$",), expert_names=mc.expert_names,
                         expert_roles=mc.expert_roles)
    assert t.expert_masks["compressor/experts/mlp_2_bias"] == (False, False, True)
    with pytest.raises(ValueError, match="match no parameter"):
        select_trainable(params, (r"^compressor/experts/[^/]+/emotoin$",), expert_names=mc.expert_names,
                         expert_roles=mc.expert_roles)
    with pytest.raises(ValueError, match="unknown; choose from"):
        select_trainable(params, (), ("emotional",), expert_names=mc.expert_names, expert_roles=mc.expert_roles)


def test_frozen_experts_stay_bit_identical_inside_a_trained_stacked_leaf():
    """Stage 2, four paper-mode experts, weight decay on: the general expert's slices do not move and have no
    Adam moments; every emotion expert and the gate train."""
    config = tiny("sample", 4)
    mc = ModelConfig.from_run_config(config)
    sc = config.stages["stage2_emotion"]
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    trainable = stage_trainable(params, sc, mc)
    assert trainable.expert_masks["compressor/experts/mlp_0_kernel"] == (False, True, True, True)
    tx, schedule = make_optimizer(optimizer_config(learning_rate=1e-2, warmup_fraction=0.0), 10,
                                  trainable)
    step = jax.jit(make_train_step(graphdef, tx, trainable, schedule))
    rng = np.random.default_rng(0)
    grid = np.array([[1, 4, 4]])
    ids = np.array([[5, mc.vision_start_token_id, *[mc.image_token_id] * 4, mc.vision_end_token_id, 7, 9]], np.int32)
    batch = model.prepare_inputs(ids, np.ones_like(ids), rng.standard_normal((16, 1176)).astype(np.float32), grid,
                                 labels=ids)
    batch = jax.tree.map(jnp.asarray, batch)
    s0 = init_state(params, tx, 0)
    s1, metrics = step(s0, batch)
    s2, _ = step(s1, batch)
    assert bool(metrics["finite"])
    before, after = s0.params["compressor"]["experts"], s2.params["compressor"]["experts"]
    for name in before:
        np.testing.assert_array_equal(np.asarray(after[name][0]), np.asarray(before[name][0]))  # general
    assert all(not np.array_equal(np.asarray(after[n][1:]), np.asarray(before[n][1:])) for n in ("mlp_0_kernel",
                                                                                                  "mlp_2_kernel"))
    gate0, gate2 = s0.params["compressor"]["gate"]["head"]["kernel"], s2.params["compressor"]["gate"]["head"]["kernel"]
    assert not np.array_equal(np.asarray(gate0), np.asarray(gate2))
    # The moments stay stacked [E, ...] and are exactly zero for the frozen general expert.
    stacked = [x for p, x in jax.tree_util.tree_leaves_with_path(s2.opt_state)
               if "experts" in jax.tree_util.keystr(p) and "mlp_0_kernel" in jax.tree_util.keystr(p)]
    assert len(stacked) == 2 and all(x.shape[0] == 4 for x in stacked)  # mu and nu
    assert all(float(jnp.abs(x[0]).max()) == 0 and float(jnp.abs(x[1:]).max()) > 0 for x in stacked)


def test_adam_moments_keep_the_expert_sharding_and_shrink_with_the_expert_axis():
    """The planner's view of one device's optimiser state (no compile): as mesh.expert grows over 8 devices
    (the rest data), the per-device optimiser bytes of a 64-expert scale-mode compressor fall."""
    config = tiny("token", 64, top_k=2)
    per_device = {}
    for expert in (1, 2, 4, 8):
        config.mesh.update(data=8 // expert, fsdp=1, expert=expert, tensor=1)
        mesh = make_mesh(dict(config.mesh))
        mc, _, built = build_train_step(config, "stage1_align")
        abstract = nnx.eval_shape(lambda mc=mc: EmotionQwen(mc, rngs=nnx.Rngs(0)))
        pshard = pure_param_shardings(abstract, mesh)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_params(mc), pshard)
        shapes = jax.eval_shape(built.init, params)
        shardings = state_shardings(shapes, pshard, mesh)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
        moments = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
                   if "'experts'" in jax.tree_util.keystr(p) and "mlp_0_kernel" in jax.tree_util.keystr(p)]
        assert len(moments) == 2 and all(x.shape[0] == 64 for _, x in moments)
        if expert > 1:
            assert all(x.sharding.spec[0] == "expert" for _, x in moments), moments
        per_device[expert] = shard_bytes(state.opt_state)
    assert per_device[8] < per_device[4] < per_device[2] < per_device[1], per_device
