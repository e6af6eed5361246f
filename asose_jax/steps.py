"""The train state and the jitted pure steps.

``TrainState`` is one pytree: weights, BN statistics, alpha, both optimizer states, the root RNG key and
counters. ``weight_step`` (alpha frozen), ``arch_step`` (weights frozen; fed the held-out arch split)
and ``eval_step`` are pure functions ``(state, data, batch) -> state`` compiled once per network spec,
with the state donated. Augmentation, Gumbel sampling, forward, backward, the optimizer update and the
epoch's metric sums all happen inside one ``jit``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from asose_jax import arch, mixed_op
from asose_jax.config import Config
from asose_jax.data import augment_batch, normalize
from asose_jax.model import NetSpec, apply_network, init_network

PHASES = ("warmup", "weight", "arch", "retrain", "final")
EVAL_BATCH = 1000  # images per evaluation batch (one compiled shape)


@flax.struct.dataclass
class TrainState:
    params: Any  # weights (float32)
    batch_stats: Any  # BN running mean / var
    alpha: jax.Array  # architecture logits [rows, ops]
    w_opt: Any  # weight optimizer state (its count drives the per-epoch LR schedule)
    a_opt: Any  # alpha optimizer state
    key: jax.Array  # root PRNG key; per-step keys are fold_in(key, step)
    step: jax.Array  # int32: steps taken (weight + arch)
    arch_epochs: jax.Array  # int32: arch epochs done (drives the tau schedule)
    cycle: jax.Array  # int32
    phase: jax.Array  # int32 index into PHASES
    sums: Any  # device-side running sums of the current epoch: loss, correct, count, grad_norm(_max)


def zero_sums() -> dict:
    return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32),
            "grad_norm": jnp.zeros((), jnp.float32), "grad_norm_max": jnp.zeros((), jnp.float32)}


def add_to_sums(sums: dict, mean_loss, correct, count: int, grad_norm=None) -> dict:
    """The epoch's running sums after one batch of ``count`` examples.

    ``grad_norm`` (weight steps; arch steps leave these sums as they are): the pre-clip global norm of the
    weight gradient, summed ``* count`` like the loss (``/ count`` is the mean over the steps), and its max."""
    out = {**sums, "loss": sums["loss"] + mean_loss * count, "correct": sums["correct"] + correct,
           "count": sums["count"] + count}
    if grad_norm is not None:
        out.update(grad_norm=sums["grad_norm"] + grad_norm * count,
                   grad_norm_max=jnp.maximum(sums["grad_norm_max"], grad_norm))
    return out


# ---------------------------------------------------------------------------------------------- optimizers

def cosine_warm_restarts(base_lr: float, t0: int, t_mult: int, min_lr: float) -> Callable:
    """PyTorch CosineAnnealingWarmRestarts as a function of the epoch index ``e`` (float or array)."""
    def lr(e):
        e = jnp.asarray(e, jnp.float32)
        if t_mult == 1:
            t_cur, t_i = jnp.mod(e, t0), jnp.float32(t0)
        else:
            n = jnp.floor(jnp.log2(e / t0 * (t_mult - 1) + 1) / math.log2(t_mult))
            start = t0 * (t_mult ** n - 1) / (t_mult - 1)
            t_cur, t_i = e - start, t0 * t_mult ** n
        return min_lr + (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * t_cur / t_i)) / 2
    return lr


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves of ``tree`` together (what the clips measure)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(u)) for u in jax.tree.leaves(tree)))


def soft_clip(max_norm: float, factor: float = 0.1) -> optax.GradientTransformation:
    """The original's clip: above ``max_norm`` the global norm g becomes ``max_norm + factor (g - max_norm)``."""
    def update(updates, state, params=None):
        g = global_norm(updates)
        scale = jnp.where(g > max_norm, (max_norm + factor * (g - max_norm)) / (g + 1e-8), 1.0)
        return jax.tree.map(lambda u: u * scale, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD + momentum + L2 (PyTorch semantics), clipped; LR constant within an epoch, stepped per epoch."""
    o = cfg.optim
    if o.schedule == "cosine_restarts":
        per_epoch = cosine_warm_restarts(o.lr, o.t0_epochs, o.t_mult, o.min_lr)
        schedule = lambda count: per_epoch(count // max(steps_per_epoch, 1))  # noqa: E731
    else:
        schedule = optax.constant_schedule(o.lr)
    clip = soft_clip(o.clip_norm) if o.clip_mode == "soft" else optax.clip_by_global_norm(o.clip_norm)
    return optax.chain(clip, optax.add_decayed_weights(o.weight_decay), optax.trace(o.momentum, o.nesterov),
                       optax.scale_by_learning_rate(schedule))


def arch_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam semantics), clipped."""
    a = cfg.arch
    clip = soft_clip(a.clip_norm) if cfg.optim.clip_mode == "soft" else optax.clip_by_global_norm(a.clip_norm)
    return optax.chain(clip, optax.add_decayed_weights(a.weight_decay), optax.scale_by_adam(a.b1, a.b2),
                       optax.scale_by_learning_rate(a.lr))


def sampling_kind(cfg: Config) -> str:
    """Gumbel sampling used in training steps: hard ST for single-path, soft otherwise."""
    return "hard" if cfg.mixed_op.mode == "single" else "soft"


def compute_dtype(cfg: Config):
    return jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32


def create_train_state(key: jax.Array, spec: NetSpec, cfg: Config, steps_per_epoch: int) -> TrainState:
    k_net, k_alpha, k_run = jax.random.split(key, 3)
    params, stats = init_network(k_net, spec)
    alpha = arch.init_alpha(k_alpha, spec.num_rows, len(spec.ops), cfg.arch.init_scale)
    return TrainState(params=params, batch_stats=stats, alpha=alpha,
                      w_opt=weight_optimizer(cfg, steps_per_epoch).init(params),
                      a_opt=arch_optimizer(cfg).init(alpha), key=k_run,
                      step=jnp.zeros((), jnp.int32), arch_epochs=jnp.zeros((), jnp.int32),
                      cycle=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32), sums=zero_sums())


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy ``[N, K]`` x ``[N]`` with optional label smoothing."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


