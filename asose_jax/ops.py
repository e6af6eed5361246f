"""The primitive registry: pure ``init``/``apply`` pairs over NHWC activations, each added to
``OP_REGISTRY`` by :func:`register_op` next to its definition.

Every op maps ``[N, H, W, C] -> [N, H/s, W/s, C]`` (stride ``s`` in {1, 2}), keeps the channel count,
uses bias-free convolutions and non-affine BatchNorm, exactly as the original's PRIMITIVES (same
order). ``conv_3x3`` is our deliberate addition (ReLU, full 3x3 conv, BN); it is not in ``PRIMITIVES``.

Parameters are plain dicts of arrays (``params``) with a parallel dict of BatchNorm running statistics
(``stats``). Weights are stored in float32; ``apply`` computes in ``x.dtype`` (bf16 or fp32). Init
follows PyTorch's defaults (kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))) so the
PyTorch baseline and this port start from the same distribution. ``init`` draws on the host from a numpy
``Generator``, as PyTorch does: creating parameters compiles no program (one XLA threefry loop per weight
took 9 s to compile for the default supernet on a CPU, docs/benchmarks.md "Compile time"), and a seed gives
the same weights on every backend.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from asose_jax.config import PRIMITIVES  # noqa: F401 (the default op set, named here beside the ops)

Params = dict[str, Any]
Stats = dict[str, Any]

BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
BN_EPS = 1e-5

# Depthwise formulation: "lax" (grouped conv), "shift" (k*k shifted multiply-adds that XLA fuses) or "auto": on a GPU,
# shift where it measured faster on the H100 (docs/benchmarks.md "Per-primitive"): dilation > 1, 3x3 up to
# SHIFT_3X3_MAX_CHANNELS (the widest width measured), 7x7 in fp32, XLA's grouped conv elsewhere; on a CPU the grouped
# conv everywhere (the default preset's routed step compiles about 1.6x faster and steps no slower: "Compile time").
DEPTHWISE_IMPL = {"impl": "auto"}
SHIFT_3X3_MAX_CHANNELS = 128


# ---------------------------------------------------------------------------------------------- building blocks

def host_rng(seed: int | np.random.Generator | jax.Array) -> np.random.Generator:
    """The numpy ``Generator`` that parameter init draws from: ``seed`` an int, a concrete JAX PRNG key (seeded
    with its key data) or a ``Generator`` (returned as it is)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        seed = jax.random.key_data(seed)
    return np.random.default_rng(np.asarray(seed).ravel().tolist())


def conv_init(rng: np.random.Generator, kh: int, kw: int, cin: int, cout: int) -> np.ndarray:
    """HWIO float32 weight ``[kh, kw, cin, cout]`` drawn from ``rng``, PyTorch default init (fan_in = kh*kw*cin)."""
    bound = 1.0 / np.sqrt(kh * kw * cin)
    return rng.uniform(-bound, bound, (kh, kw, cin, cout)).astype(np.float32)


