"""The `routed` mixed-op mode and the conditional-free search (routed weight steps, dense arch steps): the groups
and the images each op receives, BatchNorm over a group, one op equals the fixed network, gradients only from an
op's own group, the config's refusals, the step's permutations, and the bars of issue 19 (no conditional in the
compiled steps of the default and cifar10_95 nets before and after growth; FLOPs within 1.15x of the fixed-op
floor). CPU, small nets."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import cli, growth, mixed_op, model, ops, steps, train_state
from asose_jax.config import (Config, ConfigError, DataConfig, MixedOpConfig, ModelConfig, load_config_file,
                              preset_path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402

PARAM_OPS = ("sep_conv_3x3", "dil_conv_3x3", "sep_conv_5x5", "conv_7x1_1x7")
C, HW = 4, 4


@pytest.fixture(scope="module", autouse=True)
def lax_depthwise():
    """Grouped-conv depthwise: it compiles faster on CPU (test_ops checks that the forms agree)."""
    saved = ops.DEPTHWISE_IMPL["impl"]
    ops.DEPTHWISE_IMPL["impl"] = "lax"
    yield
    ops.DEPTHWISE_IMPL["impl"] = saved


def path_and_batch(names, batch: int, seed: int = 0):
    params, stats = model.init_path(seed, names, C, 1)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, HW, HW, C))
    return params, stats, x


def routed(names, params, stats, x, perm, train=True):
    return mixed_op.apply(names, 1, params, stats, x, mixed_op.select(jnp.zeros(len(names)), "routed", choice=perm),
                          "routed", train)


# ---------------------------------------------------------------------------------------------- the groups

def test_routed_is_a_mode_that_draws_its_choices_and_trains_weights_only():
    mode = mixed_op.MODES["routed"]
    assert mode.draw is not None and mode.choose is None
    assert not mode.trainable and not mode.host_dispatch
    with pytest.raises(ValueError, match="pass choice"):
        mixed_op.select(jnp.zeros(3), "routed")


@pytest.mark.parametrize("batch,k", [(16, 4), (10, 4), (128, 10), (7, 7), (3, 5)])
def test_groups_are_contiguous_and_of_size_b_over_k_or_one_more(batch, k):
    bounds = mixed_op.group_bounds(batch, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert {hi - lo for lo, hi in bounds} <= {batch // k, batch // k + 1}


@pytest.fixture
def tag_ops():
    """Ops ``tag0..tag3`` that add their own index to the input: the output says which op an image went through."""
    names = []
    for k in range(4):
        op = ops.register_op(ops.OpDef(f"tag{k}", lambda key, c, s: ({}, {}),
                                       lambda p, s, x, stride, train, k=k: (x + k, s), parameter_free=True))
        names.append(op.name)
    yield tuple(names)
    for n in names:
        del ops.OP_REGISTRY[n]


@pytest.mark.parametrize("batch", [16, 10])
def test_each_op_receives_exactly_its_group_of_images(tag_ops, batch):
    x = jnp.zeros((batch, 2, 2, 1))
    perm = jax.random.permutation(jax.random.PRNGKey(3), batch)
    y, _ = jax.jit(routed, static_argnums=0)(tag_ops, {n: {} for n in tag_ops}, {n: {} for n in tag_ops}, x, perm)
    took = np.asarray(y[:, 0, 0, 0]).astype(int)
    chex.assert_trees_all_equal(y, jnp.broadcast_to(y[:, :1, :1, :], y.shape))  # shape kept, positions untouched
    for k, (lo, hi) in enumerate(mixed_op.group_bounds(batch, len(tag_ops))):
        assert set(np.flatnonzero(took == k)) == set(np.asarray(perm[lo:hi]).tolist()), k


def test_each_op_normalises_over_its_group_and_its_statistics_see_only_that_group():
    names = PARAM_OPS[:3]
    params, stats, x = path_and_batch(names, 11)
    perm = jax.random.permutation(jax.random.PRNGKey(4), 11)
    y, new_stats = jax.jit(routed, static_argnums=0)(names, params, stats, x, perm)
    for name, (lo, hi) in zip(names, mixed_op.group_bounds(11, len(names))):
        idx = perm[lo:hi]
        y_k, s_k = ops.OP_REGISTRY[name].apply(params[name], stats[name], x[idx], 1, True)
        chex.assert_trees_all_close(y[idx], y_k, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(new_stats[name], s_k, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- exactness

def test_with_one_op_the_routed_network_equals_the_fixed_network():
    spec = model.build_spec("resnet", 4, 3, ("sep_conv_3x3",))
    params, stats = model.init_network(0, spec)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 16, 16, 3))
    perms = mixed_op.draw_rows(jax.random.PRNGKey(2), spec.num_rows, "routed", 12)
    fixed_spec = dataclasses.replace(spec, fixed_ops=(0,) * spec.num_rows)

    @jax.jit
    def loss_and_grads(p, sel):
        def loss(p):
            net, mode = (spec, "routed") if sel is not None else (fixed_spec, "fixed")
            logits, new = model.apply_network(net, p, stats, x, sel, mode, True)
            return jnp.sum(jnp.sin(logits)), (logits, new)
        return jax.value_and_grad(loss, has_aux=True)(p)

    sel = mixed_op.select_rows(jnp.zeros((spec.num_rows, 1)), "routed", choices=perms)
    (_, (logits, new)), grads = loss_and_grads(params, sel)
    (_, (logits0, new0)), grads0 = loss_and_grads(params, None)
    chex.assert_trees_all_close(logits, logits0, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(new, new0, atol=1e-5, rtol=1e-5)
    # the backward sums over the batch in another order, and BN's backward sums terms that nearly cancel: equal to
    # 1e-3 of each leaf's scale (with the identity permutation the forward is bit-identical and the gradients still
    # differ at 1e-4 of that scale)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g, g0, atol=1e-3 * float(jnp.max(jnp.abs(g0))) + 1e-7)


def _op_grads(names, params, stats, x, perm):
    """Weight gradients of a loss that sums a function of each image's own output."""
    def loss(p):
        y, _ = routed(names, p, stats, x, perm)
        return jnp.sum(jnp.sin(3 * y))
    return jax.jit(jax.grad(loss))(params)


