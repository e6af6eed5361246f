"""Architecture parameters: logits alpha ``[rows, num_ops]`` (one row per mixed op), batched
Gumbel-softmax and entropy (``vmap`` over rows), and genotype derivation. The temperature schedule is
``train_state.tau_schedule``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from asose_jax.ops import OP_REGISTRY


def init_alpha(key: jax.Array, rows: int, num_ops: int, scale: float) -> jax.Array:
    """alpha ~ scale * N(0, 1), float32 ``[rows, num_ops]``."""
    return scale * jax.random.normal(key, (rows, num_ops), jnp.float32)


def straight_through(soft: jax.Array, idx: jax.Array) -> jax.Array:
    """Hard weights ``[..., ops]``: the one-hot of ``idx`` ``[...]`` forward, the gradient of ``soft``."""
    one_hot = jax.nn.one_hot(idx, soft.shape[-1], dtype=soft.dtype)
    return one_hot - jax.lax.stop_gradient(soft) + soft


def gumbel_softmax(key: jax.Array, alpha: jax.Array, tau: jax.Array, hard: bool) -> jax.Array:
    """Independent Gumbel-softmax samples for every row of ``alpha`` ``[rows, ops]`` -> ``[rows, ops]``, row ``r``'s
    noise from ``split(key, rows)[r]``; hard = one-hot forward, soft gradient (straight-through)."""
    g = jax.vmap(lambda k: jax.random.gumbel(k, alpha.shape[1:], jnp.float32))(jax.random.split(key, alpha.shape[0]))
    soft = jax.nn.softmax((alpha + g) / tau, axis=-1)
    return straight_through(soft, jnp.argmax(soft, axis=-1)) if hard else soft


def arch_weights(key: jax.Array, alpha: jax.Array, tau: jax.Array, sampling: str) -> jax.Array:
    """Op weights ``[rows, ops]`` for one step: ``hard``/``soft`` Gumbel, or ``softmax`` of alpha/tau."""
    if sampling == "softmax":
        return jax.nn.softmax(alpha / tau, axis=-1)
    return gumbel_softmax(key, alpha, tau, hard=(sampling == "hard"))


def entropy(alpha: jax.Array) -> jax.Array:
    """Entropy (nats) of softmax(alpha) per row ``[rows]``; stable for any finite logits."""
    logp = jax.nn.log_softmax(alpha, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def derive_genotype(alpha, ops: tuple[str, ...], exclude_none: bool = True,
                    max_parameter_free: int = -1) -> list[str]:
    """argmax op name per row (``none`` skipped when ``exclude_none`` and another op exists).

    ``max_parameter_free >= 0`` caps the rows that pick a parameter-free op (none, pools, skip): the rows
    whose parameter-free choice leads its best parametric op by the smallest logit margin switch to
    that op (a collapse guard, as in DARTS-style searches)."""
    a = np.array(alpha, dtype=np.float64)
    if exclude_none and "none" in ops and len(ops) > 1:
        a[:, ops.index("none")] = -np.inf
    choice = np.argmax(a, axis=-1)
    free = np.array([OP_REGISTRY[op].parameter_free for op in ops])
    if max_parameter_free >= 0 and not free.all():
        rows = [r for r in range(a.shape[0]) if free[choice[r]]]
        best_param = {r: int(np.argmax(np.where(free, -np.inf, a[r]))) for r in rows}
        rows.sort(key=lambda r: a[r, choice[r]] - a[r, best_param[r]], reverse=True)
        for r in rows[max_parameter_free:]:
            choice[r] = best_param[r]
    return [ops[int(i)] for i in choice]
