"""The PyTorch baseline of the original ASO-SE network against our JAX ops and network (CPU, fp32)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asose_jax import mixed_op, ops  # noqa: E402
from asose_jax.baseline import torch_asose as tb  # noqa: E402
from asose_jax.model import apply_network, build_spec, count_params, init_network  # noqa: E402
from asose_jax.ops import OP_REGISTRY, PRIMITIVES  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)  # 1: OpenMP barriers stall badly when the 2 cores are shared

RTOL = 1e-4
C_OP, HW_OP, N = 16, 8, 4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def nhwc_to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nchw_to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def randomize_stats(key, tree):
    """Non-trivial BN running statistics: mean ~ 0.2 N(0,1), var ~ U(0.5, 1.5)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        last = path[-1].key
        if last == "mean":
            out.append(0.2 * jax.random.normal(k, leaf.shape))
        elif last == "var":
            out.append(jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5))
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def random_like_init(seed, shapes):
    """numpy-filled pytree with the structure of ``init_network``'s output (fast: no JAX compile): conv/head
    weights U(-1/sqrt(fan_in), +), BN scale U(0.5, 1.5), biases 0.1 N(0,1), running mean 0.2 N(0,1), var U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        last, shape = path[-1].key, leaf.shape
        if last == "scale" or last == "var":
            a = rng.uniform(0.5, 1.5, shape)
        elif last in ("bias", "b"):
            a = 0.1 * rng.standard_normal(shape)
        elif last == "mean":
            a = 0.2 * rng.standard_normal(shape)
        else:
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
            a = rng.uniform(-bound, bound, shape)
        return jnp.asarray(a, jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------------------------------------- 1. size

def test_param_count_matches_original_and_jax():
    torch.manual_seed(0)
    model = tb.TorchASOSE(32, 4)
    assert tb.count_params(model, include_alpha=False) == 937_258
    assert tb.count_params(model) == 937_298
    assert tuple(model.alpha.shape) == (4, 10)
    spec = build_spec("original", 32, 4, PRIMITIVES)
    params, _ = jax.eval_shape(lambda: init_network(0, spec))
    assert count_params(params) == 937_258
    # per-op sizes at C=128 (spec 2b)
    sizes = {n: sum(p.numel() for p in tb.OPS[n](128, 1).parameters()) for n in PRIMITIVES}
    assert sizes["conv_7x1_1x7"] == 229_376 and sizes["sep_conv_7x7"] == 45_312
    assert sizes["sep_conv_5x5"] == 39_168 and sizes["sep_conv_3x3"] == 35_072
    assert sizes["dil_conv_5x5"] == 19_584 and sizes["dil_conv_3x3"] == 17_536
    assert sum(p.numel() for p in tb.OPS["skip_connect"](128, 2).parameters()) == 16_384


def test_double_downsampling_shapes():
    torch.manual_seed(0)
    model = tb.TorchASOSE(32, 4, mode="argmax").eval()
    h = model.stem(torch.randn(2, 3, 32, 32))
    shapes = []
    for blk in model.blocks:
        h = blk.forward_one(h, 4)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(32, 32, 32), (64, 8, 8), (128, 2, 2), (128, 2, 2)]


# ---------------------------------------------------------------------------------------------- 2. every op

DEPTHWISE_OPS = ("sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5")
OP_CASES = [(n, "auto") for n in PRIMITIVES] + [(n, impl) for n in DEPTHWISE_OPS for impl in ("lax", "shift")]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name,impl", OP_CASES)
def test_op_matches_jax(name, impl, stride, train, monkeypatch):
    monkeypatch.setitem(ops.DEPTHWISE_IMPL, "impl", impl)
    seed = PRIMITIVES.index(name) * 10 + stride
    _, k_stats, k_x = jax.random.split(jax.random.PRNGKey(seed), 3)
    op_def = OP_REGISTRY[name]
    p, s = op_def.init(np.random.default_rng(seed), C_OP, stride)
    s = randomize_stats(k_stats, s)
    x = jax.random.normal(k_x, (N, HW_OP, HW_OP, C_OP), jnp.float32)

    t_op = tb.OPS[name](C_OP, stride)
    tb.load_op_from_jax(t_op, p, s, name)
    t_op.train(train)
    with torch.no_grad():
        yt = t_op(nhwc_to_nchw(x))
    yj, sj = op_def.apply(p, s, x, stride, train)

    out_hw = HW_OP // stride
    assert tuple(yj.shape) == (N, out_hw, out_hw, C_OP)
    assert tuple(yt.shape) == (N, C_OP, out_hw, out_hw)
    if name == "none":
        assert not np.any(np.asarray(yj)) and not torch.any(yt)
        return
    assert np.linalg.norm(np.asarray(yj)) > 0
    assert rel_err(nchw_to_nhwc(yt), yj) <= RTOL
    # BN running statistics after the call (unchanged in eval, momentum update in train)
    for bn_name, child in t_op.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            assert rel_err(child.running_mean.numpy(), sj[bn_name]["mean"]) <= RTOL
            assert rel_err(child.running_var.numpy(), sj[bn_name]["var"]) <= RTOL
            if train:
                assert rel_err(sj[bn_name]["var"], s[bn_name]["var"]) > 1e-3  # really updated


# ---------------------------------------------------------------------------------------------- 3. whole net

@pytest.fixture(scope="module")
def loaded_net():
    spec = build_spec("original", 32, 4, PRIMITIVES)
    _, k_alpha, k_x = jax.random.split(jax.random.PRNGKey(42), 3)
    params, stats = random_like_init(42, jax.eval_shape(lambda: init_network(0, spec)))
    alpha = 0.1 * jax.random.normal(k_alpha, (4, 10), jnp.float32)
    x = jax.random.normal(k_x, (N, 32, 32, 3), jnp.float32)
    torch.manual_seed(0)
    model = tb.load_from_jax(tb.TorchASOSE(32, 4), params, stats, alpha)
    return spec, params, stats, alpha, x, model


def _jax_logits(spec, params, stats, x, sel, mode):
    fn = jax.jit(lambda p, s, a, sl: apply_network(spec, p, s, a, sl, mode, train=False)[0])
    return np.asarray(fn(params, stats, x, sel))


def test_net_dense_eval_matches_jax(loaded_net):
    spec, params, stats, alpha, x, model = loaded_net
    model.mode = "allops"
    model.eval()
    with torch.no_grad():
        model.alpha.copy_(torch.from_numpy(np.array(alpha)))
        lt = model(nhwc_to_nchw(x), tau=1.0).numpy()
        lt_default = model(nhwc_to_nchw(x)).numpy()
    lj = _jax_logits(spec, params, stats, x, mixed_op.select_rows(jax.nn.softmax(alpha, -1), "dense"), "dense")
    assert np.allclose(lt, lt_default)
    assert np.std(lj) > 1e-3  # not just the classifier bias
    assert rel_err(lt, lj) <= RTOL


# argmax rows covering FactorizedReduce, conv 7x1 and dilated convs at both strides
ARGMAX_CHOICES = [
    ("sep_conv_3x3", "skip_connect", "conv_7x1_1x7", "dil_conv_5x5"),
    ("dil_conv_3x3", "sep_conv_7x7", "avg_pool_3x3", "sep_conv_5x5"),
    ("max_pool_3x3", "conv_7x1_1x7", "skip_connect", "skip_connect"),
]


@pytest.mark.parametrize("choice", ARGMAX_CHOICES, ids=lambda c: "-".join(c))
def test_net_argmax_eval_matches_jax(loaded_net, choice):
    spec, params, stats, alpha, x, model = loaded_net
    a = np.array(alpha)
    for row, name in enumerate(choice):
        a[row, PRIMITIVES.index(name)] = 1.0
    a = jnp.asarray(a)
    with torch.no_grad():
        model.alpha.copy_(torch.from_numpy(np.array(a)))
    model.eval()
    for mode in ("argmax", "single"):  # single in eval = argmax, as the original
        model.mode = mode
        with torch.no_grad():
            lt = model(nhwc_to_nchw(x)).numpy()
        if mode == "argmax":
            lj = _jax_logits(spec, params, stats, x, mixed_op.select_rows(a, "argmax"), "argmax")
            assert np.std(lj) > 1e-3
        assert rel_err(lt, lj) <= RTOL


def test_net_dense_train_mode_matches_jax(loaded_net):
    """Train-mode BN (batch statistics) through the whole all-ops net, running stats included."""
    spec, params, stats, alpha, x, _ = loaded_net
    torch.manual_seed(0)
    model = tb.load_from_jax(tb.TorchASOSE(32, 4, mode="allops"), params, stats, alpha).train()
    with torch.no_grad():
        lt = model(nhwc_to_nchw(x)).numpy()
    sel = mixed_op.select_rows(jax.nn.softmax(alpha, -1), "dense")
    lj, new_stats = jax.jit(lambda p, s, a, sl: apply_network(spec, p, s, a, sl, "dense", train=True))(
        params, stats, x, sel)
    assert rel_err(lt, lj) <= RTOL
    assert rel_err(model.stem[1].running_var.numpy(), new_stats["stem"]["var"]) <= RTOL
    bn = model.blocks[2].ops["conv_7x1_1x7"].bn
    js = new_stats["blocks"][2]["paths"][0]["conv_7x1_1x7"]["bn"]
    assert rel_err(bn.running_mean.numpy(), js["mean"]) <= RTOL
    assert rel_err(bn.running_var.numpy(), js["var"]) <= RTOL


# ---------------------------------------------------------------------------------------------- 4. steps

def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


def _no_none_model(seed=0, c=32):
    """single mode with `none` effectively never sampled: a sampled `none` zeroes the net (logits = bias),
    which makes every alpha gradient exactly 0 for that step (spec 2b)."""
    torch.manual_seed(seed)
    model = tb.TorchASOSE(c, 4, mode="single")
    with torch.no_grad():
        model.alpha[:, 0] = -100.0
    return model


def test_single_arch_step_gives_alpha_gradient():
    model = _no_none_model()
    _, opt_a = tb.make_optimizers(model)
    w_before = [p.detach().clone() for p in model.weight_parameters()]
    a_before = model.alpha.detach().clone()
    x, y = _batch()
    loss = tb.arch_step(model, opt_a, x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    g = model.alpha.grad
    assert g is not None and torch.all(torch.isfinite(g)) and g.abs().max() > 0
    assert not torch.equal(model.alpha.detach(), a_before)
    assert all(torch.equal(a, b) for a, b in zip(w_before, model.weight_parameters()))
    assert all(p.grad is None for p in model.weight_parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_single_renormalize_reproduces_zero_alpha_gradient():
    """The original's w / (w + 1e-8) on the single active op: dL/dalpha is exactly 0 in fp32 (spec 3.4)."""
    model = _no_none_model()
    model.renormalize = True
    _, opt_a = tb.make_optimizers(model)
    tb.arch_step(model, opt_a, *_batch())
    assert model.alpha.grad is not None and model.alpha.grad.abs().max() == 0


