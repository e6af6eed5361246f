"""Host-dispatched single-path steps: the ``single`` mode without conditionals.

XLA runs a ``lax.switch`` on the GPU by copying the branch index to the host and waiting for the
stream, so a supernet with one conditional per mixed op (forward and backward) stalls the pipeline
many times per step. The one-program switch path (``mixed_op.switched``) is faster per step, but it recompiles
the whole step after every growth, while the programs here are cached per block shape and op and survive a
growth; this engine stays the default (docs/benchmarks.md compares the two).

Here the host draws each step's op choices itself (Gumbel noise from ``numpy`` seeded by
``(seed, step)``; alpha is fetched once per weight phase, and after every arch step) and dispatches
one small jitted program per block, specialised on the chosen op: ``stem -> block_0 .. block_L ->
head`` forward (each returning its VJP closure), then the VJPs in reverse, then one optimizer update.
No program contains a conditional, nothing waits on the device inside a weight phase, and every
program is compiled once per (block shape, op) and cached.

The maths equals the switch implementation: the mixed op's output is scaled by the straight-through
coefficient ``(onehot - stop_gradient(soft) + soft)[idx]`` (1 forward), so dL/dalpha != 0.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asose_jax.arch import straight_through
from asose_jax.config import Config
from asose_jax.cost import expected_cost, search_cost_table
from asose_jax.data import augment_batch, normalize
from asose_jax.model import BlockSpec, NetSpec, apply_block, apply_head, conv_bn_relu
from asose_jax.train_state import (TrainState, apply_alpha_grads, apply_weight_grads, arch_optimizer, compute_dtype,
                                   cross_entropy, tau_schedule, weight_optimizer)


def gumbel_noise(seed: int, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Standard Gumbel noise ``[rows, ops]`` for one step, from ``(seed, step)``."""
    u = np.random.default_rng([seed, 0x5A17, step]).random(shape, dtype=np.float64)
    return (-np.log(-np.log(u + 1e-20) + 1e-20)).astype(np.float32)


@jax.jit
def _coeff_and_vjp(alpha, noise, tau, idx):
    """Straight-through coefficient per row ``[rows]`` (value 1) and its VJP w.r.t. alpha."""
    def coeff(a):
        st = straight_through(jax.nn.softmax((a + noise) / tau, axis=-1), idx)
        return jnp.take_along_axis(st, idx[:, None], axis=1)[:, 0]
    return jax.vjp(coeff, alpha)


@jax.jit
def _add_cost_grad(g_alpha, alpha, table, weight):
    """``g_alpha + weight * d expected_cost(alpha, table) / d alpha``: the cost term of the arch loss."""
    return g_alpha + weight * jax.grad(expected_cost)(alpha, table)


@jax.jit
def _concat(parts):
    return jnp.concatenate(parts)


@jax.jit
def _apply_vjp(vjp_fn, cotangent):
    return vjp_fn(cotangent)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _weight_update(cfg: Config, steps_per_epoch: int, state: TrainState, grads, stats, loss, correct, count):
    return apply_weight_grads(state, weight_optimizer(cfg, steps_per_epoch), grads, stats, loss, correct, count)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _alpha_update(cfg: Config, state: TrainState, g_alpha, stats, loss, correct, count):
    return apply_alpha_grads(state, arch_optimizer(cfg), g_alpha, stats, loss, correct, count)