def test_an_ops_gradient_comes_from_its_own_group_only():
    names = PARAM_OPS
    params, stats, x = path_and_batch(names, 12)
    perm = jax.random.permutation(jax.random.PRNGKey(5), 12)
    bounds = mixed_op.group_bounds(12, len(names))
    g = _op_grads(names, params, stats, x, perm)
    lo, hi = bounds[1]
    others = np.setdiff1d(np.arange(12), np.asarray(perm[lo:hi]))
    g_moved = _op_grads(names, params, stats, x.at[others].multiply(-2.0), perm)  # every other group's images change
    chex.assert_trees_all_close(g_moved[names[1]], g[names[1]], atol=0, rtol=0)
    for k in (0, 2, 3):
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g_moved[names[k]]),
                                                          jax.tree.leaves(g[names[k]]))), names[k]


def test_ops_with_an_empty_group_do_not_run():
    """Batch 2 over 4 ops: ops 2 and 3 get no image, so no gradient and no statistics update (the config refuses
    such a batch, see below)."""
    names = PARAM_OPS
    params, stats, x = path_and_batch(names, 2)
    perm = jnp.array([1, 0])
    g = _op_grads(names, params, stats, x, perm)
    _, new_stats = jax.jit(routed, static_argnums=0)(names, params, stats, x, perm)
    for k, name in enumerate(names):
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_stats[name]),
                                                             jax.tree.leaves(stats[name])))
        g_abs = sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(g[name]))
        assert (g_abs > 0, moved) == ((True, True) if k < 2 else (False, False)), name


# ---------------------------------------------------------------------------------------------- config, steps

def routed_cfg(**kw) -> Config:
    mixed = {"mode": "routed", "arch_mode": "dense", **kw.pop("mixed", {})}
    return Config(model=ModelConfig(skeleton="resnet", init_channels=4, num_layers=2, ops=PARAM_OPS[:3]),
                  mixed_op=MixedOpConfig(**mixed),
                  data=DataConfig(source="synthetic", batch_size=kw.pop("batch", 12), crop=False, flip=False))


@pytest.mark.parametrize("cfg,key", [
    (routed_cfg(batch=2), "data.batch_size"),
    (routed_cfg(mixed={"arch_mode": ""}), "mixed_op.arch_mode"),
    (routed_cfg(mixed={"arch_mode": "routed"}), "mixed_op.arch_mode"),
    (routed_cfg(mixed={"eval_mode": "routed"}), "mixed_op.eval_mode"),
])
def test_the_config_refuses_what_routed_cannot_do(cfg, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        cli.check_registered_names(cfg)


def test_the_routed_search_config_is_accepted():
    cli.check_registered_names(routed_cfg(batch=3))


@pytest.fixture(scope="module")
def routed_run():
    """A routed weight step then a dense arch step of a 2-block net, from a fresh state (host copies)."""
    cfg = routed_cfg()
    spec = model.build_spec("resnet", 4, 2, cfg.model.ops)
    S = steps.make_steps(spec, cfg, 2)
    state = train_state.create_train_state(0, spec, cfg, 2)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3)), jnp.uint8)
    y = jnp.arange(24, dtype=jnp.int32) % 10
    perm = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    host = lambda s: jax.tree.map(np.asarray, jax.device_get(s))  # noqa: E731
    s0, choice = host(state), S.sample(state)
    again, later = S.sample(state), S.sample(state.replace(step=state.step + 1))
    state = S.weight_step(state, x, y, perm, 0, choice)
    s1 = host(state)
    state = S.arch_step(state, x, y, perm, 1, S.arch_sample(state))
    return {"spec": spec, "states": (s0, s1, host(state)), "choices": (choice, again, later)}


