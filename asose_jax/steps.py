"""The search's steps behind one interface, :class:`Steps`, and the engine that runs them in one program.

``weight_step`` (alpha frozen; fed the weights split), ``arch_step`` (weights frozen; fed the held-out arch
split) and ``eval_batch`` are pure functions of the :class:`~asose_jax.train_state.TrainState`. In the one-program
engine (:func:`program_steps`) each is one ``jit`` with the state donated: augmentation, Gumbel sampling,
forward, backward, the optimizer update and the epoch's metric sums all happen inside it. ``make_steps`` picks
the engine from the mixed-op mode: the host-dispatched one (``single_path``) where the mode asks for it, and a
second engine for the arch steps when ``mixed_op.arch_mode`` differs from ``mixed_op.mode``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from asose_jax import arch, cost, mixed_op
from asose_jax.config import Config, check
from asose_jax.data import augment_batch, normalize
from asose_jax.errors import ConfigError
from asose_jax.model import NetSpec, apply_network
from asose_jax.parallel import Placement, constrain, mesh_context
from asose_jax.single_path import SinglePathSteps
from asose_jax.train_state import (TrainState, apply_alpha_grads, apply_weight_grads, arch_optimizer, compute_dtype,
                                   cross_entropy, tau_schedule, weight_optimizer)
from asose_jax.utils import EVAL_BATCH


class Steps(Protocol):
    """What the search loop calls, whichever engine runs the steps.

    ``choice = sample(state)`` draws the next weight step's op choices (from the step's own key); then
    ``weight_step(state, x_u8, y, perm, i, choice)`` trains on batch ``perm[i]`` with those ops and returns the
    new state (the old one may be donated). ``arch_step`` takes its choices from ``arch_sample``.
    ``eval_batch(state, x_u8, y, mask)`` gives the loss sum and correct count over the unmasked examples in
    inference mode; ``tau(arch_epochs)`` the Gumbel temperature. ``after_other_arch_step()`` is a hook, run when
    another engine took an arch step on the same state (:class:`SplitModeSteps`)."""
    tau: Callable[[jax.Array], jax.Array]
    sample: Callable[[TrainState], Any]
    arch_sample: Callable[[TrainState], Any]
    weight_step: Callable[..., TrainState]
    arch_step: Callable[..., TrainState]
    eval_batch: Callable[..., tuple[jax.Array, jax.Array]]

    def after_other_arch_step(self) -> None: ...


def make_steps(spec: NetSpec, cfg: Config, steps_per_epoch: int, placement: Placement | None = None) -> Steps:
    """The steps of ``cfg.mixed_op.mode``; with a different ``mixed_op.arch_mode``, arch steps of that mode.

    With a ``placement`` the one-program steps split each batch over its mesh (the state and data replicated);
    without one they run where their inputs are, as on one device."""
    mo = cfg.mixed_op
    steps = _mode_steps(spec, cfg, steps_per_epoch, placement)
    if not mo.arch_mode or mo.arch_mode == mo.mode:
        return steps
    arch_cfg = replace(cfg, mixed_op=replace(mo, mode=mo.arch_mode, arch_mode=""))
    return SplitModeSteps(steps, _mode_steps(spec, arch_cfg, steps_per_epoch, placement))


def _host_engine(cfg: Config, mode: str) -> bool:
    """Whether the steps of ``mode`` run on the host-dispatched engine (``single_path``)."""
    return mixed_op.MODES[mode].host_dispatch and cfg.mixed_op.dispatch == "host"


def _mode_steps(spec: NetSpec, cfg: Config, steps_per_epoch: int, placement: Placement | None) -> Steps:
    """The engine of ``cfg.mixed_op.mode``: host-dispatched where the mode allows it and ``dispatch=host``."""
    program = program_steps(spec, cfg, steps_per_epoch, placement)
    if _host_engine(cfg, cfg.mixed_op.mode):
        return SinglePathSteps(spec, cfg, steps_per_epoch, program.eval_batch)
    return program


def check_devices(cfg: Config, n_devices: int) -> None:
    """ConfigError unless the search's steps split over ``n_devices``: ``data.batch_size`` a multiple of it (the
    weight and arch steps share it; the evaluation pads its batches to a multiple), and with more than one
    device no host-dispatched engine (its per-block programs run on one device)."""
    check(cfg.data.batch_size % n_devices == 0, "data.batch_size",
          f"a multiple of {n_devices}, the devices in the mesh (or --set parallel.devices=N for an N dividing it)",
          cfg.data.batch_size)
    if n_devices > 1 and any(_host_engine(cfg, mode) for mode in (cfg.mixed_op.mode, cfg.mixed_op.arch_mode) if mode):
        raise ConfigError(f"mixed_op.dispatch=host runs on one device, and the mesh has {n_devices}: --set "
                          f"mixed_op.dispatch=switch (or mixed_op.mode=routed), or --set parallel.devices=1")


class SplitModeSteps:
    """Weight steps in ``mixed_op.mode`` and arch steps in ``mixed_op.arch_mode``, over one TrainState.

    E.g. host-dispatched ``single`` weight steps (one op per row: cheap) with ``dense`` arch steps (every
    op, weighted by the soft Gumbel weights: the DARTS-style, low-variance alpha gradient). Arch steps see
    only the arch-val split, so computing every op there costs little."""

    def __init__(self, weight: Steps, arch_steps: Steps):
        self.weight_engine, self.arch_engine = weight, arch_steps  # the two engines, each a Steps of its own
        self.tau, self.sample, self.weight_step = weight.tau, weight.sample, weight.weight_step
        self.eval_batch, self.arch_sample = weight.eval_batch, arch_steps.arch_sample

    def arch_step(self, state: TrainState, x_all, y_all, perm, i, choice) -> TrainState:
        new_state = self.arch_engine.arch_step(state, x_all, y_all, perm, i, choice)
        self.weight_engine.after_other_arch_step()  # alpha and the step counter moved outside the weight steps
        return new_state

    def after_other_arch_step(self) -> None:
        self.weight_engine.after_other_arch_step()


# ---------------------------------------------------------------------------------------------- one-program engine

@dataclass(frozen=True)
class ProgramSteps:
    """The steps of one mode, each one jitted program (:func:`program_steps`)."""
    tau: Callable
    sample: Callable
    arch_sample: Callable
    weight_step: Callable
    arch_step: Callable
    eval_batch: Callable

    def after_other_arch_step(self) -> None:
        """Nothing to do: every program reads alpha and the step counter from the state it is given."""


def program_steps(spec: NetSpec, cfg: Config, steps_per_epoch: int, placement: Placement | None = None
                  ) -> ProgramSteps:
    """:func:`sample_choices`, :func:`train_weights`, :func:`train_alpha` and :func:`eval_step` jitted for one
    spec and config (the train steps donate the state). With a ``placement`` every input and output is declared
    replicated on its mesh and the batch inside each step is split over the mesh axis."""
    shardings = dict(in_shardings=placement.replicated, out_shardings=placement.replicated) if placement else {}
    batch = placement.batch if placement else None
    sample = jax.jit(functools.partial(sample_choices, cfg), **shardings)
    return ProgramSteps(tau=tau_schedule(cfg), sample=sample, arch_sample=sample,
                        weight_step=jax.jit(functools.partial(train_weights, spec, cfg, steps_per_epoch, batch=batch),
                                            donate_argnums=0, **shardings),
                        arch_step=jax.jit(functools.partial(train_alpha, spec, cfg, cost.search_cost_table(spec, cfg),
                                                            batch=batch), donate_argnums=0, **shardings),
                        eval_batch=jax.jit(functools.partial(eval_step, spec, cfg, batch=batch), **shardings))


def _step_keys(state: TrainState) -> jax.Array:
    """The step's (augmentation, arch sampling) keys, from ``fold_in(key, step)``."""
    return jax.random.split(jax.random.fold_in(state.key, state.step))


