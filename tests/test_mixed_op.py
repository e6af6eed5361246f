"""Tests for asose_jax.mixed_op: mode equivalences, precomputed choices, straight-through alpha gradients
in `single` mode, and that unselected ops really are skipped (compiled flops, conditionals in the
compiled program, runtime execution counts, BN statistics and gradients).

What XLA's cost analysis reports (jax 0.10.2, CPU; 10 primitives, C=16, 16x16, batch 8, eval mode): a
conditional counts as its most expensive branch, not the sum of all branches. So ``topk`` costs about
k x (the largest op): 13.2 / 26.5 / 39.8 MFLOP for k = 1 / 2 / 3 against 36.2 MFLOP dense (the sum of
all ops; conv_7x1_1x7 alone is 13.2), and ``threshold`` (one cond per op) is counted like dense whatever
it keeps (default depthwise impl; with the grouped-conv impl used here dense is 34.2). The static figure
is an upper bound, so the runtime tests below show the skipping itself: the compiled program keeps one
``conditional`` per switch, and an op wrapped with a host callback runs only when chosen.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import arch, mixed_op, model, ops
from asose_jax.ops import OP_REGISTRY, PRIMITIVES

OPS = PRIMITIVES
NUM = len(OPS)
C, HW, N = 8, 8, 4
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def lax_depthwise():
    """Grouped-conv depthwise here: it compiles ~5x faster on CPU than the shifted form, and test_ops
    checks that the two agree."""
    saved = ops.DEPTHWISE_IMPL["impl"]
    ops.DEPTHWISE_IMPL["impl"] = "lax"
    yield
    ops.DEPTHWISE_IMPL["impl"] = saved


def init_path_np(c: int, seed: int = 0, stride: int = 1):
    """``model.init_path`` over every op: params and BN stats, host arrays from ``seed``."""
    return model.init_path(seed, OPS, c, stride)


@pytest.fixture(scope="module")
def path():
    """Params and BN stats of one mixed op over all 10 primitives, and an input batch."""
    params, stats = init_path_np(C)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((N, HW, HW, C)), jnp.float32)
    return params, stats, x


def _weights(seed=3):
    """A softmax row with distinct entries (no ties)."""
    return jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(seed), (NUM,)) * 2.0)


@functools.partial(jax.jit, static_argnames=("mode", "k", "threshold", "train", "ops", "stride"))
def run(params, stats, x, w, mode, k=3, threshold=0.01, train=True, ops=OPS, stride=1, choice=None):
    sel = mixed_op.select(w, mode, k, threshold, choice)
    return mixed_op.apply(ops, stride, params, stats, x, sel, mode, train)


@functools.partial(jax.jit, static_argnames=("name", "train"))
def run_alone(params, stats, x, name, train=True):
    y, s = OP_REGISTRY[name].apply(params[name], stats[name], x, 1, train)
    return y, {**stats, name: s}


# ---------------------------------------------------------------------------------------------- equivalences

@pytest.mark.parametrize("train", [True, False])
def test_topk_all_equals_dense(path, train):
    params, stats, x = path
    w = _weights()
    y_dense, s_dense = run(params, stats, x, w, "dense", train=train)
    y_topk, s_topk = run(params, stats, x, w, "topk", k=NUM, train=train)
    chex.assert_trees_all_close(y_topk, y_dense, atol=ATOL, rtol=1e-5)
    chex.assert_trees_all_close(s_topk, s_dense, atol=ATOL, rtol=1e-5)


def test_threshold_zero_all_equals_dense(path):
    params, stats, x = path
    w = _weights()
    y_dense, s_dense = run(params, stats, x, w, "dense")
    y_thr, s_thr = run(params, stats, x, w, "threshold", k=NUM, threshold=0.0)
    chex.assert_trees_all_close(y_thr, y_dense, atol=ATOL, rtol=1e-5)
    chex.assert_trees_all_close(s_thr, s_dense, atol=ATOL, rtol=1e-5)


def test_dense_is_weighted_sum(path):
    params, stats, x = path
    w = _weights()
    y, _ = run(params, stats, x, w, "dense")
    ref = sum(w[i] * run_alone(params, stats, x, name)[0] for i, name in enumerate(OPS))
    chex.assert_trees_all_close(y, ref, atol=ATOL, rtol=1e-5)


def test_argmax_equals_op_alone(path):
    params, stats, x = path
    alpha = jnp.zeros((NUM,)).at[OPS.index("sep_conv_5x5")].set(1.0)
    for train in (True, False):
        y, s = run(params, stats, x, alpha, "argmax", train=train)
        y_ref, s_ref = run_alone(params, stats, x, "sep_conv_5x5", train=train)
        chex.assert_trees_all_close(y, y_ref, atol=ATOL)
        chex.assert_trees_all_close(s, s_ref, atol=ATOL)
    # and it is not simply every op's output: a different argmax gives a different result
    y_other, _ = run(params, stats, x, jnp.zeros((NUM,)).at[OPS.index("dil_conv_3x3")].set(1.0), "argmax")
    assert float(jnp.max(jnp.abs(y_other - y))) > 1e-3


def test_single_is_chosen_op_times_coefficient(path):
    params, stats, x = path
    w = _weights()  # soft weights: the coefficient is visibly < 1
    i = int(jnp.argmax(w))
    y, s = run(params, stats, x, w, "single")
    y_ref, s_ref = run_alone(params, stats, x, OPS[i])
    chex.assert_trees_all_close(y, w[i] * y_ref, atol=ATOL)
    chex.assert_trees_all_close(s, s_ref, atol=ATOL)
    # a hard straight-through sample: coefficient exactly 1 forward
    hard = arch.gumbel_softmax(jax.random.PRNGKey(5), jnp.log(w)[None], jnp.float32(1.0), hard=True)[0]
    j = int(jnp.argmax(hard))
    sel = mixed_op.select(hard, "single")
    assert float(sel["coeff"][0]) == pytest.approx(1.0)
    y_hard, _ = run(params, stats, x, hard, "single")
    chex.assert_trees_all_close(y_hard, run_alone(params, stats, x, OPS[j])[0], atol=ATOL)


def test_topk_renormalised_over_k(path):
    params, stats, x = path
    w = _weights()
    top = np.argsort(-np.asarray(w))[:3]
    y, _ = run(params, stats, x, w, "topk", k=3)
    wk = np.asarray(w)[top] / np.asarray(w)[top].sum()
    ref = sum(wk[j] * run_alone(params, stats, x, OPS[i])[0] for j, i in enumerate(top))
    chex.assert_trees_all_close(y, ref, atol=ATOL, rtol=1e-5)


def test_threshold_skips_small_weights_then_caps_at_k(path):
    params, stats, x = path
    w = jnp.array([0.005, 0.30, 0.008, 0.25, 0.20, 0.15, 0.05, 0.02, 0.009, 0.008])
    keep = np.asarray(mixed_op.choose(w, "threshold", k=NUM, threshold=0.01))
    np.testing.assert_array_equal(keep, np.asarray(w) >= 0.01)
    keep3 = np.asarray(mixed_op.choose(w, "threshold", k=3, threshold=0.01))
    np.testing.assert_array_equal(np.flatnonzero(keep3), [1, 3, 4])
    # nothing over the threshold: the argmax is still kept
    flat = jnp.full((NUM,), 1.0 / NUM)
    assert int(np.sum(np.asarray(mixed_op.choose(flat, "threshold", k=3, threshold=0.5)))) == 1
    y, _ = run(params, stats, x, w, "threshold", k=3, threshold=0.01)
    wk = np.asarray(w)[[1, 3, 4]] / np.asarray(w)[[1, 3, 4]].sum()
    ref = sum(wk[j] * run_alone(params, stats, x, OPS[i])[0] for j, i in enumerate([1, 3, 4]))
    chex.assert_trees_all_close(y, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("mode,k", [("single", 1), ("topk", 3), ("threshold", 3), ("argmax", 1)])
def test_precomputed_choice_matches_internal(path, mode, k):
    params, stats, x = path
    w = _weights(seed=11)
    choice = mixed_op.choose(w, mode, k, 0.01)
    y_in, s_in = run(params, stats, x, w, mode, k=k)
    y_pre, s_pre = run(params, stats, x, w, mode, k=k, choice=choice)
    chex.assert_trees_all_close(y_pre, y_in, atol=0)
    chex.assert_trees_all_close(s_pre, s_in, atol=0)
    # a different precomputed choice really is obeyed
    other = mixed_op.choose(jnp.roll(w, 1), mode, k, 0.01)
    y_other, _ = run(params, stats, x, w, mode, k=k, choice=other)
    assert float(jnp.max(jnp.abs(y_other - y_in))) > 1e-4


def test_rows_vmapped_select_matches_per_row():
    w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (4, NUM)), -1)
    for mode in (name for name, m in mixed_op.MODES.items() if m.choose is not None):  # choices from the weights
        rows = mixed_op.select_rows(w, mode, 3, 0.01)
        for r in range(4):
            chex.assert_trees_all_close(jax.tree.map(lambda a: a[r], rows), mixed_op.select(w[r], mode, 3, 0.01))
        choices = mixed_op.choose_rows(w, mode, 3, 0.01)
        chex.assert_trees_all_close(mixed_op.select_rows(w, mode, 3, 0.01, choices), rows)


def test_mode_table():
    """The original modes, and what each tells the steps: sampling, eval weights, engine, trainable."""
    base = ("dense", "single", "topk", "threshold", "argmax")
    modes = {name: mixed_op.MODES[name] for name in base}
    assert tuple(mixed_op.MODES)[:len(base)] == base
    assert "fixed" not in mixed_op.MODES and mixed_op.mode_named("fixed") is mixed_op.FIXED
    assert {n for n, m in modes.items() if m.sampling == "hard"} == {"single"}
    assert {n for n, m in modes.items() if m.host_dispatch} == {"single"}
    assert {n for n, m in modes.items() if not m.trainable} == {"argmax"}
    alpha = jax.random.normal(jax.random.PRNGKey(0), (3, NUM))
    chex.assert_trees_all_equal(mixed_op.MODES["argmax"].eval_weights(alpha), alpha)
    chex.assert_trees_all_close(mixed_op.MODES["topk"].eval_weights(alpha), jax.nn.softmax(alpha, -1))
    with pytest.raises(ValueError, match="unknown mixed-op mode"):
        mixed_op.choose(alpha[0], "sometimes")


# ---------------------------------------------------------------------------------------------- gradients

def test_single_mode_alpha_gradient_nonzero(path):
    """Hard Gumbel straight-through: y = w_hard[idx] * op_idx(x), and dL/dalpha != 0 (the original's
    renormalised single weight made it exactly 0)."""
    params, stats, x = path
    alpha = 0.1 * jax.random.normal(jax.random.PRNGKey(7), (1, NUM))
    alpha = alpha.at[0, OPS.index("none")].set(-30.0)  # `none` (zero output, zero gradient) can't be drawn

    @jax.jit
    def loss(a, key):
        w = arch.gumbel_softmax(key, a, jnp.float32(1.0), hard=True)[0]
        y, _ = mixed_op.apply(OPS, 1, params, stats, x, mixed_op.select(w, "single"), "single", True)
        return jnp.mean(jnp.square(y - 0.3))

    grads = [jax.grad(loss)(alpha, jax.random.PRNGKey(s)) for s in range(3)]
    for g in grads:
        chex.assert_tree_all_finite(g)
        assert float(jnp.max(jnp.abs(g))) > 1e-6
    # the straight-through gradient flows into every logit of the row (softmax Jacobian), not only the chosen one
    assert int(jnp.sum(jnp.abs(grads[0]) > 0)) >= NUM - 1


def test_unchosen_ops_untouched(path):
    """topk / threshold / single: unselected ops get zero weight gradients and keep their BN statistics."""
    params, stats, x = path
    w = jnp.array([0.005, 0.30, 0.008, 0.05, 0.25, 0.02, 0.009, 0.20, 0.15, 0.008])  # top3: 1, 4, 7
    for mode, chosen in (("topk", {1, 4, 7}), ("threshold", {1, 4, 7}), ("single", {1})):
        @jax.jit
        def loss(p, mode=mode):
            y, s = mixed_op.apply(OPS, 1, p, stats, x, mixed_op.select(w, mode, 3, 0.01), mode, True)
            return jnp.sum(jnp.sin(y)), s
        grads, new_stats = jax.grad(loss, has_aux=True)(params)
        for i, name in enumerate(OPS):
            changed = any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats[name]),
                                                                jax.tree.leaves(stats[name])))
            g_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads[name]))
            has_state = bool(jax.tree.leaves(stats[name]))
            has_params = bool(jax.tree.leaves(params[name]))
            if i in chosen:
                assert changed or not has_state, (mode, name)
                assert g_norm > 0 or not has_params, (mode, name)
            else:
                assert not changed, (mode, name)
                assert g_norm == 0.0, (mode, name)


@pytest.mark.parametrize("stride", [1, 2])
def test_switched_equals_plain_switch(path, stride):
    """``mixed_op.switched`` (packed statistics, backward recomputing the chosen op in a second switch) gives the
    values, statistics and gradients (weights, input, a coefficient) of a plain differentiated ``lax.switch``."""
    x = path[2]
    params, stats = init_path_np(C, stride=stride)
    r = jnp.asarray(np.random.default_rng(5).standard_normal((N, HW // stride, HW // stride, C)), jnp.float32)
    plain_branches = [mixed_op._branch(name, stride, True) for name in OPS]

    def loss(fn, p, a, c, idx):
        y, s = fn(idx, p, stats, a)
        return jnp.sum(jnp.sin(c * y) * r), s

    def plain(idx, p, s, a):
        return jax.lax.switch(idx, plain_branches, p, s, a)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    for idx in range(NUM):
        (gp, ga, gc), s = grad(mixed_op.switched(OPS, stride, True), params, x, 1.5, idx)
        (gp0, ga0, gc0), s0 = grad(plain, params, x, 1.5, idx)
        chex.assert_trees_all_close((gp, ga, gc), (gp0, ga0, gc0), atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(s, s0, atol=1e-6)
        assert float(jnp.sum(jnp.abs(ga))) > 0 or OPS[idx] == "none", OPS[idx]


# ---------------------------------------------------------------------------------------------- skipping

def _cost(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost.get("flops", 0.0))  # no entry when nothing is computed (`none`, identity)


@pytest.fixture(scope="module")
def flop_figures():
    """XLA cost-analysis flops of one eval-mode mixed op (10 ops, C=16, 16x16, batch 8) per mode."""
    c = 16
    params, stats = init_path_np(c)
    x = jnp.ones((8, 16, 16, c))
    w = jax.nn.softmax(jnp.arange(NUM, dtype=jnp.float32))

    def mixed(mode, k, thr=0.01):
        return _cost(lambda p, s, a, ww: mixed_op.apply(OPS, 1, p, s, a, mixed_op.select(ww, mode, k, thr),
                                                        mode, False)[0], params, stats, x, w)
    figs = {"dense": mixed("dense", 1), "topk1": mixed("topk", 1), "topk2": mixed("topk", 2),
            "topk3": mixed("topk", 3), "single": mixed("single", 1), "argmax": mixed("argmax", 1),
            "threshold3": mixed("threshold", 3)}
    for name in OPS:
        figs[name] = _cost(lambda p, s, a, name=name: OP_REGISTRY[name].apply(p[name], s[name], a, 1, False)[0],
                           params, stats, x)
    return figs


@pytest.mark.slow
def test_compiled_flops_fall_with_k(flop_figures):
    f = flop_figures
    print({k: f"{v / 1e6:.2f}M" for k, v in f.items()})  # figures for the docs (pytest -s)
    assert f["topk1"] < f["topk2"] < f["dense"]
    assert f["topk1"] < f["topk3"]
    assert f["single"] < 0.5 * f["dense"] and f["argmax"] < 0.5 * f["dense"]
    # dense costs the sum of every op; a switch is costed (on CPU, jax 0.10) as its largest branch, so
    # topk's figure is about k x the largest op: never more than dense's k-fold, never less than k=1's
    total = sum(f[name] for name in OPS)
    assert f["dense"] == pytest.approx(total, rel=0.05)
    biggest = max(f[name] for name in OPS)
    assert f["topk1"] <= 1.05 * biggest
    assert f["threshold3"] <= 1.05 * f["dense"]


@pytest.mark.parametrize("mode,k,n_cond", [("dense", 3, 0), ("single", 1, 1), ("argmax", 1, 1), ("topk", 3, 3),
                                           ("threshold", 3, NUM)])
def test_compiled_program_keeps_conditionals(path, mode, k, n_cond):
    """XLA did not flatten the switches into selects: one `conditional` per switch (per op for threshold)."""
    params, stats, x = path
    w = _weights()
    hlo = jax.jit(lambda p, s, a, ww: mixed_op.apply(OPS, 1, p, s, a, mixed_op.select(ww, mode, k, 0.01), mode, True)
                  ).lower(params, stats, x, w).compile().as_text()
    assert len(re.findall(r"\bconditional\(", hlo)) == n_cond


@pytest.fixture
def counted_ops(monkeypatch):
    """Wrap every op's apply with a host callback that counts its runs."""
    counts: collections.Counter = collections.Counter()
    for name in OPS:
        op = OP_REGISTRY[name]

        def apply(p, s, x, stride, train, op=op, name=name):
            jax.debug.callback(lambda: counts.update([name]))
            return op.apply(p, s, x, stride, train)
        monkeypatch.setitem(OP_REGISTRY, name, dataclasses.replace(op, apply=apply))
    return counts


@pytest.mark.parametrize("mode,k,expect", [("dense", 3, set(range(NUM))), ("single", 1, {1}), ("argmax", 1, {1}),
                                           ("topk", 3, {1, 4, 7}), ("threshold", 3, {1, 4, 7}),
                                           ("threshold", NUM, {1, 3, 4, 5, 7, 8})])
def test_only_chosen_ops_run(path, counted_ops, mode, k, expect):
    params, stats, x = path
    w = jnp.array([0.005, 0.30, 0.008, 0.05, 0.25, 0.02, 0.009, 0.20, 0.15, 0.008])
    fn = jax.jit(lambda p, s, a, ww: mixed_op.apply(OPS, 1, p, s, a, mixed_op.select(ww, mode, k, 0.01), mode, True))
    jax.block_until_ready(fn(params, stats, x, w))
    jax.effects_barrier()
    assert {OPS.index(n) for n in counted_ops} == expect
    assert all(v == 1 for v in counted_ops.values())