def exact_precision(dtype) -> lax.Precision | None:
    """``HIGHEST`` for float32 operands: XLA's default on Ampere and later GPUs rounds float32 convolutions
    and dots to TF32 (10-bit mantissa), under which the ``original`` network diverged on an H100
    (docs/history.md, "The `original` preset"). ``fp32`` here means float32 arithmetic; bf16 keeps the default."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def conv2d(x: jax.Array, w: jax.Array, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups: int = 1):
    """NHWC x HWIO convolution in ``x.dtype`` (exact float32 for float32 ``x``)."""
    return lax.conv_general_dilated(
        x, w.astype(x.dtype), window_strides=stride, padding=padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=exact_precision(x.dtype))


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``, whose backward pass keeps only its output. ``jax.nn.relu`` keeps a boolean mask and a
    zero-filled array as large as ``x``, which a program boundary (the host-dispatched engine's block programs,
    a conditional's branch) materialises; the output is kept anyway, as the next convolution's input."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def _use_shift(k: int, dilation: int, dtype, channels: int) -> bool:
    impl = DEPTHWISE_IMPL["impl"]
    if impl != "auto":
        return impl == "shift"
    if jax.default_backend() == "cpu":
        return False
    return (dilation > 1 or (k == 3 and channels <= SHIFT_3X3_MAX_CHANNELS)
            or (k >= 7 and dtype == jnp.float32))


def depthwise_conv(x: jax.Array, w: jax.Array, stride: int, dilation: int = 1) -> jax.Array:
    """Depthwise k x k conv, 'same'-style padding ``dilation*(k//2)``. ``w``: ``[k, k, 1, C]``."""
    k = w.shape[0]
    pad = dilation * (k // 2)
    if not _use_shift(k, dilation, x.dtype, x.shape[-1]):
        return conv2d(x, w, (stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation), groups=x.shape[-1])
    return _shifted_depthwise(x, w, stride, dilation)


@functools.partial(jax.checkpoint, prevent_cse=False, static_argnums=(2, 3))
def _shifted_depthwise(x: jax.Array, w: jax.Array, stride: int, dilation: int) -> jax.Array:
    """The k*k shifted multiply-adds of :func:`depthwise_conv`. Checkpointed: its backward pass keeps only ``x``
    and ``w`` and recomputes the shifted slices, instead of saving all k*k of them (each as large as ``x``): a
    program boundary (the host-dispatched engine's block programs, a conditional's branch) otherwise
    materialises them, 49 copies of the input for a 7x7 kernel."""
    k = w.shape[0]
    pad = dilation * (k // 2)
    n, h, wd, c = x.shape
    ho = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    wo = (wd + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    wk = w[:, :, 0, :].astype(x.dtype)
    out = None
    for i in range(k):
        for j in range(k):
            start = (0, i * dilation, j * dilation, 0)
            limit = (n, i * dilation + (ho - 1) * stride + 1, j * dilation + (wo - 1) * stride + 1, c)
            term = lax.slice(xp, start, limit, (1, stride, stride, 1)) * wk[i, j]
            out = term if out is None else out + term
    return out


def bn_stats_init(c: int) -> Stats:
    """Initial BN running statistics ``[C]`` (host arrays, like every init)."""
    return {"mean": np.zeros((c,), np.float32), "var": np.ones((c,), np.float32)}


def batch_norm(x: jax.Array, stats: Stats, train: bool, scale=None, bias=None) -> tuple[jax.Array, Stats]:
    """BatchNorm over N, H, W with PyTorch semantics (biased variance to normalise, unbiased for the
    running estimate), affine when ``scale`` and ``bias`` (``[C]``) are given. Statistics in float32; output
    in ``x.dtype``."""
    if train:
        mean, var = _batch_moments(lax.stop_gradient(x))
        n = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased = var * (n / max(n - 1, 1))
        m = BN_MOMENTUM
        new_stats = {"mean": (1 - m) * stats["mean"] + m * mean, "var": (1 - m) * stats["var"] + m * unbiased}
        if scale is None:
            scale, bias = jnp.ones(x.shape[-1], jnp.float32), jnp.zeros(x.shape[-1], jnp.float32)
        return _normalize_batch(x, scale, bias).astype(x.dtype), new_stats
    y = (x.astype(jnp.float32) - stats["mean"]) * lax.rsqrt(stats["var"] + BN_EPS)
    if scale is not None:
        y = y * scale + bias
    return y.astype(x.dtype), stats


def _batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 mean and biased variance per channel over N, H, W of NHWC ``x``."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    return mean, jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))


@jax.custom_vjp
def _normalize_batch(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` with the batch's own statistics, in float32. Its
    backward pass keeps ``x``, ``scale`` and two per-channel vectors, as PyTorch's does (autodiff of the
    formula keeps three float32 arrays as large as ``x``)."""
    return _normalize_batch_fwd(x, scale, bias)[0]


def _normalize_batch_fwd(x, scale, bias):
    mean, var = _batch_moments(x)
    rstd = lax.rsqrt(var + BN_EPS)
    return (x.astype(jnp.float32) - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _normalize_batch_bwd(res, g):
    """With ``x_hat = (x - mean) * rstd`` and ``g_hat = g * scale``: ``dx = rstd * (g_hat - mean(g_hat) -
    x_hat * mean(g_hat * x_hat))``, ``dscale = sum(g * x_hat)``, ``dbias = sum(g)``; means and sums over N, H, W."""
    x, mean, rstd, scale = res
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    g_scale, g_bias = jnp.sum(g * x_hat, axis=(0, 1, 2)), jnp.sum(g, axis=(0, 1, 2))
    n = x.size // x.shape[-1]
    g_x = (rstd * scale) * (g - g_bias / n - x_hat * (g_scale / n))
    return g_x.astype(x.dtype), g_scale, g_bias


_normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def avg_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """3x3 average pool, pad 1, count_include_pad=False."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    dims, strides = (1, 3, 3, 1), (1, stride, stride, 1)
    total = lax.reduce_window(x.astype(jnp.float32), 0.0, lax.add, dims, strides, pads)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), jnp.float32)
    count = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pads)
    return (total / count).astype(x.dtype)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


# ---------------------------------------------------------------------------------------------- the registry

# How a parameter's channels follow the stage width when growth widens it (growth.widen); one role per parameter
# of an op. C is the width of the activation the op reads and writes.
DEPTHWISE = "depthwise"  # [k, k, 1, C]: one filter per channel
FULL = "full"  # [kh, kw, C, C]: every input channel to every output channel
REDUCE_LOW = "reduce_low"  # FactorizedReduce conv1 [1, 1, C, C//2]: writes output channels [0, C//2)
REDUCE_HIGH = "reduce_high"  # FactorizedReduce conv2 [1, 1, C, C - C//2]: writes output channels [C//2, C)


@dataclass(frozen=True)
class OpDef:
    """One primitive. ``init(rng, C, stride) -> (params, stats)``, host arrays drawn from the numpy ``Generator``
    ``rng`` (:func:`conv_init`); ``apply(params, stats, x, stride, train) ->
    (y, stats)``. ``parameter_free``: counted as a parameter-free choice by the genotype's cap
    (``arch.derive_genotype``). ``channel_roles``: the widening role of each parameter ``init`` may create."""
    name: str
    init: Callable[[np.random.Generator, int, int], tuple[Params, Stats]]
    apply: Callable[..., tuple[jax.Array, Stats]]
    parameter_free: bool = False
    channel_roles: Mapping[str, str] = field(default_factory=dict)


OP_REGISTRY: dict[str, OpDef] = {}


def register_op(op: OpDef) -> OpDef:
    """Add ``op`` to :data:`OP_REGISTRY` under its name (a name may be registered once)."""
    if op.name in OP_REGISTRY:
        raise ValueError(f"op {op.name!r} is already registered")
    OP_REGISTRY[op.name] = op
    return op


def _none_init(rng, c, stride):
    return {}, {}


def _none_apply(p, s, x, stride, train):
    return jnp.zeros_like(x[:, ::stride, ::stride, :]), s


register_op(OpDef("none", _none_init, _none_apply, parameter_free=True))


def _pool_init(rng, c, stride):
    return {}, {"bn": bn_stats_init(c)}


def _pool_apply(pool):
    def apply(p, s, x, stride, train):
        y, bn = batch_norm(pool(x, stride), s["bn"], train)
        return y, {"bn": bn}
    return apply


register_op(OpDef("avg_pool_3x3", _pool_init, _pool_apply(avg_pool_3x3), parameter_free=True))
register_op(OpDef("max_pool_3x3", _pool_init, _pool_apply(max_pool_3x3), parameter_free=True))


def _skip_init(rng, c, stride):
    if stride == 1:
        return {}, {}
    c1 = c // 2  # odd C: the second conv takes the extra channel
    return {"conv1": conv_init(rng, 1, 1, c, c1), "conv2": conv_init(rng, 1, 1, c, c - c1)}, {"bn": bn_stats_init(c)}


def _skip_apply(p, s, x, stride, train):
    """Identity, or at stride 2 the FactorizedReduce (ReLU, two 1x1 stride-2 convs, one on x shifted)."""
    if stride == 1:
        return x, s
    x = relu(x)
    st = (stride, stride)
    a = conv2d(x, p["conv1"], st)
    b = conv2d(x[:, 1:, 1:, :], p["conv2"], st)
    y, bn = batch_norm(jnp.concatenate([a, b], axis=-1), s["bn"], train)
    return y, {"bn": bn}


register_op(OpDef("skip_connect", _skip_init, _skip_apply, parameter_free=True,
                  channel_roles={"conv1": REDUCE_LOW, "conv2": REDUCE_HIGH}))


def _sep_init(k):
    def init(rng, c, stride):
        params = {"dw1": conv_init(rng, k, k, 1, c), "pw1": conv_init(rng, 1, 1, c, c),
                  "dw2": conv_init(rng, k, k, 1, c), "pw2": conv_init(rng, 1, 1, c, c)}
        return params, {"bn1": bn_stats_init(c), "bn2": bn_stats_init(c)}
    return init


def _sep_apply(p, s, x, stride, train):
    """DARTS SepConv: [ReLU, dw k x k (stride s), pw 1x1, BN], then the same at stride 1."""
    y = conv2d(depthwise_conv(relu(x), p["dw1"], stride), p["pw1"])
    y, bn1 = batch_norm(y, s["bn1"], train)
    y = conv2d(depthwise_conv(relu(y), p["dw2"], 1), p["pw2"])
    y, bn2 = batch_norm(y, s["bn2"], train)
    return y, {"bn1": bn1, "bn2": bn2}


_SEP_ROLES = {"dw1": DEPTHWISE, "pw1": FULL, "dw2": DEPTHWISE, "pw2": FULL}
register_op(OpDef("sep_conv_3x3", _sep_init(3), _sep_apply, channel_roles=_SEP_ROLES))
register_op(OpDef("sep_conv_5x5", _sep_init(5), _sep_apply, channel_roles=_SEP_ROLES))
register_op(OpDef("sep_conv_7x7", _sep_init(7), _sep_apply, channel_roles=_SEP_ROLES))


def _dil_init(k):
    def init(rng, c, stride):
        return {"dw": conv_init(rng, k, k, 1, c), "pw": conv_init(rng, 1, 1, c, c)}, {"bn": bn_stats_init(c)}
    return init


def _dil_apply(p, s, x, stride, train):
    """ReLU, depthwise k x k with dilation 2 (stride s), pointwise 1x1, BN."""
    y = conv2d(depthwise_conv(relu(x), p["dw"], stride, dilation=2), p["pw"])
    y, bn = batch_norm(y, s["bn"], train)
    return y, {"bn": bn}


_DIL_ROLES = {"dw": DEPTHWISE, "pw": FULL}
register_op(OpDef("dil_conv_3x3", _dil_init(3), _dil_apply, channel_roles=_DIL_ROLES))
register_op(OpDef("dil_conv_5x5", _dil_init(5), _dil_apply, channel_roles=_DIL_ROLES))


def _conv71_init(rng, c, stride):
    return {"conv1x7": conv_init(rng, 1, 7, c, c), "conv7x1": conv_init(rng, 7, 1, c, c)}, {"bn": bn_stats_init(c)}


def _conv71_apply(p, s, x, stride, train):
    """ReLU, full 1x7 conv (stride (1, s)), full 7x1 conv (stride (s, 1)), BN."""
    y = conv2d(relu(x), p["conv1x7"], (1, stride), ((0, 0), (3, 3)))
    y = conv2d(y, p["conv7x1"], (stride, 1), ((3, 3), (0, 0)))
    y, bn = batch_norm(y, s["bn"], train)
    return y, {"bn": bn}


register_op(OpDef("conv_7x1_1x7", _conv71_init, _conv71_apply, channel_roles={"conv1x7": FULL, "conv7x1": FULL}))


def _conv3_init(rng, c, stride):
    return {"conv": conv_init(rng, 3, 3, c, c)}, {"bn": bn_stats_init(c)}


def _conv3_apply(p, s, x, stride, train):
    """ReLU, full 3x3 conv (stride s, pad 1), BN. An addition to the original's 10 primitives."""
    y = conv2d(relu(x), p["conv"], (stride, stride), ((1, 1), (1, 1)))
    y, bn = batch_norm(y, s["bn"], train)
    return y, {"bn": bn}


register_op(OpDef("conv_3x3", _conv3_init, _conv3_apply, channel_roles={"conv": FULL}))
