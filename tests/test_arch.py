"""Tests for asose_jax.arch: batched Gumbel-softmax (soft / hard straight-through), entropy stability and
genotype derivation (the genotype file: tests/test_genotype.py; the tau schedule: tests/test_train_state.py)."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import arch
from asose_jax.ops import PRIMITIVES

ROWS, OPS = 5, len(PRIMITIVES)


@pytest.fixture(scope="module")
def alpha():
    return arch.init_alpha(jax.random.PRNGKey(0), ROWS, OPS, 0.1)


def test_init_alpha_shape_scale():
    a = arch.init_alpha(jax.random.PRNGKey(1), 64, OPS, 0.1)
    chex.assert_shape(a, (64, OPS))
    chex.assert_type(a, jnp.float32)
    assert 0.08 < float(jnp.std(a)) < 0.12
    assert not np.any(np.asarray(arch.init_alpha(jax.random.PRNGKey(1), 2, OPS, 0.0)))


def test_gumbel_soft_rows_sum_to_one(alpha):
    w = arch.gumbel_softmax(jax.random.PRNGKey(2), alpha, jnp.float32(1.0), hard=False)
    chex.assert_shape(w, (ROWS, OPS))
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)
    assert np.all(np.asarray(w) > 0) and np.all(np.asarray(w) < 1)
    # rows use independent noise
    same = arch.gumbel_softmax(jax.random.PRNGKey(2), jnp.zeros((2, OPS)), jnp.float32(1.0), hard=False)
    assert not np.allclose(np.asarray(same[0]), np.asarray(same[1]))


def test_gumbel_hard_one_hot_forward(alpha):
    for seed in range(3):
        w = arch.gumbel_softmax(jax.random.PRNGKey(seed), alpha, jnp.float32(5.0), hard=True)
        chex.assert_shape(w, (ROWS, OPS))
        wn = np.asarray(w)
        np.testing.assert_allclose(wn.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.sort(wn, -1)[:, -1], 1.0, atol=1e-6)
        np.testing.assert_allclose(np.sort(wn, -1)[:, :-1], 0.0, atol=1e-6)
        # the hot index is the argmax of the matching soft sample
        soft = arch.gumbel_softmax(jax.random.PRNGKey(seed), alpha, jnp.float32(5.0), hard=False)
        np.testing.assert_array_equal(wn.argmax(-1), np.asarray(soft).argmax(-1))


def test_gumbel_hard_straight_through_gradient(alpha):
    target = jnp.arange(OPS, dtype=jnp.float32)

    def loss(a, hard):
        w = arch.gumbel_softmax(jax.random.PRNGKey(4), a, jnp.float32(1.0), hard=hard)
        return jnp.sum(w * target)
    g_hard = jax.grad(loss)(alpha, True)
    g_soft = jax.grad(loss)(alpha, False)
    chex.assert_tree_all_finite(g_hard)
    assert float(jnp.max(jnp.abs(g_hard))) > 1e-3
    chex.assert_trees_all_close(g_hard, g_soft, atol=1e-6)  # straight-through = the soft gradient


def test_gumbel_sampling_follows_alpha():
    a = jnp.zeros((1, 4)).at[0, 2].set(3.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    idx = jax.vmap(lambda k: jnp.argmax(arch.gumbel_softmax(k, a, jnp.float32(1.0), True)[0]))(keys)
    freq = np.bincount(np.asarray(idx), minlength=4) / 2000
    expect = np.asarray(jax.nn.softmax(a[0]))  # argmax of Gumbel-perturbed logits ~ softmax(a)
    np.testing.assert_allclose(freq, expect, atol=0.04)


def test_arch_weights_modes(alpha):
    tau = jnp.float32(2.0)
    chex.assert_trees_all_close(arch.arch_weights(None, alpha, tau, "softmax"), jax.nn.softmax(alpha / tau, -1))
    hard = arch.arch_weights(jax.random.PRNGKey(0), alpha, tau, "hard")
    np.testing.assert_allclose(np.asarray(hard).max(-1), 1.0, atol=1e-6)


def test_entropy_limits_and_stability():
    n = OPS
    uniform = jnp.zeros((1, n))
    np.testing.assert_allclose(np.asarray(arch.entropy(uniform)), [math.log(n)], rtol=1e-6)
    for big in (1e4, -1e4):
        a = jnp.zeros((3, n)).at[:, 0].set(big)
        e = arch.entropy(a)
        chex.assert_tree_all_finite(e)
        if big > 0:  # one logit far above the others: a peaked row, entropy ~ 0
            np.testing.assert_allclose(np.asarray(e), 0.0, atol=1e-6)
        else:  # one far below: uniform over the remaining n - 1
            np.testing.assert_allclose(np.asarray(e), math.log(n - 1), rtol=1e-5)
    mixed = jnp.array([[1e4, -1e4] + [0.0] * (n - 2), [0.0] * n])
    e = arch.entropy(mixed)
    chex.assert_tree_all_finite(e)
    np.testing.assert_allclose(np.asarray(e), [0.0, math.log(n)], atol=1e-5)
    g = jax.grad(lambda a: jnp.sum(arch.entropy(a)))(mixed)
    chex.assert_tree_all_finite(g)
    # jitted, and against the direct formula on a moderate row
    a = jnp.array([[0.3, -1.2, 2.0, 0.0]])
    p = np.asarray(jax.nn.softmax(a[0]))
    np.testing.assert_allclose(np.asarray(jax.jit(arch.entropy)(a)), [-(p * np.log(p)).sum()], rtol=1e-5)


def test_derive_genotype_excludes_none():
    ops = PRIMITIVES
    a = jnp.zeros((3, len(ops)))
    a = a.at[0, ops.index("none")].set(5.0).at[0, ops.index("sep_conv_3x3")].set(1.0)
    a = a.at[1, ops.index("dil_conv_5x5")].set(2.0)
    a = a.at[2, ops.index("none")].set(9.0).at[2, ops.index("max_pool_3x3")].set(0.5)
    assert arch.derive_genotype(a, ops) == ["sep_conv_3x3", "dil_conv_5x5", "max_pool_3x3"]
    assert arch.derive_genotype(a, ops, exclude_none=False) == ["none", "dil_conv_5x5", "none"]
    assert arch.derive_genotype(jnp.zeros((1, 1)), ("none",)) == ["none"]  # nothing else to pick


def test_parameter_free_cap_switches_the_weakest_rows():
    ops = ("none", "skip_connect", "max_pool_3x3", "sep_conv_3x3", "dil_conv_3x3")
    a = jnp.array([[0.0, 5.0, 0.0, 4.9, 0.0],    # skip leads sep3 by 0.1 -> first to switch
                   [0.0, 0.0, 6.0, 1.0, 2.0],    # max pool leads dil3 by 4.0 -> kept
                   [0.0, 0.0, 0.0, 3.0, 0.0]])   # already parametric
    assert arch.derive_genotype(a, ops) == ["skip_connect", "max_pool_3x3", "sep_conv_3x3"]
    assert arch.derive_genotype(a, ops, max_parameter_free=1) == ["sep_conv_3x3", "max_pool_3x3", "sep_conv_3x3"]
    assert arch.derive_genotype(a, ops, max_parameter_free=0) == ["sep_conv_3x3", "dil_conv_3x3", "sep_conv_3x3"]
    assert arch.derive_genotype(a, ops, max_parameter_free=-1) == arch.derive_genotype(a, ops)