class SinglePathSteps:
    """The host-dispatched engine of :class:`asose_jax.steps.Steps` in ``single`` mode, with choices held on the
    host (``{"idx": [rows], "noise": [rows, ops]}``).

    Each block program receives only the weights and BN statistics of its input conv and of the ops
    chosen for it, and is cached by ``(ops, BlockSpec, choice)`` at module level: blocks of equal shape
    share programs, and so does the net rebuilt after a growth. The gradients of the ops not chosen are
    zeros allocated once per spec, so the optimizer update sees the whole tree (momentum and weight decay
    apply to every weight, as in the one-program implementation). ``eval_batch``: the one-program evaluation,
    used unless ``mixed_op.eval_mode`` is ``argmax`` (then the argmax net is dispatched like training). With
    ``arch.cost_weight > 0`` an arch step adds the gradient of the cost term to alpha's (see ``asose_jax.cost``)."""

    def __init__(self, spec: NetSpec, cfg: Config, steps_per_epoch: int, eval_batch: Callable):
        self.spec, self.cfg, self.steps_per_epoch = spec, cfg, steps_per_epoch
        self.dtype = compute_dtype(cfg)
        self.tau = tau_schedule(cfg)
        self._cost_table = search_cost_table(spec, cfg)  # None: no cost term
        self.eval_batch = self._eval_argmax if cfg.mixed_op.eval_mode == "argmax" else eval_batch
        self._alpha: np.ndarray | None = None  # host copy; None = refetch before the next sample
        self._step: int | None = None  # host mirror of state.step
        self._tau_value: float | None = None
        self._zeros: list | None = None  # per block: zero gradients of every op of every path (device)
        self._ones = [jnp.ones((b.n_paths,), jnp.float32) for b in spec.blocks]  # weight-step coefficients
        self._split_coeff = jax.jit(lambda c: [c[o:o + b.n_paths] for b, o in zip(spec.blocks, spec.row_offsets())])

    # ------------------------------------------------------------------------------ host side
    def _sync(self, state: TrainState) -> None:
        """Refresh the host copies (alpha, tau, step) when they may be stale: one device sync."""
        if self._alpha is None:
            self._alpha = np.asarray(jax.device_get(state.alpha), np.float32)
            self._tau_value = float(self.tau(state.arch_epochs))
        if self._step is None:
            self._step = int(state.step)
        if self._zeros is None:
            self._zeros = [[{name: jax.tree.map(jnp.zeros_like, p) for name, p in path.items()}
                            for path in blk["paths"]] for blk in state.params["blocks"]]

    def sample(self, state: TrainState) -> dict[str, Any]:
        """Host-side op choices for the next step (fetches alpha only when it may have changed)."""
        self._sync(state)
        noise = gumbel_noise(self.cfg.seed, self._step, self._alpha.shape)
        idx = np.argmax(self._alpha + noise, axis=-1).astype(np.int32)
        return {"idx": idx, "noise": noise}

    arch_sample = sample

    def after_other_arch_step(self) -> None:
        """Alpha and the step counter changed outside these steps: refetch them before the next sample."""
        self._alpha, self._step = None, None

    def _forward_backward(self, state: TrainState, x_all, y_all, perm, i, choice, coeffs):
        """Per-block dispatch (``coeffs``: one ``[n_paths]`` array per block); returns
        (loss, correct, grads tree, new stats, d coeffs per block)."""
        spec, d = self.spec, self.cfg.data
        h, stem_stats, stem_vjp, y = _stem_fwd(self.dtype, d.crop, d.flip, state.params["stem"],
                                               state.batch_stats["stem"], state.key, state.step, x_all, y_all, perm, i)
        vjps, block_stats = [], []
        for b, (block, off) in enumerate(zip(spec.blocks, spec.row_offsets())):
            ch = tuple(int(c) for c in choice["idx"][off:off + block.n_paths])
            names = [spec.ops[c] for c in ch]
            prm, old = state.params["blocks"][b], state.batch_stats["blocks"][b]
            (h, new), vjp = _block_fwd(spec.ops, block, ch, self.cfg.remat, _chosen(prm, names), _chosen(old, names),
                                       h, coeffs[b])
            vjps.append(vjp)
            block_stats.append(_merge(old, new))
        loss, correct, g_head, g_h = _head_fwd_bwd(self.cfg.optim.label_smoothing, state.params["head"], h, y)
        g_blocks, g_coeff = [None] * len(spec.blocks), []
        for b in reversed(range(len(spec.blocks))):
            g_sub, g_h, g_c = _apply_vjp(vjps[b], g_h)
            g_blocks[b] = _merge({"paths": self._zeros[b]}, g_sub)
            g_coeff.insert(0, g_c)
        (g_stem,) = _apply_vjp(stem_vjp, g_h)
        grads = {"stem": g_stem, "blocks": g_blocks, "head": g_head}
        stats = {"stem": stem_stats, "blocks": block_stats}
        return loss, correct, grads, stats, g_coeff

    def weight_step(self, state: TrainState, x_all, y_all, perm, i, choice) -> TrainState:
        self._sync(state)
        loss, correct, grads, stats, _ = self._forward_backward(state, x_all, y_all, perm, i, choice, self._ones)
        self._step += 1
        return _weight_update(self.cfg, self.steps_per_epoch, state, grads, stats, loss, correct, perm.shape[1])

    def arch_step(self, state: TrainState, x_all, y_all, perm, i, choice) -> TrainState:
        self._sync(state)
        coeff, coeff_vjp = _coeff_and_vjp(state.alpha, choice["noise"], self._tau_value, choice["idx"])
        loss, correct, _, stats, g_coeff = self._forward_backward(state, x_all, y_all, perm, i, choice,
                                                                  self._split_coeff(coeff))
        (g_alpha,) = _apply_vjp(coeff_vjp, _concat(g_coeff))
        if self._cost_table is not None:
            g_alpha = _add_cost_grad(g_alpha, state.alpha, self._cost_table, self.cfg.arch.cost_weight)
        self._step += 1
        self._alpha = None  # alpha changes: refetch before the next sample (the step is mirrored)
        return _alpha_update(self.cfg, state, g_alpha, stats, loss, correct, perm.shape[1])

    def _eval_argmax(self, state: TrainState, x_u8, y, mask):
        """Sums of (loss, correct) over the unmasked examples of one batch: argmax(alpha) op per row,
        inference mode (what the one-program ``eval_batch`` computes)."""
        spec = self.spec
        idx = np.argmax(np.asarray(jax.device_get(state.alpha)), axis=-1)
        h = _stem_eval(self.dtype, state.params["stem"], state.batch_stats["stem"], x_u8)
        for b, (block, off) in enumerate(zip(spec.blocks, spec.row_offsets())):
            ch = tuple(int(c) for c in idx[off:off + block.n_paths])
            names = [spec.ops[c] for c in ch]
            h = _block_eval(spec.ops, block, ch, _chosen(state.params["blocks"][b], names),
                            _chosen(state.batch_stats["blocks"][b], names), h)
        return _head_eval(state.params["head"], h, y, mask)