# ---------------------------------------------------------------------------------------------- steps

@dataclass(frozen=True)
class Steps:
    """The compiled steps for one spec.

    ``choice = sample(state)`` draws the step's op choices (same key as the step); then
    ``weight_step(state, x_u8, y, perm, i, choice)`` trains on batch ``perm[i]`` with those ops.
    ``arch_step`` takes its choices from ``arch_sample`` (the same function unless the arch steps have a
    mode of their own, :class:`SplitModeSteps`)."""
    sample: Callable
    weight_step: Callable
    arch_step: Callable
    eval_batch: Callable
    tau: Callable
    arch_sample: Callable


class SplitModeSteps:
    """Weight steps in ``mixed_op.mode`` and arch steps in ``mixed_op.arch_mode``, over one TrainState.

    E.g. host-dispatched ``single`` weight steps (one op per row: cheap) with ``dense`` arch steps (every
    op, weighted by the soft Gumbel weights: the DARTS-style, low-variance alpha gradient). Arch steps see
    only the arch-val split, so computing every op there costs little."""

    def __init__(self, weight: Steps, arch_steps: Steps):
        self._weight, self._arch = weight, arch_steps
        self.sample, self.weight_step = weight.sample, weight.weight_step
        self.eval_batch, self.tau = weight.eval_batch, weight.tau
        self.arch_sample = arch_steps.arch_sample
        if hasattr(weight, "precompile"):
            self.precompile = weight.precompile

    def arch_step(self, state: TrainState, x_all, y_all, perm, i, choice) -> TrainState:
        new_state = self._arch.arch_step(state, x_all, y_all, perm, i, choice)
        forget = getattr(self._weight, "forget_host_state", None)
        if forget is not None:  # alpha and the step counter moved outside the weight steps' host mirror
            forget()
        return new_state


def make_steps(spec: NetSpec, cfg: Config, steps_per_epoch: int) -> Steps | SplitModeSteps:
    """The steps of ``cfg.mixed_op.mode``; with a different ``mixed_op.arch_mode``, arch steps of that mode."""
    mo = cfg.mixed_op
    steps = _make_mode_steps(spec, cfg, steps_per_epoch)
    if not mo.arch_mode or mo.arch_mode == mo.mode:
        return steps
    arch_cfg = replace(cfg, mixed_op=replace(mo, mode=mo.arch_mode, arch_mode=""))
    return SplitModeSteps(steps, _make_mode_steps(spec, arch_cfg, steps_per_epoch))


