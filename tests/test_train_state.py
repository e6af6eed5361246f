"""Tests for asose_jax.train_state: the LR schedule against PyTorch's CosineAnnealingWarmRestarts, the soft clip,
torch-like optimizer semantics (L2 weight decay added to the gradient) and the tau schedule."""
from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asose_jax import train_state
from asose_jax.config import ArchConfig, Config, OptimConfig


# ---------------------------------------------------------------------------------------------- schedules, clip

# torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(SGD(lr=0.025), T_0=50, T_mult=2, eta_min=1e-6),
# get_last_lr() after `epoch` scheduler steps (torch 2.13.0)
EPOCHS = (0, 1, 10, 25, 49, 50, 51, 100, 149, 150, 151, 200, 349, 350)


def torch_cosine_reference() -> dict[int, float]:
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.025)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=50, T_mult=2, eta_min=1e-6)
    out = {}
    for e in range(max(EPOCHS) + 1):
        if e in EPOCHS:
            out[e] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    return out


def closed_form_reference(e: int) -> float:
    """The same values from the documented formula (used when torch is missing)."""
    t0, i = 50, 0
    while e >= t0 * 2 ** i:
        e -= t0 * 2 ** i
        i += 1
    return 1e-6 + (0.025 - 1e-6) * (1 + math.cos(math.pi * e / (t0 * 2 ** i))) / 2


def test_cosine_warm_restarts_matches_torch():
    lr = train_state.cosine_warm_restarts(0.025, 50, 2, 1e-6)
    try:
        ref = torch_cosine_reference()
    except pytest.skip.Exception:
        ref = {e: closed_form_reference(e) for e in EPOCHS}
    for e in EPOCHS:
        assert float(lr(e)) == pytest.approx(ref[e], rel=1e-4, abs=1e-8), e
        assert closed_form_reference(e) == pytest.approx(ref[e], rel=1e-6, abs=1e-10), e
    assert float(lr(50)) == pytest.approx(0.025, rel=1e-5)  # restart
    assert float(lr(49)) < 1e-4  # end of the first period
    lr1 = train_state.cosine_warm_restarts(0.1, 10, 1, 0.0)  # t_mult == 1: plain periodic restarts
    assert float(lr1(10)) == pytest.approx(0.1) and float(lr1(5)) == pytest.approx(0.05, rel=1e-5)


def test_soft_clip_formula():
    tx = train_state.soft_clip(5.0)
    g = {"a": jnp.array([30.0, 40.0]), "b": jnp.zeros((2, 2))}  # global norm 50
    out, _ = tx.update(g, tx.init(g))
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(v))) for v in jax.tree.leaves(out))))
    assert norm == pytest.approx(5.0 + 0.1 * (50.0 - 5.0), rel=1e-5)  # 9.5
    np.testing.assert_allclose(np.asarray(out["a"]), np.array([30.0, 40.0]) * 9.5 / 50.0, rtol=1e-5)
    small = {"a": jnp.array([3.0, 0.0]), "b": jnp.ones((2, 2))}  # norm sqrt(13) < 5: unchanged
    out, _ = tx.update(small, tx.init(small))
    chex.assert_trees_all_close(out, small)


# ---------------------------------------------------------------------------------------------- optimizer semantics

def _sgd_reference(p, grads, lrs, momentum, wd):
    """torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d (buf = d at first); p -= lr * buf."""
    buf = None
    for g, lr in zip(grads, lrs):
        d = g + wd * p
        buf = d if buf is None else momentum * buf + d
        p = p - lr * buf
    return p


def test_weight_optimizer_is_torch_sgd_with_l2():
    cfg = dataclasses.replace(Config(), optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.05,
                                                            clip_norm=1e6, t0_epochs=2, t_mult=2, min_lr=1e-3))
    spe = 3
    tx = train_state.weight_optimizer(cfg, spe)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(4).astype(np.float32)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(10)]
    p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
    sched = train_state.cosine_warm_restarts(0.1, 2, 2, 1e-3)
    lrs = [float(sched(i // spe)) for i in range(10)]  # constant within an epoch, stepped per epoch
    assert lrs[:6] == [lrs[0]] * 3 + [lrs[3]] * 3 and lrs[3] < lrs[0] and lrs[6] == lrs[0]  # restart at epoch 2
    np.testing.assert_allclose(np.asarray(p), _sgd_reference(p0, grads, lrs, 0.9, 0.05), rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch")
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.05)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2, eta_min=1e-3)
    for i, g in enumerate(grads):
        tp.grad = torch.tensor(g)
        opt.step()
        if (i + 1) % spe == 0:
            sch.step()
    np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_arch_optimizer_is_torch_adam_with_l2():
    cfg = Config()
    a = cfg.arch
    tx = train_state.arch_optimizer(cfg)
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((2, 3)).astype(np.float32)
    grads = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(5)]
    p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
    # torch.optim.Adam (not AdamW): d = g + wd * p, then the usual bias-corrected Adam step
    ref, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        d = g + a.weight_decay * ref
        m = a.b1 * m + (1 - a.b1) * d
        v = a.b2 * v + (1 - a.b2) * d * d
        ref = ref - a.lr * (m / (1 - a.b1 ** t)) / (np.sqrt(v / (1 - a.b2 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-5, atol=1e-7)
    torch = pytest.importorskip("torch")
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.Adam([tp], lr=a.lr, betas=(a.b1, a.b2), weight_decay=a.weight_decay)
    for g in grads:
        tp.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_gradient_clipping_applies_before_weight_decay():
    """clip (global norm 5) acts on the raw gradient; the L2 term is added after it, as in torch's
    clip_grad_norm_ followed by SGD(weight_decay=...)."""
    cfg = dataclasses.replace(Config(), optim=OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.5, clip_norm=5.0,
                                                            schedule="constant"))
    tx = train_state.weight_optimizer(cfg, 1)
    p = jnp.array([1.0, 1.0])
    g = jnp.array([30.0, 40.0])
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(u), -(np.array([3.0, 4.0]) + 0.5 * np.array([1.0, 1.0])), rtol=1e-5)


def test_tau_schedule():
    sched = train_state.tau_schedule(Config(arch=ArchConfig(tau_init=5.0, tau_decay=0.98, tau_min=0.1)))
    for n in (0, 1, 2, 10, 50, 150):
        assert float(sched(n)) == pytest.approx(max(0.1, 5.0 * 0.98 ** n), rel=1e-5)
    assert float(sched(1000)) == pytest.approx(0.1)  # the floor
    n_floor = math.ceil(math.log(0.1 / 5.0) / math.log(0.98))  # 194
    assert float(sched(n_floor - 1)) > 0.1 and float(sched(n_floor)) == pytest.approx(0.1)
    assert float(jax.jit(sched)(jnp.int32(3))) == pytest.approx(5.0 * 0.98 ** 3, rel=1e-5)
