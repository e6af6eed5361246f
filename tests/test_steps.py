"""Tests for asose_jax.steps: what weight_step and arch_step change in each engine, that training lowers the loss,
and the padded evaluation. Tiny net (C0=8, L=3, 4 ops, batch 16), CPU."""
from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import model, single_path, steps, train_state
from asose_jax.config import Config, DataConfig, MixedOpConfig, ModelConfig
from asose_jax.data import synthetic_cifar

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
B, SPE = 16, 4


def tiny_cfg(**mixed) -> Config:
    return Config(model=ModelConfig(skeleton="resnet", init_channels=8, num_layers=3, ops=OPS),
                  mixed_op=MixedOpConfig(**{"mode": "single", **mixed}),
                  data=DataConfig(source="synthetic", batch_size=B, crop=False, flip=False))


def make_state(spec, cfg, seed=0):
    return train_state.create_train_state(seed, spec, cfg, SPE)


@pytest.fixture(scope="module")
def data():
    train, _ = synthetic_cifar(B * SPE, 16, seed=0)
    return jnp.asarray(train.images), jnp.asarray(train.labels)


@pytest.fixture(scope="module")
def switch_steps():
    """Compiled steps of the tiny net in `single` mode with in-program `lax.switch` dispatch."""
    cfg = tiny_cfg(dispatch="switch")
    spec = model.build_spec("resnet", 8, 3, OPS)
    return spec, cfg, steps.make_steps(spec, cfg, SPE)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def chosen_ops(choice) -> list[int]:
    """Per-row op index of a `single`-mode choice (switch: ``[rows, 1]``; host dispatch: ``{"idx": [rows]}``)."""
    idx = choice["idx"] if isinstance(choice, dict) else np.asarray(choice)[:, 0]
    return [int(i) for i in np.asarray(idx)]


@pytest.fixture(scope="module", params=["switch", "host"])
def trajectory(request, data, switch_steps):
    """One weight step then one arch step from a fresh state, for each single-mode dispatch; host copies
    of the state before and after each step (the device state is donated)."""
    if request.param == "switch":
        spec, cfg, S = switch_steps
    else:  # host dispatch keeps host-side mirrors of the state: a fresh Steps for a fresh state
        cfg = tiny_cfg(dispatch=request.param)
        spec = model.build_spec("resnet", 8, 3, OPS)
        S = steps.make_steps(spec, cfg, SPE)
    x, y = data
    perm = jnp.arange(B * SPE, dtype=jnp.int32).reshape(SPE, B)
    state = make_state(spec, cfg)
    # `none` can't be drawn, so every row's straight-through gradient is non-zero
    state = state.replace(alpha=state.alpha.at[:, OPS.index("none")].set(-30.0))
    s0 = host(state)
    c_w = S.sample(state)
    state = S.weight_step(state, x, y, perm, 0, c_w)
    s1 = host(state)
    c_a = S.sample(state)
    state = S.arch_step(state, x, y, perm, 1, c_a)
    s2 = host(state)
    return {"spec": spec, "cfg": cfg, "states": (s0, s1, s2), "choices": (c_w, c_a)}


# ---------------------------------------------------------------------------------------------- the steps

