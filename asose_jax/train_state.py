"""The search's train state, its optimizers and the one update tail every step engine ends with.

``TrainState`` is one pytree: weights, BN statistics, alpha, both optimizer states, the root RNG key and
counters. A weight step ends in :func:`apply_weight_grads`, an arch step in :func:`apply_alpha_grads`, whichever
engine computed the gradients (``steps`` or ``single_path``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from asose_jax import arch
from asose_jax.config import Config
from asose_jax.model import NetSpec, init_network

PHASES = ("warmup", "weight", "arch", "retrain")


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


def apply_weight_grads(state: TrainState, tx: optax.GradientTransformation, grads, batch_stats, loss, correct,
                       count: int) -> TrainState:
    """The state after a weight step: ``grads`` (shaped like ``params``) through ``tx``, the step's new BN
    statistics, the step counter, and the batch's mean ``loss`` and ``correct`` count added to the epoch's sums."""
    updates, w_opt = tx.update(grads, state.w_opt, state.params)
    sums = add_to_sums(state.sums, loss, correct, count, global_norm(grads))
    return state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, w_opt=w_opt,
                         step=state.step + 1, sums=sums)


def apply_alpha_grads(state: TrainState, tx: optax.GradientTransformation, grads, batch_stats, loss, correct,
                      count: int) -> TrainState:
    """The state after an arch step: :func:`apply_weight_grads` for alpha (``grads`` ``[rows, ops]``)."""
    updates, a_opt = tx.update(grads, state.a_opt, state.alpha)
    return state.replace(alpha=optax.apply_updates(state.alpha, updates), batch_stats=batch_stats, a_opt=a_opt,
                         step=state.step + 1, sums=add_to_sums(state.sums, loss, correct, count))


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


def create_train_state(seed: int, spec: NetSpec, cfg: Config, steps_per_epoch: int,
                       sharding: NamedSharding | None = None) -> TrainState:
    """The search's first state: weights and BN statistics drawn on the host from ``seed``
    (:func:`asose_jax.model.init_network`, nothing to compile), then alpha, the optimizer states and the
    counters in one small jitted program whose outputs are laid out with ``sharding`` (replicated on a mesh)."""
    params, stats = init_network(seed, spec)
    shardings = {} if sharding is None else dict(out_shardings=sharding)
    if sharding is not None:  # the same host arrays on every process
        params, stats = jax.device_put((params, stats), sharding)
    build = jax.jit(_state_around, static_argnums=(3, 4, 5), **shardings)
    return build(jax.random.PRNGKey(seed), params, stats, spec, cfg, steps_per_epoch)


def _state_around(key: jax.Array, params, stats, spec: NetSpec, cfg: Config, steps_per_epoch: int) -> TrainState:
    """A fresh state holding ``params`` and ``stats``: alpha ``init_scale * N(0, 1)`` and the run key from
    ``split(key, 3)[1:]``, fresh optimizer states, counters and sums at 0."""
    _, k_alpha, k_run = jax.random.split(key, 3)
    alpha = arch.init_alpha(k_alpha, spec.num_rows, len(spec.ops), cfg.arch.init_scale)
    return TrainState(params=params, batch_stats=stats, alpha=alpha,
                      w_opt=weight_optimizer(cfg, steps_per_epoch).init(params),
                      a_opt=arch_optimizer(cfg).init(alpha), key=k_run,
                      step=jnp.zeros((), jnp.int32), arch_epochs=jnp.zeros((), jnp.int32),
                      cycle=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32), sums=zero_sums())


def tau_schedule(cfg: Config) -> optax.Schedule:
    """The Gumbel temperature after ``n`` arch epochs (``TrainState.arch_epochs``):
    ``max(tau_min, tau_init * tau_decay**n)``."""
    a = cfg.arch
    return optax.exponential_decay(a.tau_init, transition_steps=1, decay_rate=a.tau_decay, end_value=a.tau_min)


# ---------------------------------------------------------------------------------------------- loss, precision

def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy ``[N, K]`` x ``[N]`` with optional label smoothing."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


def compute_dtype(cfg: Config):
    return jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
