"""Tests for asose_jax.ops: every primitive (and conv_3x3) at stride 1 and 2 in fp32 and bf16, the
FactorizedReduce with odd C, the two depthwise formulations, and BatchNorm semantics. Small inputs, CPU."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import ops
from asose_jax.ops import OP_REGISTRY, PRIMITIVES

ALL_OPS = tuple(OP_REGISTRY)
_DEFAULT_IMPL = ops.DEPTHWISE_IMPL["impl"]
N, H, C = 2, 8, 6


def _x(c=C, h=H, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (N, h, h, c), jnp.float32).astype(dtype)


@pytest.fixture
def depthwise_impl():
    """Set ``ops.DEPTHWISE_IMPL['impl']`` inside a test; always restored."""
    saved = ops.DEPTHWISE_IMPL["impl"]

    def set_impl(name):
        ops.DEPTHWISE_IMPL["impl"] = name
    yield set_impl
    ops.DEPTHWISE_IMPL["impl"] = saved


def test_registry_order_and_names():
    assert PRIMITIVES == ("none", "avg_pool_3x3", "max_pool_3x3", "skip_connect", "sep_conv_3x3",
                          "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7")
    assert ALL_OPS[:len(PRIMITIVES)] == PRIMITIVES and "conv_3x3" in ALL_OPS and "conv_3x3" not in PRIMITIVES
    assert all(OP_REGISTRY[name].name == name for name in ALL_OPS)
    assert [n for n in ALL_OPS if OP_REGISTRY[n].parameter_free] == ["none", "avg_pool_3x3", "max_pool_3x3",
                                                                     "skip_connect"]
    with pytest.raises(ValueError, match="already registered"):
        ops.register_op(OP_REGISTRY["none"])


@pytest.mark.parametrize("name", ALL_OPS)
def test_every_parameter_has_a_channel_role(name):
    """What growth's widen reads: each weight an op creates, at either stride, has a role fitting its shape."""
    op = OP_REGISTRY[name]
    for stride in (1, 2):
        params, _ = jax.eval_shape(lambda op=op, stride=stride: op.init(np.random.default_rng(0), C, stride))
        for pname, w in params.items():
            role = op.channel_roles.get(pname)
            expect = {ops.DEPTHWISE: (1, C), ops.FULL: (C, C), ops.REDUCE_LOW: (C, C // 2),
                      ops.REDUCE_HIGH: (C, C - C // 2)}.get(role)
            assert expect is not None and w.shape[2:] == expect, (name, stride, pname, role, w.shape)
        if op.parameter_free and stride == 1:
            assert not params, name


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_shape_dtype_grad(name, stride):
    op = OP_REGISTRY[name]
    params, stats = op.init(np.random.default_rng(1), C, stride)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32  # fp32 master weights
    expect = (N, H // stride, H // stride, C)

    @jax.jit
    def forward(p, x32):  # fp32 and bf16 input, train and eval mode, in one compile
        outs = []
        for x in (x32, x32.astype(jnp.bfloat16)):
            y_train, new_stats = op.apply(p, stats, x, stride, True)
            y_eval, _ = op.apply(p, stats, x, stride, False)
            outs.append((y_train, y_eval, new_stats))
        return outs

    @jax.jit
    def grads(p, x):
        def loss(p_, x_):
            y, _ = op.apply(p_, stats, x_, stride, True)
            return jnp.sum(jnp.sin(y.astype(jnp.float32)))
        return jax.grad(loss, argnums=(0, 1))(p, x)

    x = _x()
    for dtype, (y_train, y_eval, new_stats) in zip((jnp.float32, jnp.bfloat16), forward(params, x)):
        for y in (y_train, y_eval):
            chex.assert_shape(y, expect)
            chex.assert_type(y, dtype)
            chex.assert_tree_all_finite(y)
        chex.assert_trees_all_equal_structs(new_stats, stats)
        chex.assert_type(jax.tree.leaves(new_stats), jnp.float32)  # BN statistics stay fp32
    gp, gx = grads(params, x)
    chex.assert_trees_all_equal_shapes(gp, params)
    chex.assert_tree_all_finite((gp, gx))
    if name != "none":  # every other op passes signal back to its input
        assert float(jnp.max(jnp.abs(gx))) > 0
    for g in jax.tree.leaves(gp):  # every weight is used
        assert float(jnp.max(jnp.abs(g))) > 0


def test_param_counts_at_c8():
    """Weights per op (bias-free convs, non-affine BN) at C=8, stride 1 / 2."""
    c = 8
    expect = {"none": (0, 0), "avg_pool_3x3": (0, 0), "max_pool_3x3": (0, 0), "skip_connect": (0, 2 * 8 * 4),
              "sep_conv_3x3": (2 * (9 * c + c * c),) * 2, "sep_conv_5x5": (2 * (25 * c + c * c),) * 2,
              "sep_conv_7x7": (2 * (49 * c + c * c),) * 2, "dil_conv_3x3": (9 * c + c * c,) * 2,
              "dil_conv_5x5": (25 * c + c * c,) * 2, "conv_7x1_1x7": (2 * 7 * c * c,) * 2,
              "conv_3x3": (9 * c * c,) * 2}
    for name, (n1, n2) in expect.items():
        for stride, n in ((1, n1), (2, n2)):
            params, _ = jax.eval_shape(lambda: OP_REGISTRY[name].init(np.random.default_rng(0), c, stride))
            assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == n, (name, stride)


def test_none_is_zero_and_subsamples():
    x = _x()
    y, _ = OP_REGISTRY["none"].apply({}, {}, x, 2, True)
    chex.assert_shape(y, (N, H // 2, H // 2, C))
    assert not np.any(np.asarray(y))


def test_skip_identity_at_stride_1():
    x = _x()
    y, _ = OP_REGISTRY["skip_connect"].apply({}, {}, x, 1, True)
    chex.assert_trees_all_equal(y, x)


@pytest.mark.parametrize("c", [5, 7])
def test_factorized_reduce_odd_channels(c):
    params, stats = OP_REGISTRY["skip_connect"].init(np.random.default_rng(0), c, 2)
    chex.assert_shape(params["conv1"], (1, 1, c, c // 2))
    chex.assert_shape(params["conv2"], (1, 1, c, c - c // 2))
    x = _x(c=c)
    y, new = jax.jit(lambda p, s_, a: OP_REGISTRY["skip_connect"].apply(p, s_, a, 2, True))(params, stats, x)
    chex.assert_shape(y, (N, H // 2, H // 2, c))
    chex.assert_shape(new["bn"]["mean"], (c,))
    # manual: ReLU, 1x1 stride-2 convs on x and on x shifted by one pixel, concat, BN (batch stats)
    r = np.maximum(np.asarray(x), 0)
    a = np.einsum("nhwc,cd->nhwd", r[:, ::2, ::2], np.asarray(params["conv1"][0, 0]))
    b = np.einsum("nhwc,cd->nhwd", r[:, 1::2, 1::2], np.asarray(params["conv2"][0, 0]))
    z = np.concatenate([a, b], -1)
    ref = (z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + ops.BN_EPS)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4, rtol=1e-4)


def test_avg_pool_count_include_pad_false():
    x = jnp.ones((1, 4, 4, 1))
    y = ops.avg_pool_3x3(x, 1)
    np.testing.assert_allclose(np.asarray(y), 1.0, rtol=1e-6)  # corners average 4 values, not 9
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = ops.avg_pool_3x3(x, 1)
    assert float(y[0, 0, 0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_depthwise_lax_vs_shift(depthwise_impl, k, dilation, stride):
    x = _x(c=4, h=9 + stride)  # odd and even sizes
    w = jax.random.normal(jax.random.PRNGKey(2), (k, k, 1, 4), jnp.float32)
    outs = {}
    for impl in ("lax", "shift"):
        depthwise_impl(impl)
        outs[impl] = jax.jit(ops.depthwise_conv, static_argnums=(2, 3))(x, w, stride, dilation)
    chex.assert_equal_shape([outs["lax"], outs["shift"]])
    np.testing.assert_allclose(np.asarray(outs["shift"]), np.asarray(outs["lax"]), atol=1e-4, rtol=1e-4)
    # and against a direct numpy reference at one output pixel
    pad = dilation * (k // 2)
    xp = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    i, j = 1, 2
    window = xp[:, i * stride: i * stride + dilation * (k - 1) + 1: dilation,
                j * stride: j * stride + dilation * (k - 1) + 1: dilation, :]
    ref = np.einsum("nabc,abc->nc", window, np.asarray(w[:, :, 0, :]))
    np.testing.assert_allclose(np.asarray(outs["lax"][:, i, j]), ref, atol=1e-4, rtol=1e-4)


def test_depthwise_impl_fixture_restores():
    """Runs after the parametrised cases above: the fixture put the module default back."""
    assert ops.DEPTHWISE_IMPL["impl"] == _DEFAULT_IMPL


def test_batch_norm_train_vs_eval():
    x = 3.0 + 2.0 * _x(c=3)
    stats = {"mean": jnp.array([0.5, -1.0, 0.0]), "var": jnp.array([1.0, 2.0, 4.0])}
    y, new = ops.batch_norm(x, stats, train=True)
    xn = np.asarray(x, np.float64)
    mean = xn.mean((0, 1, 2))
    var_biased = xn.var((0, 1, 2))
    n = xn.shape[0] * xn.shape[1] * xn.shape[2]
    var_unbiased = var_biased * n / (n - 1)
    # train: normalise with the batch's biased variance
    np.testing.assert_allclose(np.asarray(y), (xn - mean) / np.sqrt(var_biased + ops.BN_EPS), atol=1e-4)
    # running stats: momentum 0.1 (PyTorch convention), unbiased variance
    assert ops.BN_MOMENTUM == 0.1
    np.testing.assert_allclose(np.asarray(new["mean"]), 0.9 * np.asarray(stats["mean"]) + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["var"]), 0.9 * np.asarray(stats["var"]) + 0.1 * var_unbiased,
                               rtol=1e-5)
    # eval: running statistics, unchanged
    y_eval, same = ops.batch_norm(x, stats, train=False)
    chex.assert_trees_all_equal(same, stats)
    ref = (xn - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + ops.BN_EPS)
    np.testing.assert_allclose(np.asarray(y_eval), ref, atol=1e-4)
    # affine variant and bf16 input: stats stay fp32, output in the input dtype
    y_aff, new_bf = ops.batch_norm(x.astype(jnp.bfloat16), stats, True, jnp.full((3,), 2.0), jnp.full((3,), 1.0))
    chex.assert_type(y_aff, jnp.bfloat16)
    chex.assert_type(new_bf["mean"], jnp.float32)
    np.testing.assert_allclose(np.asarray(y_aff, np.float32), 2 * np.asarray(y) + 1, atol=0.1)


def _plain_batch_norm(x, scale, bias):
    """The train-mode BatchNorm formula, left to autodiff (the reference for the custom backward pass)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    return (((x32 - mean) * jax.lax.rsqrt(var + ops.BN_EPS)) * scale + bias).astype(x.dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_gradient_matches_autodiff_of_the_formula(dtype, affine):
    x = (3.0 + 2.0 * _x(c=3)).astype(dtype)
    scale, bias = jnp.array([1.5, -0.5, 2.0]), jnp.array([0.1, 0.2, -0.3])
    probe = jax.random.normal(jax.random.PRNGKey(5), x.shape)  # a non-trivial cotangent

    def loss(f):
        return lambda x, s, b: jnp.sum(probe * f(x, s, b).astype(jnp.float32))

    def ours_bn(x, s, b):
        return ops.batch_norm(x, ops.bn_stats_init(3), True, *((s, b) if affine else ()))[0]

    def ref_bn(x, s, b):
        return _plain_batch_norm(x, s, b) if affine else _plain_batch_norm(x, jnp.ones(3), jnp.zeros(3))
    ours = jax.grad(loss(ours_bn), (0, 1, 2))(x, scale, bias)
    ref = jax.grad(loss(ref_bn), (0, 1, 2))(x, scale, bias)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(ours, ref):
        chex.assert_type(a, b.dtype)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


def test_relu_gradient_matches_jax_nn_relu():
    x = _x(c=3).at[0, 0, 0].set(0.0)  # includes exact zeros: gradient 0 there, as jax.nn.relu
    g = jax.random.normal(jax.random.PRNGKey(6), x.shape)
    ours = jax.vjp(ops.relu, x)[1](g)[0]
    ref = jax.vjp(jax.nn.relu, x)[1](g)[0]
    np.testing.assert_array_equal(np.asarray(ops.relu(x)), np.asarray(jax.nn.relu(x)))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize("k,dilation", [(3, 1), (7, 1), (5, 2)])
def test_depthwise_shift_gradient_matches_lax(depthwise_impl, k, dilation):
    x = _x(c=4, h=9)
    w = jax.random.normal(jax.random.PRNGKey(2), (k, k, 1, 4), jnp.float32)
    grads = {}
    for impl in ("lax", "shift"):
        depthwise_impl(impl)
        grads[impl] = jax.grad(lambda x, w: jnp.sum(jnp.sin(ops.depthwise_conv(x, w, 1, dilation))), (0, 1))(x, w)
    for a, b in zip(grads["shift"], grads["lax"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def _saved_bytes(f, *args) -> int:
    """Bytes of the residuals that ``jax.vjp`` of ``f`` keeps for the backward pass, unique buffers."""
    _, vjp = jax.vjp(f, *args)
    return sum({id(leaf): leaf.nbytes for leaf in jax.tree.leaves(vjp) if isinstance(leaf, jax.Array)}.values())


def test_sep_conv_keeps_three_maps_per_half_for_backward(depthwise_impl):
    """A SepConv half (ReLU, depthwise, pointwise, BN) keeps the ReLU output, the depthwise output and the BN
    input, as PyTorch does: no k*k shifted copies (shift formulation), no ReLU mask or zero fill, no second
    BatchNorm map."""
    depthwise_impl("shift")
    x = _x(c=8, h=8)
    p, s = OP_REGISTRY["sep_conv_7x7"].init(np.random.default_rng(0), 8, 1)
    saved = _saved_bytes(lambda p, x: OP_REGISTRY["sep_conv_7x7"].apply(p, s, x, 1, True)[0], p, x)
    one_map, weights = x.nbytes, sum(v.nbytes for v in p.values())
    assert saved <= 6 * one_map + weights + 1024  # 3 maps per half; small per-channel vectors


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_keeps_only_its_input_for_backward(affine):
    x, c = _x(c=8, h=8), 8
    args = (jnp.full((c,), 1.5), jnp.full((c,), 0.1)) if affine else ()
    saved = _saved_bytes(lambda x, *sb: ops.batch_norm(x, ops.bn_stats_init(c), True, *sb)[0], x, *args)
    assert saved <= x.nbytes + 4 * c * 4  # x, and per-channel mean, rstd, scale


@pytest.mark.torch
def test_batch_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.array(1.5 + _x(c=4), np.float32)
    bn = torch.nn.BatchNorm2d(4, affine=False, momentum=0.1, eps=1e-5)
    bn.train()
    ref = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    y, new = ops.batch_norm(jnp.asarray(x), ops.bn_stats_init(4), True)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["mean"]), bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["var"]), bn.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_fp32_convolutions_and_head_ask_for_exact_float32():
    """XLA's GPU default rounds float32 convs and dots to TF32: ``fp32`` must request HIGHEST; bf16 must not."""
    from asose_jax.model import apply_head
    w = jnp.zeros((3, 3, 4, 4), jnp.float32)
    for dtype, want in ((jnp.float32, True), (jnp.bfloat16, False)):
        x = jnp.zeros((1, 8, 8, 4), dtype)
        hlo = jax.jit(lambda a, b: ops.conv2d(a, b, padding=((1, 1), (1, 1)))).lower(x, w).as_text()
        assert ("HIGHEST" in hlo) == want, dtype
    head = {"w": jnp.zeros((4, 10)), "b": jnp.zeros((10,))}
    assert "HIGHEST" in jax.jit(apply_head).lower(head, jnp.zeros((2, 3, 3, 4), jnp.bfloat16)).as_text()