def test_weight_step_changes_params_not_alpha(trajectory):
    before, after, _ = trajectory["states"]
    choice = trajectory["choices"][0]
    assert len(chosen_ops(choice)) == trajectory["spec"].num_rows
    assert changed(before.params, after.params)
    assert changed(before.batch_stats, after.batch_stats)
    chex.assert_trees_all_equal(after.alpha, before.alpha)
    chex.assert_trees_all_equal(after.a_opt, before.a_opt)
    assert int(after.step) == 1 and int(after.arch_epochs) == 0
    assert int(after.sums["count"]) == B and math.isfinite(float(after.sums["loss"]))
    # the pre-clip gradient norm: the first SGD step leaves trace = clip(g) + wd * p (momentum buffer 0)
    norm = float(after.sums["grad_norm"]) / B
    assert math.isfinite(norm) and norm > 0 and float(after.sums["grad_norm_max"]) == pytest.approx(norm, rel=1e-6)
    o = trajectory["cfg"].optim
    clipped = jax.tree.map(lambda t, p: t - o.weight_decay * p, after.w_opt[2].trace, before.params)
    assert float(train_state.global_norm(clipped)) == pytest.approx(min(norm, o.clip_norm), rel=1e-4)
    # only the sampled op of each row got a gradient: the others move at most by the L2 decay term
    # (first step: momentum buffer = wd * p), or not at all where the optimizer skips them
    decay = float(train_state.cosine_warm_restarts(0.025, 50, 2, 1e-6)(0)) * trajectory["cfg"].optim.weight_decay
    for r, (block, op) in enumerate(zip(after.params["blocks"], chosen_ops(choice))):
        assert OPS[op] != "none"
        for name in OPS:
            old_p, new_p = before.params["blocks"][r]["paths"][0][name], block["paths"][0][name]
            for a, b in zip(jax.tree.leaves(old_p), jax.tree.leaves(new_p)):
                step_size = np.abs(b - a)
                if name == OPS[op]:
                    assert np.any(step_size > 10 * decay * np.abs(a) + 1e-7), (r, name)
                else:
                    np.testing.assert_array_less(step_size, (decay * 1.001 + 4e-7) * np.abs(a) + 1e-12)  # + fp32 rounding
            stats_moved = changed(before.batch_stats["blocks"][r]["paths"][0][name],
                                  after.batch_stats["blocks"][r]["paths"][0][name])
            assert not stats_moved or name == OPS[op], (r, name, OPS[op])


def test_arch_step_changes_alpha_not_params(trajectory):
    _, before, after = trajectory["states"]
    assert changed(before.alpha, after.alpha)
    assert np.all(np.any(after.alpha != before.alpha, axis=-1))  # every row moved: dL/dalpha != 0 in single mode
    chex.assert_trees_all_equal(after.params, before.params)
    chex.assert_trees_all_equal(after.w_opt, before.w_opt)
    assert int(after.step) == 2
    assert np.all(np.isfinite(after.alpha))
    for name in ("grad_norm", "grad_norm_max"):  # weight-gradient statistics: arch steps leave them alone
        chex.assert_trees_all_equal(after.sums[name], before.sums[name])


def test_sample_uses_the_steps_key(switch_steps):
    spec, cfg, S = switch_steps
    state = make_state(spec, cfg)
    a, b = S.sample(state), S.sample(state)
    chex.assert_trees_all_equal(a, b)  # deterministic in (key, step)
    chex.assert_shape(a, (spec.num_rows, 1))
    draws = {tuple(np.asarray(S.sample(state.replace(step=jnp.int32(s)))).ravel()) for s in range(12)}
    assert len(draws) > 1  # and it varies with the step


