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

The index is an unbatched scalar per mixed op, so under ``jit`` XLA really skips the other branches.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from asose_jax.ops import OP_REGISTRY

MODES = ("dense", "single", "topk", "threshold", "argmax")


def select(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01) -> dict[str, jax.Array]:
    """Selection for one mixed op from weights ``[num_ops]`` (for argmax: the alpha row)."""
    n = weights.shape[-1]
    if mode == "dense":
        return {"coeff": weights}
    if mode == "argmax":
        return {"idx": jnp.argmax(weights)[None].astype(jnp.int32), "coeff": jnp.ones((1,), weights.dtype)}
    if mode == "single":
        idx = jnp.argmax(weights)  # weights is a hard straight-through sample: w[idx] == 1 forward
        return {"idx": idx[None].astype(jnp.int32), "coeff": weights[idx][None]}
    if mode == "topk":
        vals, idx = lax.top_k(weights, k)
        return {"idx": idx.astype(jnp.int32), "coeff": vals / jnp.sum(vals)}
    if mode == "threshold":
        _, top_idx = lax.top_k(weights, min(k, n))
        in_top = jnp.zeros((n,), bool).at[top_idx].set(True)
        keep = in_top & (weights >= threshold)
        keep = keep.at[jnp.argmax(weights)].set(True)  # never drop every op
        w = jnp.where(keep, weights, 0.0)
        return {"keep": keep, "coeff": w / jnp.sum(w)}
    raise ValueError(f"unknown mixed-op mode {mode!r}")


def select_rows(weights: jax.Array, mode: str, k: int = 3, threshold: float = 0.01):
    """``select`` vmapped over rows: ``[rows, num_ops]`` -> selection with a leading rows axis."""
    return jax.vmap(lambda w: select(w, mode, k, threshold))(weights)


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