def test_sample_draws_one_permutation_of_the_batch_per_row_from_the_steps_key(routed_run):
    choice, again, later = routed_run["choices"]
    chex.assert_shape(choice, (routed_run["spec"].num_rows, 12))
    for row in np.asarray(choice):
        assert sorted(row.tolist()) == list(range(12))
    assert not np.array_equal(choice[0], choice[1])
    chex.assert_trees_all_equal(choice, again)
    assert not np.array_equal(choice, later)


def test_a_routed_weight_step_trains_every_op_and_leaves_alpha(routed_run):
    s0, s1, _ = routed_run["states"]
    chex.assert_trees_all_equal(s1.alpha, s0.alpha)
    for b0, b1 in zip(s0.params["blocks"], s1.params["blocks"]):
        for name in PARAM_OPS[:3]:  # every op got images, so every op's weights moved beyond the L2 decay
            moved = [np.max(np.abs(n - o) / (np.abs(o) + 1e-6)) for o, n in
                     zip(jax.tree.leaves(b0["paths"][0][name]), jax.tree.leaves(b1["paths"][0][name]))]
            assert max(moved) > 1e-3, name


def test_a_dense_arch_step_trains_alpha_and_leaves_the_weights(routed_run):
    _, s1, s2 = routed_run["states"]
    assert np.all(np.any(s2.alpha != s1.alpha, axis=-1))
    chex.assert_trees_all_equal(s2.params, s1.params)


# ---------------------------------------------------------------------------------------------- bars

def preset_net(name: str, width: int = 4) -> Config:
    """Preset ``name`` with routed weight steps and dense arch steps, at ``width`` stem channels and one image
    per op (the conditionals do not depend on either)."""
    cfg = load_config_file(preset_path(name))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_channels=width),
                               mixed_op=dataclasses.replace(cfg.mixed_op, mode="routed", arch_mode="dense"),
                               data=dataclasses.replace(cfg.data, batch_size=len(cfg.model.ops)))


def conditionals(spec, cfg, state, compile_: bool) -> tuple[int, int]:
    """``conditional`` ops in the optimised HLO (``compile_``), else ``case``/``if`` in the lowered program, of the
    weight step and of the arch step."""
    arch_cfg = dataclasses.replace(cfg, mixed_op=dataclasses.replace(cfg.mixed_op, mode="dense", arch_mode=""))
    w_steps, a_steps = steps.program_steps(spec, cfg, 2), steps.program_steps(spec, arch_cfg, 2)
    b = cfg.data.batch_size
    x, y = jax.ShapeDtypeStruct((2 * b, 32, 32, 3), jnp.uint8), jax.ShapeDtypeStruct((2 * b,), jnp.int32)
    perm = jax.ShapeDtypeStruct((2, b), jnp.int32)
    counts = []
    for fn, sample in ((w_steps.weight_step, w_steps.sample), (a_steps.arch_step, a_steps.sample)):
        lowered = fn.lower(state, x, y, perm, 0, jax.eval_shape(sample, state))
        if compile_:
            counts.append(len(re.findall(r"\bconditional\(", lowered.compile().as_text())))
        else:
            counts.append(len(re.findall(r"stablehlo\.(case|if)\b", lowered.as_text())))
    return tuple(counts)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["default", "cifar10_95"])
def test_the_routed_and_dense_steps_hold_no_conditional_before_and_after_each_growth(preset):
    """The lowered programs at the start and after deepen, widen and branch in turn; the compiled ones at the end,
    whose net holds every structure the start and each growth make (compiling each net would take minutes)."""
    cfg = preset_net(preset)
    m = cfg.model
    spec = model.build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes, m.stage_width_mult)
    state = train_state.create_train_state(0, spec, cfg, 2)
    assert conditionals(spec, cfg, state, compile_=False) == (0, 0)
    key = jax.random.PRNGKey(1)
    for kind in ("deepen", "widen", "branch"):
        key, k_grow = jax.random.split(key)
        spec, state, _ = growth.grow(kind, spec, state, k_grow, cfg.growth)
        assert conditionals(spec, cfg, state, compile_=False) == (0, 0), kind
    assert conditionals(spec, cfg, state, compile_=True) == (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [128, 512])
def test_the_routed_weight_step_costs_at_most_1_15x_its_fixed_op_floor(batch):
    """XLA's FLOPs of the compiled routed weight step against the mean, over the ops, of the same step with every
    row fixed to one op (no hidden dense compute)."""
    cfg = dataclasses.replace(routed_cfg(batch=batch), model=ModelConfig(
        skeleton="resnet", init_channels=4, num_layers=2, ops=("none", "max_pool_3x3", "sep_conv_3x3", "dil_conv_5x5")))
    costs = benchlib.routed_floor(cfg)
    assert costs["routed_flops"] <= 1.15 * costs["floor_flops"], costs
    assert costs["routed_flops"] >= 0.95 * costs["floor_flops"], costs  # the floor is a floor