def test_loss_decreases_on_a_fixed_batch(switch_steps, data):
    """20 weight steps on one fixed batch of synthetic data. alpha strongly favours sep_conv_3x3, so the
    sampled path is the same every step and the loss curve has no sampling noise."""
    spec, cfg, S = switch_steps
    x, y = data
    perm = jnp.zeros((SPE, B), jnp.int32) + jnp.arange(B, dtype=jnp.int32)  # the same batch in every row
    state = make_state(spec, cfg)
    state = state.replace(alpha=state.alpha.at[:, OPS.index("sep_conv_3x3")].set(30.0))
    losses = []
    for i in range(20):
        state = state.replace(sums=train_state.zero_sums())
        choice = S.sample(state)
        assert set(chosen_ops(choice)) == {OPS.index("sep_conv_3x3")}
        state = S.weight_step(state, x, y, perm, i % SPE, choice)  # perm's shape as compiled above
        losses.append(float(state.sums["loss"]) / B)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_evaluate_pads_the_last_batch(switch_steps, data):
    spec, cfg, S = switch_steps
    x, y = data
    state = make_state(spec, cfg)
    full = steps.evaluate(S, state, x[:48], y[:48], batch_size=48)
    padded = steps.evaluate(S, state, x[:48], y[:48], batch_size=20)  # 20 + 20 + 8 (padded)
    assert full["acc"] == pytest.approx(padded["acc"])
    assert full["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert 0.0 <= full["acc"] <= 100.0


# ---------------------------------------------------------------------------------------------- remat

def _nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("dispatch", ["switch", "host"])
def test_remat_gives_the_same_weight_step_in_every_engine(data, dispatch):
    x, y = data
    perm = jnp.arange(B * SPE, dtype=jnp.int32).reshape(SPE, B)
    spec = model.build_spec("resnet", 8, 3, OPS)
    params = []
    for remat in (False, True):
        cfg = dataclasses.replace(tiny_cfg(dispatch=dispatch), remat=remat)
        S = steps.make_steps(spec, cfg, SPE)
        state = make_state(spec, cfg)
        params.append(host(S.weight_step(state, x, y, perm, 0, S.sample(state)).params))
    chex.assert_trees_all_close(params[1], params[0], atol=1e-6, rtol=1e-5)


def test_remat_checkpoints_every_block_of_the_one_program_step():
    """``remat`` primitives in the step's jaxpr (the depthwise convs hold some of their own): one more per block."""
    spec = model.build_spec("resnet", 8, 3, OPS)
    counts = {}
    for remat in (False, True):
        cfg = dataclasses.replace(tiny_cfg(mode="routed", arch_mode="dense"), remat=remat)
        state = jax.eval_shape(lambda: train_state.create_train_state(0, spec, cfg, SPE))
        choice = jax.eval_shape(steps.program_steps(spec, cfg, SPE).sample, state)
        jaxpr = jax.make_jaxpr(lambda s, c: steps.train_weights(spec, cfg, SPE, s, jnp.zeros((B, 32, 32, 3), jnp.uint8),
                                                               jnp.zeros((B,), jnp.int32),
                                                               jnp.zeros((1, B), jnp.int32), 0, c))(state, choice)
        counts[remat] = str(jaxpr).count("remat")
    assert counts[True] >= counts[False] + len(spec.blocks), counts


def test_remat_keeps_only_the_block_inputs_between_the_host_engines_programs():
    """The host engine's block program returns its VJP, which holds the residuals until the backward program: with
    remat only the block's inputs (the block is recomputed there)."""
    spec = model.build_spec("resnet", 8, 3, OPS)
    params, stats = model.init_network(0, spec)
    block, op = spec.blocks[0], OPS.index("sep_conv_3x3")
    prm, st = single_path._chosen(params["blocks"][0], [OPS[op]]), single_path._chosen(stats["blocks"][0], [OPS[op]])
    h = jnp.ones((B, 32, 32, 8))
    held = {remat: _nbytes(single_path._block_fwd(OPS, block, (op,), remat, prm, st, h, jnp.ones((1,)))[1])
            for remat in (False, True)}
    inputs = _nbytes((prm, st, h))
    assert held[True] <= inputs + 1024 < held[False], (held, inputs)


def test_each_step_program_compiles_once_over_phases(tmp_path):
    """Two cycles of weight and arch epochs compile the weight and the arch step once each: the values a phase's
    start writes into the state are placed like the steps' outputs (unplaced, they are another input type)."""
    from asose_jax.config import CheckpointConfig, CycleConfig, GrowthConfig
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset

    cfg = dataclasses.replace(
        tiny_cfg(mode="routed", arch_mode="dense"),
        data=DataConfig(source="synthetic", synthetic_train=96, synthetic_test=16, arch_val_size=32, batch_size=B,
                        crop=False, flip=False),
        cycle=CycleConfig(max_cycles=2, warmup_epochs=1, weight_epochs=1, arch_epochs=1, retrain_epochs=0,
                          early_stop_cycles=0),
        growth=GrowthConfig(enabled=False), checkpoint=CheckpointConfig(enabled=False))
    run = Run(cfg, load_dataset(cfg.data, cfg.seed), tmp_path, progress=False)
    run.init_state()
    run.execute()
    phases = [r["phase"] for r in run.metrics if "phase" in r]
    assert phases.count("arch") == 2 and phases.count("weight") >= 2, phases
    assert run.steps.weight_step._cache_size() == 1
    assert run.steps.arch_engine.arch_step._cache_size() == 1
