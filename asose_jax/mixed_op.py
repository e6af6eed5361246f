"""The mixed op: a weighted combination of primitives that computes only the ops it needs.

Each *mode* is one :class:`Mode` in ``MODES``, whose ``apply`` runs exactly the ops its selection names:

| mode        | ops computed | how                                                             |
|-------------|--------------|-----------------------------------------------------------------|
| `dense`     | all          | sum_i w_i op_i(x)                                               |
| `single`    | 1            | `lax.switch` on the hard (straight-through) sample; y * w[idx]  |
| `topk`      | k            | `lax.top_k`, then k `lax.switch` calls; weights renormalised    |
| `threshold` | <= k         | ops under the threshold (or outside the top k) skipped by `lax.cond` |
| `argmax`    | 1            | `lax.switch` on argmax(alpha); coefficient 1 (inference)        |
| `routed`    | 1 per image  | batch permuted, split in K static groups, group k through op k   |
| `fixed`     | 1            | op index static at trace time (host-dispatched single path, final net) |

``fixed`` (:data:`FIXED`) is not in ``MODES``: a config cannot name it. ``routed`` does not choose from the
weights: its ``draw`` takes a permutation of the batch per row from the step's key (see :func:`_apply_routed`).

The index is an unbatched scalar per mixed op, so under ``jit`` XLA really skips the other branches.
The switch modes run through :func:`switched`, whose backward pass recomputes the chosen op inside a second
switch rather than keeping residuals (see there).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from asose_jax.ops import OP_REGISTRY
from asose_jax.parallel import spread


@dataclass(frozen=True)
class Mode:
    """One mixed-op mode.

    ``choose(weights [num_ops], k, threshold) -> choice``; ``select(weights, choice) -> selection``, differentiable
    in ``weights``; ``apply(ops, stride, params, stats, x, selection, train) -> (y, new stats)``.
    ``sampling``: the Gumbel samples a training step draws its weights from (``hard``: one-hot forward with the
    straight-through gradient; ``soft``). ``eval_weights(alpha [rows, ops]) -> weights``: what evaluation and
    the growth check feed ``select``. ``host_dispatch``: under ``mixed_op.dispatch=host`` the host-dispatched
    engine (``single_path``) runs the steps. ``trainable``: alpha gets a gradient through the mode, so it may be
    ``mixed_op.arch_mode``. ``draw(key, batch) -> choice``: set for a mode whose choices come from the step's
    key alone, not from the weights (``choose`` is then None); such a mode trains only weights and cannot
    evaluate."""
    name: str
    choose: Callable[..., jax.Array] | None
    select: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None
    apply: Callable[..., tuple[jax.Array, dict[str, Any]]]
    sampling: str = "soft"
    eval_weights: Callable[[jax.Array], jax.Array] = functools.partial(jax.nn.softmax, axis=-1)
    host_dispatch: bool = False
    trainable: bool = True
    draw: Callable[[jax.Array, int], jax.Array] | None = None


# ---------------------------------------------------------------------------------------------- choose

def _choose_every_op(weights, k, threshold):
    """A dummy ``[1]``: every op runs."""
    return jnp.zeros((1,), jnp.int32)


def _choose_argmax(weights, k, threshold):
    return jnp.argmax(weights)[None].astype(jnp.int32)


def _choose_top_k(weights, k, threshold):
    return lax.top_k(weights, k)[1].astype(jnp.int32)


def _draw_permutation(key, batch):
    """``[batch]`` int32: position j of the routed batch holds image ``perm[j]``."""
    return jax.random.permutation(key, batch).astype(jnp.int32)


def _choose_above_threshold(weights, k, threshold):
    """A bool keep-mask ``[num_ops]``: the top k that reach ``threshold``, and the argmax in any case."""
    n = weights.shape[-1]
    _, top_idx = lax.top_k(weights, min(k, n))
    keep = jnp.zeros((n,), bool).at[top_idx].set(True) & (weights >= threshold)
    return keep.at[jnp.argmax(weights)].set(True)  # never drop every op


# ---------------------------------------------------------------------------------------------- select

def _select_weighted(weights, choice):
    return {"coeff": weights}


def _select_sampled(weights, choice):
    """``weights`` is a hard straight-through sample: ``w[idx] == 1`` forward, with the soft gradient."""
    return {"idx": choice, "coeff": weights[choice]}


def _select_renormalised(weights, choice):
    vals = weights[choice]
    return {"idx": choice, "coeff": vals / jnp.sum(vals)}


def _select_kept(weights, choice):
    w = jnp.where(choice, weights, 0.0)
    return {"keep": choice, "coeff": w / jnp.sum(w)}


def _select_unit(weights, choice):
    return {"idx": choice, "coeff": jnp.ones(choice.shape, weights.dtype)}


def _select_route(weights, choice):
    """Coefficient 1: the weights play no part (alpha gets no gradient)."""
    return {"perm": choice}


# ---------------------------------------------------------------------------------------------- apply

def _branch(name: str, stride: int, train: bool):
    op = OP_REGISTRY[name]

    def run(params, stats, x):
        y, s = op.apply(params[name], stats[name], x, stride, train)
        return y, {**stats, name: s}
    return run


def _apply_fixed(ops, stride, params, stats, x, sel, train):
    """``sel["op"]``: a Python int, known at trace time, so no conditional."""
    y, stats = _branch(ops[sel["op"]], stride, train)(params, stats, x)
    return sel["coeff"].astype(y.dtype) * y, stats


def _apply_every_op(ops, stride, params, stats, x, sel, train):
    y, new_stats = None, dict(stats)
    for i, name in enumerate(ops):
        yi, s = _branch(name, stride, train)(params, stats, x)
        new_stats[name] = s[name]
        term = sel["coeff"][i].astype(yi.dtype) * yi
        y = term if y is None else y + term
    return y, new_stats


def _apply_kept(ops, stride, params, stats, x, sel, train):
    """One ``lax.cond`` per op on ``sel["keep"]``."""
    branches = [_branch(name, stride, train) for name in ops]
    out_shape = jax.eval_shape(lambda p, s, a: branches[0](p, s, a)[0], params, stats, x)
    y = jnp.zeros(out_shape.shape, out_shape.dtype)
    for i, run in enumerate(branches):
        def take(p, s, a, run=run, c=sel["coeff"][i]):
            yi, s2 = run(p, s, a)
            return c.astype(yi.dtype) * yi, s2

        def skip(p, s, a):
            return jnp.zeros(out_shape.shape, out_shape.dtype), s
        yi, stats = lax.cond(sel["keep"][i], take, skip, params, stats, x)
        y = y + yi
    return y, stats


def _apply_switched(ops, stride, params, stats, x, sel, train):
    """One scalar :func:`switched` per chosen op ``sel["idx"][j]``."""
    run = switched(tuple(ops), stride, train)
    y = None
    for j in range(sel["idx"].shape[0]):
        yj, stats = run(sel["idx"][j], params, stats, x)
        term = sel["coeff"][j].astype(yj.dtype) * yj
        y = term if y is None else y + term
    return y, stats


def group_bounds(batch: int, num_ops: int) -> list[tuple[int, int]]:
    """``[start, end)`` of op k's group in the routed batch: sizes ``batch // num_ops``, the first
    ``batch % num_ops`` groups one image larger (static, so every shape is known at trace time)."""
    size, extra = divmod(batch, num_ops)
    ends = [(k + 1) * size + min(k + 1, extra) for k in range(num_ops)]
    return list(zip([0] + ends[:-1], ends))


def _apply_routed(ops, stride, params, stats, x, sel, train):
    """Every image through one op: ``x`` permuted by ``sel["perm"]`` ``[N]``, group k of :func:`group_bounds`
    through op k alone (its BN normalises over that group and its running statistics see only that group), the
    outputs put back in the original order. Coefficient 1; no conditional. An op whose group is empty
    (``N < num_ops``) does not run: its statistics stay, its weights get no gradient. On a mesh of devices each
    group is split over it (:func:`asose_jax.parallel.spread`): else XLA computes every group on every device."""
    perm = sel["perm"]
    xp = jnp.take(x, perm, axis=0, unique_indices=True)
    parts, new_stats = [], dict(stats)
    for name, (lo, hi) in zip(ops, group_bounds(x.shape[0], len(ops))):
        if hi > lo:
            y, s = _branch(name, stride, train)(params, stats, spread(xp[lo:hi]))
            parts.append(spread(y))
            new_stats[name] = s[name]
    yp = jnp.concatenate(parts)
    return jnp.zeros_like(yp).at[perm].set(yp, unique_indices=True), new_stats


# ---------------------------------------------------------------------------------------------- the modes

MODES: dict[str, Mode] = {
    "dense": Mode("dense", _choose_every_op, _select_weighted, _apply_every_op),
    "single": Mode("single", _choose_argmax, _select_sampled, _apply_switched, sampling="hard", host_dispatch=True),
    "topk": Mode("topk", _choose_top_k, _select_renormalised, _apply_switched),
    "threshold": Mode("threshold", _choose_above_threshold, _select_kept, _apply_kept),
    "argmax": Mode("argmax", _choose_argmax, _select_unit, _apply_switched, eval_weights=lambda alpha: alpha,
                   trainable=False),
    "routed": Mode("routed", None, _select_route, _apply_routed, sampling="softmax", trainable=False,
                   draw=_draw_permutation),
}
FIXED = Mode("fixed", None, None, _apply_fixed)


def mode_named(name: str) -> Mode:
    """The :class:`Mode` called ``name``: one of ``MODES``, or ``fixed``."""
    if name == FIXED.name:
        return FIXED
    if name not in MODES:
        raise ValueError(f"unknown mixed-op mode {name!r} (known: {', '.join(MODES)}, fixed)")
    return MODES[name]


def choose(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01) -> jax.Array:
    """Which ops run, from one row of weights ``[num_ops]``: int32 indices ``[k]`` (switch modes; 1 for
    single/argmax), a bool keep-mask ``[num_ops]`` (threshold), or a dummy ``[1]`` (dense)."""
    return mode_named(mode).choose(weights, k, threshold)


def select(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01, choice=None) -> dict[str, jax.Array]:
    """Selection for one mixed op: ``choice`` (from :func:`choose`; computed here when None) plus the
    coefficients, differentiable in ``weights`` (for argmax: the alpha row, coefficient 1).

    Passing a precomputed ``choice`` keeps the branch index an input of the compiled step, so XLA's
    conditionals need not wait for in-step sampling (see docs/benchmarks.md)."""
    m = mode_named(mode)
    if choice is None:
        if m.choose is None:
            raise ValueError(f"mixed-op mode {mode!r} draws its choices from a key (draw_rows): pass choice")
        choice = m.choose(lax.stop_gradient(weights), k, threshold)
    return m.select(weights, choice)


def choose_rows(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01) -> jax.Array:
    """``choose`` vmapped over rows ``[rows, num_ops]``."""
    return jax.vmap(lambda w: choose(w, mode, k, threshold))(weights)


def draw_rows(key: jax.Array, rows: int, mode: str, batch: int) -> jax.Array:
    """The choices of a mode with ``draw``, one per row from ``fold_in(key, row)``: ``[rows, ...]`` (routed:
    ``[rows, batch]`` permutations)."""
    draw = mode_named(mode).draw
    return jax.vmap(lambda r: draw(jax.random.fold_in(key, r), batch))(jnp.arange(rows))


def select_rows(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01, choices=None):
    """``select`` vmapped over rows: ``[rows, num_ops]`` -> selection with a leading rows axis."""
    if choices is None:
        return jax.vmap(lambda w: select(w, mode, k, threshold))(weights)
    return jax.vmap(lambda w, c: select(w, mode, k, threshold, c))(weights, choices)


def apply(ops: tuple[str, ...], stride: int, params: dict, stats: dict, x: jax.Array,
          sel: dict[str, jax.Array], mode: str, train: bool) -> tuple[jax.Array, dict[str, Any]]:
    """Run the mixed op of ``mode`` (a name in ``MODES``, or ``fixed``) on ``x`` ``[N, H, W, C]``; returns
    ``(y [N, H/s, W/s, C], new stats)``."""
    return mode_named(mode).apply(ops, stride, params, stats, x, sel, train)


# ---------------------------------------------------------------------------------------------- switched op

def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _pack(tree, length: int) -> jax.Array:
    """The leaves of ``tree`` as one float32 vector ``[length]`` (zero-padded)."""
    leaves = [leaf.reshape(-1).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
    flat = jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)
    return jnp.pad(flat, (0, length - flat.shape[0]))


def _unpack(flat: jax.Array, like):
    """Inverse of :func:`_pack`: a tree shaped and typed like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    out, at = [], 0
    for leaf in leaves:
        n = math.prod(leaf.shape)
        out.append(flat[at:at + n].reshape(leaf.shape).astype(leaf.dtype))
        at += n
    return jax.tree.unflatten(treedef, out)