# ---------------------------------------------------------------------------------- programs (module-level
# jits, so their caches outlive one SinglePathSteps: the net rebuilt after a growth reuses them)

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stem_fwd(dtype, crop: bool, flip: bool, params, stats, key, step, x_all, y_all, perm, i):
    """Batch ``i`` of ``perm`` augmented, through the stem; returns (h, stem stats, VJP, labels)."""
    idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
    k_aug = jax.random.split(jax.random.fold_in(key, step))[0]
    x = augment_batch(k_aug, x_all[idx], crop, flip).astype(dtype)
    (h, new_stats), vjp = _vjp_aux(lambda p: conv_bn_relu(p, stats, x, 1, True), params)
    return h, new_stats, vjp, y_all[idx]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _block_fwd(ops: tuple[str, ...], block: BlockSpec, choice: tuple[int, ...], remat: bool, params, stats, h,
               coeff):
    """One block with op ``choice[p]`` on path ``p``; ``params``/``stats`` hold only the input conv and the
    chosen ops (``_chosen``). Returns (out, their new stats, VJP over (params, h, coeff)). With ``remat`` the
    block is ``jax.checkpoint``-ed: the VJP keeps only the block's inputs until the backward pass, which
    recomputes the block (``Config.remat``)."""
    spec = NetSpec("", 0, (block,), ops)

    def f(prm, inp, c):
        sels = [{"op": op, "coeff": c[p]} for p, op in enumerate(choice)]
        return apply_block(spec, block, prm, stats, inp, sels, "fixed", True)
    return _vjp_aux(jax.checkpoint(f) if remat else f, params, h, coeff)


@functools.partial(jax.jit, static_argnums=0)
def _head_fwd_bwd(label_smoothing: float, params, h, y):
    def f(p, inp):
        logits = apply_head(p, inp)
        return cross_entropy(logits, y, label_smoothing), logits
    (loss, logits), (g_head, g_h) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, h)
    correct = jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32)
    return loss, correct, g_head, g_h.astype(h.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _stem_eval(dtype, params, stats, x_u8):
    return conv_bn_relu(params, stats, normalize(x_u8).astype(dtype), 1, False)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_eval(ops: tuple[str, ...], block: BlockSpec, choice: tuple[int, ...], params, stats, h):
    spec = NetSpec("", 0, (block,), ops)
    sels = [{"op": c, "coeff": jnp.ones((), jnp.float32)} for c in choice]
    return apply_block(spec, block, params, stats, h, sels, "fixed", False)[0]


@jax.jit
def _head_eval(params, h, y, mask):
    logits = apply_head(params, h)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum((jnp.argmax(logits, -1) == y) & mask)


def _chosen(tree: dict, names: list[str]) -> dict:
    """A block's params or stats restricted to its input conv, path scale and the ops in ``names``."""
    out = {k: v for k, v in tree.items() if k != "paths"}
    out["paths"] = [{n: path[n]} for path, n in zip(tree["paths"], names)]
    return out


def _merge(full: dict, part: dict) -> dict:
    """A block tree with the entries of ``part`` (input conv, path scale, chosen ops) replaced; host-side."""
    new = {**full, **{k: v for k, v in part.items() if k != "paths"}}
    new["paths"] = [{**path, **upd} for path, upd in zip(full["paths"], part["paths"])]
    return new


def _vjp_aux(f, *primals):
    """``jax.vjp`` for ``f -> (out, aux)``: returns ((out, aux), vjp over out)."""
    out, vjp, aux = jax.vjp(f, *primals, has_aux=True)
    return (out, aux), vjp