def _augmented_batch(cfg: Config, state: TrainState, x_all, y_all, perm, i, batch: NamedSharding | None):
    """Batch ``perm[i]`` gathered from the replicated split and laid out with ``batch`` (split over the mesh),
    augmented: the random crops and flips are the same whatever the layout (partitionable threefry)."""
    idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
    k_aug, k_arch = _step_keys(state)
    x, y = constrain(x_all[idx], batch), constrain(y_all[idx], batch)
    return augment_batch(k_aug, x, cfg.data.crop, cfg.data.flip), y, k_arch


def sample_choices(cfg: Config, state: TrainState) -> jax.Array:
    """Op choices of the next step ``[rows, k]`` (or keep-masks; routed: a permutation of the batch per row,
    ``[rows, data.batch_size]``), from the step's own key."""
    mo = cfg.mixed_op
    mode, key = mixed_op.MODES[mo.mode], _step_keys(state)[1]
    if mode.draw is not None:
        return mixed_op.draw_rows(key, state.alpha.shape[0], mo.mode, cfg.data.batch_size)
    weights = arch.arch_weights(key, state.alpha, tau_schedule(cfg)(state.arch_epochs), mode.sampling)
    return mixed_op.choose_rows(weights, mo.mode, mo.k, mo.weight_threshold)


def _train_logits(spec: NetSpec, cfg: Config, params, stats, alpha, x, k_arch, tau, choice):
    """Logits and new BN statistics of a training step: Gumbel weights from ``k_arch``, the ops of ``choice``."""
    mo = cfg.mixed_op
    weights = arch.arch_weights(k_arch, alpha, tau, mixed_op.MODES[mo.mode].sampling)
    sel = mixed_op.select_rows(weights, mo.mode, mo.k, mo.weight_threshold, choice)
    return apply_network(spec, params, stats, x, sel, mo.mode, True, cfg.remat, compute_dtype(cfg))


def _correct(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32)