def _make_mode_steps(spec: NetSpec, cfg: Config, steps_per_epoch: int) -> Steps:
    mo, d = cfg.mixed_op, cfg.data
    dtype = compute_dtype(cfg)
    w_tx, a_tx = weight_optimizer(cfg, steps_per_epoch), arch_optimizer(cfg)
    tau_fn = arch.tau_schedule(cfg.arch.tau_init, cfg.arch.tau_decay, cfg.arch.tau_min)
    sampling = sampling_kind(cfg)

    def step_keys(state):
        return jax.random.split(jax.random.fold_in(state.key, state.step))

    def batch_and_keys(state, x_all, y_all, perm, i):
        idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
        k_aug, k_arch = step_keys(state)
        x = augment_batch(k_aug, x_all[idx], d.crop, d.flip)
        return x, y_all[idx], k_arch

    def sample(state: TrainState) -> jax.Array:
        """Op choices of the next step ``[rows, k]`` (or keep-masks), from the step's own key."""
        weights = arch.arch_weights(step_keys(state)[1], state.alpha, tau_fn(state.arch_epochs), sampling)
        return mixed_op.choose_rows(weights, mo.mode, mo.k, mo.weight_threshold)

    def forward(params, stats, alpha, x, k_arch, tau, train, choice):
        weights = arch.arch_weights(k_arch, alpha, tau, sampling)
        sel = mixed_op.select_rows(weights, mo.mode, mo.k, mo.weight_threshold, choice)
        return apply_network(spec, params, stats, x, sel, mo.mode, train, cfg.remat, dtype)

    def accumulate(sums, loss, logits, y, grad_norm=None):
        return add_to_sums(sums, loss, jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32), y.shape[0],
                           grad_norm)

    def weight_step(state: TrainState, x_all, y_all, perm, i, choice) -> TrainState:
        x, y, k_arch = batch_and_keys(state, x_all, y_all, perm, i)
        alpha, tau = jax.lax.stop_gradient(state.alpha), tau_fn(state.arch_epochs)

        def loss_fn(params):
            logits, stats = forward(params, state.batch_stats, alpha, x, k_arch, tau, True, choice)
            return cross_entropy(logits, y, cfg.optim.label_smoothing), (logits, stats)
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, w_opt = w_tx.update(grads, state.w_opt, state.params)
        sums = accumulate(state.sums, loss, logits, y, global_norm(grads))
        return state.replace(params=optax.apply_updates(state.params, updates), batch_stats=stats, w_opt=w_opt,
                             step=state.step + 1, sums=sums)

    def arch_step(state: TrainState, x_all, y_all, perm, i, choice) -> TrainState:
        x, y, k_arch = batch_and_keys(state, x_all, y_all, perm, i)
        tau = tau_fn(state.arch_epochs)
        params = jax.lax.stop_gradient(state.params)

        def loss_fn(alpha):
            logits, stats = forward(params, state.batch_stats, alpha, x, k_arch, tau, True, choice)
            return cross_entropy(logits, y), (logits, stats)
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.alpha)
        updates, a_opt = a_tx.update(grads, state.a_opt, state.alpha)
        return state.replace(alpha=optax.apply_updates(state.alpha, updates), batch_stats=stats, a_opt=a_opt,
                             step=state.step + 1, sums=accumulate(state.sums, loss, logits, y))

    def eval_batch(state: TrainState, x_u8, y, mask):
        """Sums of (loss, correct) over the unmasked examples of one batch, inference mode."""
        sel = mixed_op.select_rows(state.alpha if mo.eval_mode == "argmax" else jax.nn.softmax(state.alpha, -1),
                                   mo.eval_mode, mo.k, mo.weight_threshold)
        logits, _ = apply_network(spec, state.params, state.batch_stats, normalize(x_u8), sel, mo.eval_mode,
                                  False, False, dtype)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y) & mask
        return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct)

    if mo.mode == "single" and mo.dispatch == "host":
        from asose_jax.single_path import SinglePathSteps  # noqa: PLC0415 (it builds on this module)
        return SinglePathSteps(spec, cfg, steps_per_epoch, tau_fn, jax.jit(eval_batch))
    jit_sample = jax.jit(sample)
    return Steps(sample=jit_sample, arch_sample=jit_sample,
                 weight_step=jax.jit(weight_step, donate_argnums=0),
                 arch_step=jax.jit(arch_step, donate_argnums=0),
                 eval_batch=jax.jit(eval_batch),
                 tau=tau_fn)


def padded_batches(images, labels, batch_size: int):
    """Fixed-order batches ``(x, y, mask)`` of one compiled shape; the last is zero-padded, mask False there."""
    n = int(images.shape[0])
    bs = min(batch_size, n)
    for start in range(0, n, bs):
        xb, yb = images[start:start + bs], labels[start:start + bs]
        m = xb.shape[0]
        if m < bs:
            xb = jnp.concatenate([xb, jnp.zeros((bs - m,) + xb.shape[1:], xb.dtype)])
            yb = jnp.concatenate([yb, jnp.zeros((bs - m,), yb.dtype)])
        yield xb, yb, jnp.arange(bs) < m


def evaluate(steps: Steps, state: TrainState, images, labels, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Mean loss and accuracy (%) over a whole split (device arrays), in fixed order."""
    n = int(images.shape[0])
    loss, correct = 0.0, 0
    for xb, yb, mask in padded_batches(images, labels, batch_size):
        l, c = steps.eval_batch(state, xb, yb, mask)
        loss += float(l)
        correct += int(c)
    return {"loss": loss / n, "acc": 100.0 * correct / n}