def test_single_weight_step_trains_weights_only():
    model = _no_none_model(1)
    opt_w, _ = tb.make_optimizers(model)
    w_before = [p.detach().clone() for p in model.weight_parameters()]
    a_before = model.alpha.detach().clone()
    loss = tb.weight_step(model, opt_w, *_batch(1))
    assert torch.isfinite(loss)
    assert torch.equal(model.alpha.detach(), a_before) and model.alpha.grad is None
    assert model.alpha.requires_grad  # restored
    changed = sum(not torch.equal(a, b) for a, b in zip(w_before, model.weight_parameters()))
    assert changed > 0
    assert not torch.equal(w_before[0], model.stem[0].weight)  # the stem is always on the path
    # only the sampled op of each layer got gradients (single path)
    for blk in model.blocks:
        with_grad = [n for n, op in blk.ops.items() if any(p.grad is not None for p in op.parameters())]
        assert len(with_grad) <= 1


def test_single_forward_equals_argmax_when_alpha_is_peaked():
    """Hard ST sample of a peaked alpha picks the peak; the forward value is the plain op output (w = 1)."""
    torch.manual_seed(3)
    model = tb.TorchASOSE(32, 4, mode="single").train()
    with torch.no_grad():
        model.alpha.zero_()
        for row, k in enumerate((4, 3, 9, 8)):
            model.alpha[row, k] = 1e4
    x, _ = _batch(2)
    with torch.no_grad():
        ys = model(x)
        model.mode = "argmax"
        ya = model(x)
    assert rel_err(ys.numpy(), ya.numpy()) <= 1e-6


