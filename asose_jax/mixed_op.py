"""The mixed op: a weighted combination of primitives that computes only the ops it needs.

``select(weights, mode, k, threshold)`` turns one row of op weights ``[num_ops]`` into a *selection*:
scalar op indices and their coefficients. ``apply`` runs exactly the selected ops:

| mode        | ops computed | how                                                             |
|-------------|--------------|-----------------------------------------------------------------|
| `dense`     | all          | sum_i w_i op_i(x)                                               |
| `single`    | 1            | `lax.switch` on the hard (straight-through) sample; y * w[idx]  |
| `topk`      | k            | `lax.top_k`, then k `lax.switch` calls; weights renormalised    |
| `threshold` | <= k         | ops under the threshold (or outside the top k) skipped by `lax.cond` |
| `argmax`    | 1            | `lax.switch` on argmax(alpha); coefficient 1 (inference)        |
| `fixed`     | 1            | op index static at trace time (used by `single_path`)          |

The index is an unbatched scalar per mixed op, so under ``jit`` XLA really skips the other branches.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from asose_jax.ops import OP_REGISTRY

MODES = ("dense", "single", "topk", "threshold", "argmax")


def choose(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01) -> jax.Array:
    """Which ops run, from one row of weights ``[num_ops]``: int32 indices ``[k]`` (switch modes; 1 for
    single/argmax), a bool keep-mask ``[num_ops]`` (threshold), or a dummy ``[1]`` (dense)."""
    n = weights.shape[-1]
    if mode == "dense":
        return jnp.zeros((1,), jnp.int32)
    if mode in ("single", "argmax"):
        return jnp.argmax(weights)[None].astype(jnp.int32)
    if mode == "topk":
        return lax.top_k(weights, k)[1].astype(jnp.int32)
    if mode == "threshold":
        _, top_idx = lax.top_k(weights, min(k, n))
        keep = jnp.zeros((n,), bool).at[top_idx].set(True) & (weights >= threshold)
        return keep.at[jnp.argmax(weights)].set(True)  # never drop every op
    raise ValueError(f"unknown mixed-op mode {mode!r}")


def select(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01, choice=None) -> dict[str, jax.Array]:
    """Selection for one mixed op: ``choice`` (from :func:`choose`; computed here when None) plus the
    coefficients, differentiable in ``weights`` (for argmax: the alpha row, coefficient 1).

    Passing a precomputed ``choice`` keeps the branch index an input of the compiled step, so XLA's
    conditionals need not wait for in-step sampling (see docs/benchmarks.md)."""
    if mode == "dense":
        return {"coeff": weights}
    if choice is None:
        choice = choose(lax.stop_gradient(weights), mode, k, threshold)
    if mode == "argmax":
        return {"idx": choice, "coeff": jnp.ones(choice.shape, weights.dtype)}
    if mode == "single":  # weights is a hard straight-through sample: w[idx] == 1 forward, soft gradient
        return {"idx": choice, "coeff": weights[choice]}
    if mode == "topk":
        vals = weights[choice]
        return {"idx": choice, "coeff": vals / jnp.sum(vals)}
    if mode == "threshold":
        w = jnp.where(choice, weights, 0.0)
        return {"keep": choice, "coeff": w / jnp.sum(w)}
    raise ValueError(f"unknown mixed-op mode {mode!r}")


def choose_rows(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01) -> jax.Array:
    """``choose`` vmapped over rows ``[rows, num_ops]``."""
    return jax.vmap(lambda w: choose(w, mode, k, threshold))(weights)


def select_rows(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01, choices=None):
    """``select`` vmapped over rows: ``[rows, num_ops]`` -> selection with a leading rows axis."""
    if choices is None:
        return jax.vmap(lambda w: select(w, mode, k, threshold))(weights)
    return jax.vmap(lambda w, c: select(w, mode, k, threshold, c))(weights, choices)


def _branch(name: str, stride: int, train: bool):
    op = OP_REGISTRY[name]

    def run(params, stats, x):
        y, s = op.apply(params[name], stats[name], x, stride, train)
        return y, {**stats, name: s}
    return run


def apply(ops: tuple[str, ...], stride: int, params: dict, stats: dict, x: jax.Array,
          sel: dict[str, jax.Array], mode: str, train: bool) -> tuple[jax.Array, dict[str, Any]]:
    """Run the mixed op on ``x`` ``[N, H, W, C]``; returns ``(y [N, H/s, W/s, C], new stats)``."""
    branches = [_branch(name, stride, train) for name in ops]
    if mode == "fixed":  # op index known at trace time (host-dispatched single path): no conditional
        y, stats = branches[sel["op"]](params, stats, x)
        return sel["coeff"].astype(y.dtype) * y, stats
    if mode == "dense":
        y, new_stats = None, dict(stats)
        for i, run in enumerate(branches):
            yi, s = run(params, stats, x)
            new_stats[ops[i]] = s[ops[i]]
            term = sel["coeff"][i].astype(yi.dtype) * yi
            y = term if y is None else y + term
        return y, new_stats
    if mode == "threshold":
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
    # single / topk / argmax: one scalar switch per chosen op
    y = None
    for j in range(sel["idx"].shape[0]):
        yj, stats = lax.switch(sel["idx"][j], branches, params, stats, x)
        term = sel["coeff"][j].astype(yj.dtype) * yj
        y = term if y is None else y + term
    return y, stats