def train_weights(spec: NetSpec, cfg: Config, steps_per_epoch: int, state: TrainState, x_all, y_all, perm, i,
                  choice, batch: NamedSharding | None = None) -> TrainState:
    """One weight step (alpha frozen) on batch ``perm[i]`` of ``x_all`` (uint8 ``[N, 32, 32, 3]``) with the op
    ``choice`` of :func:`sample_choices`; the batch laid out with ``batch`` (:mod:`asose_jax.parallel`)."""
    x, y, k_arch = _augmented_batch(cfg, state, x_all, y_all, perm, i, batch)
    alpha, tau = jax.lax.stop_gradient(state.alpha), tau_schedule(cfg)(state.arch_epochs)

    def loss_fn(params):
        logits, stats = _train_logits(spec, cfg, params, state.batch_stats, alpha, x, k_arch, tau, choice)
        return cross_entropy(logits, y, cfg.optim.label_smoothing), (logits, stats)
    with mesh_context(batch):  # the routed mode splits its groups over this mesh
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_weight_grads(state, weight_optimizer(cfg, steps_per_epoch), grads, stats, loss, _correct(logits, y),
                              y.shape[0])


def train_alpha(spec: NetSpec, cfg: Config, cost_table: jax.Array | None, state: TrainState, x_all, y_all, perm, i,
                choice, batch: NamedSharding | None = None) -> TrainState:
    """One arch step (weights frozen; no label smoothing) on batch ``perm[i]`` of the arch split.

    The loss is the cross-entropy, plus ``arch.cost_weight * cost.expected_cost(alpha, cost_table)`` when the
    weight is above 0 (``cost_table``: :func:`asose_jax.cost.search_cost_table`); the logged loss is the
    cross-entropy alone."""
    x, y, k_arch = _augmented_batch(cfg, state, x_all, y_all, perm, i, batch)
    tau = tau_schedule(cfg)(state.arch_epochs)
    params = jax.lax.stop_gradient(state.params)

    def loss_fn(alpha):
        logits, stats = _train_logits(spec, cfg, params, state.batch_stats, alpha, x, k_arch, tau, choice)
        ce = cross_entropy(logits, y)
        if cfg.arch.cost_weight > 0:  # a Python branch: with no weight the program is the plain arch loss's
            return ce + cfg.arch.cost_weight * cost.expected_cost(alpha, cost_table), (ce, logits, stats)
        return ce, (ce, logits, stats)
    with mesh_context(batch):
        (_, (loss, logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.alpha)
    return apply_alpha_grads(state, arch_optimizer(cfg), grads, stats, loss, _correct(logits, y), y.shape[0])


def eval_step(spec: NetSpec, cfg: Config, state: TrainState, x_u8, y, mask, batch: NamedSharding | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Sums of (loss, correct) over the unmasked examples of one batch, inference mode, ``mixed_op.eval_mode``;
    the batch laid out with ``batch``."""
    mo = cfg.mixed_op
    x_u8, y, mask = (constrain(v, batch) for v in (x_u8, y, mask))
    sel = mixed_op.select_rows(mixed_op.MODES[mo.eval_mode].eval_weights(state.alpha), mo.eval_mode, mo.k,
                               mo.weight_threshold)
    logits, _ = apply_network(spec, state.params, state.batch_stats, normalize(x_u8), sel, mo.eval_mode, False, False,
                              compute_dtype(cfg))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y) & mask
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct)


# ---------------------------------------------------------------------------------------------- evaluation

def padded_batches(images, labels, batch_size: int, multiple: int = 1):
    """Fixed-order batches ``(x, y, mask)`` of one compiled shape, ``min(batch_size, len)`` rounded up to a
    ``multiple`` (the device count: each device gets an equal share); the last is zero-padded, mask False there."""
    n = int(images.shape[0])
    bs = -(-min(batch_size, n) // multiple) * multiple
    for start in range(0, n, bs):
        xb, yb = images[start:start + bs], labels[start:start + bs]
        m = xb.shape[0]
        if m < bs:
            xb = jnp.concatenate([xb, jnp.zeros((bs - m,) + xb.shape[1:], xb.dtype)])
            yb = jnp.concatenate([yb, jnp.zeros((bs - m,), yb.dtype)])
        yield xb, yb, jnp.arange(bs) < m


def evaluate(steps: Steps, state: TrainState, images, labels, batch_size: int = EVAL_BATCH,
             multiple: int = 1) -> dict[str, float]:
    """Mean loss and accuracy (%) over a whole split (device arrays), in fixed order; batches of a ``multiple``
    of the device count (:func:`padded_batches`)."""
    n = int(images.shape[0])
    loss, correct = 0.0, 0
    for xb, yb, mask in padded_batches(images, labels, batch_size, multiple):
        l, c = steps.eval_batch(state, xb, yb, mask)
        loss += float(l)
        correct += int(c)
    return {"loss": loss / n, "acc": 100.0 * correct / n}