def _pick(idx: jax.Array, flat: jax.Array, trees: dict, names: tuple[str, ...], other) -> dict:
    """Per op ``names[k]``: ``flat`` unpacked where ``idx == k``, else ``other(tree)``."""
    return {n: jax.tree.map(lambda new, old, k=k: jnp.where(idx == k, new, other(old)), _unpack(flat, trees[n]),
                            trees[n]) for k, n in enumerate(names)}


@functools.cache
def switched(ops: tuple[str, ...], stride: int, train: bool):
    """``(idx, params, stats, x) -> (y, new stats)``: op ``ops[idx]`` through one ``lax.switch``.

    ``lax.switch`` differentiated by JAX makes every branch return the union of all branches' residuals (zero-filled
    where the branch is not taken), the new statistics of every op and, backward, the gradient of every op's weights
    (zeros for the others): XLA copies or fills each of these buffers at every conditional (docs/benchmarks.md
    counts them). Here the forward branches return only ``y`` and the chosen op's statistics packed into one vector,
    and a custom VJP recomputes the chosen op inside a second switch, which returns ``dx`` and the op's weight
    gradient packed into one vector; the per-op values are unpacked outside the conditionals. Same values and
    gradients as the plain switch (tests/test_mixed_op.py)."""
    n_ops = len(ops)

    def forward(idx, params, stats, x):
        s_len = max(_size(stats[n]) for n in ops) if train else 0

        def branch(k):
            def run(p, s, a):
                y, new = OP_REGISTRY[ops[k]].apply(p[ops[k]], s[ops[k]], a, stride, train)
                return y, _pack(new, s_len) if train else jnp.zeros((0,), jnp.float32)
            return run
        y, s_flat = lax.switch(idx, [branch(k) for k in range(n_ops)], params, stats, x)
        return y, (_pick(idx, s_flat, stats, ops, lambda old: old) if train else stats)

    @jax.custom_vjp
    def run(idx, params, stats, x):
        return forward(idx, params, stats, x)

    def run_fwd(idx, params, stats, x):
        return forward(idx, params, stats, x), (idx, params, stats, x)

    def run_bwd(res, cts):
        idx, params, stats, x = res
        g_y = cts[0]
        p_len = max(_size(params[n]) for n in ops)

        def branch(k):
            def run_k(p, s, a, g):
                def f(pk, ak):
                    return OP_REGISTRY[ops[k]].apply(pk, s[ops[k]], ak, stride, train)[0]
                _, vjp = jax.vjp(f, p[ops[k]], a)
                g_p, g_a = vjp(g)
                return _pack(g_p, p_len), g_a
            return run_k
        g_flat, g_x = lax.switch(idx, [branch(k) for k in range(n_ops)], params, stats, x, g_y)
        return None, _pick(idx, g_flat, params, ops, jnp.zeros_like), None, g_x

    run.defvjp(run_fwd, run_bwd)
    return run