def test_allops_step_and_soft_clip():
    model = _no_none_model(2, c=8)
    model.mode = "allops"
    opt_w, opt_a = tb.make_optimizers(model)
    x, y = _batch(3)
    assert torch.isfinite(tb.weight_step(model, opt_w, x, y))
    assert torch.isfinite(tb.arch_step(model, opt_a, x, y))
    assert model.alpha.grad.abs().max() > 0
    # soft clip: norm g > 5 becomes 5 + 0.1 (g - 5); below 5 unchanged
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50
    g = tb.soft_clip_([p])
    assert float(g) == pytest.approx(50.0)
    assert float(p.grad.norm()) == pytest.approx(5 + 0.1 * 45, rel=1e-5)
    p.grad = torch.tensor([3.0, 0.0, 0.0, 0.0])
    tb.soft_clip_([p])
    assert torch.equal(p.grad, torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_tau_and_optimizers():
    model = tb.TorchASOSE(8, 3)
    assert model.tau == 5.0 and model.anneal_tau() == pytest.approx(4.9)
    opt_w, opt_a = tb.make_optimizers(model)
    assert opt_w.defaults["lr"] == 0.025 and opt_w.defaults["momentum"] == 0.9
    assert opt_w.defaults["weight_decay"] == 1e-4
    assert opt_a.defaults["lr"] == 3e-4 and opt_a.defaults["weight_decay"] == 1e-3
    assert len(opt_a.param_groups[0]["params"]) == 1 and opt_a.param_groups[0]["params"][0] is model.alpha
    assert all(p is not model.alpha for p in opt_w.param_groups[0]["params"])
    with pytest.raises(ValueError):
        tb.TorchASOSE(mode="bogus")
