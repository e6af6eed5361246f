"""Function-preserving network growth: pure transforms ``(spec, state) -> (spec', state')``.

Every transform returns a new NetSpec and TrainState whose network computes the same logits: always in inference
mode with the ``argmax`` selection (the search's evaluation), and for ``widen``, ``branch`` and ``deepen`` on
``resnet`` in every mixed-op mode given the same selection of the untouched rows (``deepen`` on ``original``:
see :func:`deepen`). Stochastic modes draw one Gumbel sample per row from ``split(key, rows)``, so with another
row count the samples differ.

Optimizer states go through the very transform of the parameters (:func:`transfer_opt_state`), so momentum, the
LR schedule position and Adam's bias correction survive growth and nothing is reset silently. New weights come
from ``model.init_block`` / ``model.init_path`` with initial BN statistics; ``key``, ``step``, ``arch_epochs``,
``cycle``, ``phase`` and ``sums`` are unchanged. Inputs are never modified; outputs are jax arrays.

Each kind is one :class:`Growth` in ``GROWTHS``, which ``grow``, ``feasible_kinds``, the config check and the
policy read: a new kind is one entry there.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from asose_jax import mixed_op
from asose_jax.config import GrowthConfig
from asose_jax.model import NetSpec, apply_network, count_params, init_block, init_path, skeleton_block
from asose_jax.ops import DEPTHWISE, FULL, OP_REGISTRY, REDUCE_HIGH, REDUCE_LOW, host_rng

NEW_ROW_SCALE = 0.1  # new alpha rows ~ NEW_ROW_SCALE * N(0, 1)

Transfer = Callable[[Any, Any], Any]
"""``transfer(old_tree, new_parts) -> new_tree``: maps a tree shaped like the *old* parameters to one
shaped like the *new* parameters; ``new_parts`` supplies the values of the new leaves (fresh weights
for the parameters themselves, zeros for optimizer moments)."""


# ---------------------------------------------------------------------------------------------- optimizer state

def _is_params_like(node, params) -> bool:
    """Whether ``node`` has exactly the tree structure and leaf shapes of ``params``."""
    return (jax.tree.structure(node) == jax.tree.structure(params)
            and [np.shape(x) for x in jax.tree.leaves(node)] == [np.shape(x) for x in jax.tree.leaves(params)])


def transfer_opt_state(opt_state, old_params, transfer: Transfer, new_parts=None):
    """Carry an optax state over a parameter transform.

    Walks ``opt_state`` (NamedTuples, tuples, lists, dicts): every sub-tree with the structure and leaf
    shapes of ``old_params`` (SGD ``trace``, Adam ``mu``/``nu``, ...) becomes
    ``transfer(sub_tree, zeros_like(new_parts))`` -- the same map the parameters went through, zeros
    for the new leaves; scalar leaves (``count``) are copied; any other array leaf raises ``ValueError``.
    """
    zeros = jax.tree.map(jnp.zeros_like, new_parts)

    def walk(node):
        if _is_params_like(node, old_params):
            return transfer(node, zeros)
        if node is None:
            return None
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # NamedTuple optax states
            return type(node)(*(walk(c) for c in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(c) for c in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if hasattr(node, "shape") and np.ndim(node) == 0:  # count, scalar hyper-parameters
            return node
        raise ValueError(f"cannot carry optimizer-state leaf {type(node).__name__} shape {np.shape(node)} "
                         "over the growth transform (not parameter-shaped and not a scalar)")

    return walk(opt_state)


def _insert_row(r: int) -> Transfer:
    """Alpha-shaped transfer: ``new_row`` ``[1, ops]`` inserted before old row ``r``."""
    return lambda old, new_row: jnp.concatenate([old[:r], jnp.asarray(new_row, old.dtype), old[r:]])


def _finish(state, params, stats, alpha, w_transfer: Transfer, w_new, a_transfer: Transfer, a_new):
    """The new TrainState: weights/alpha already transformed; optimizer states carried."""
    w_opt = transfer_opt_state(state.w_opt, state.params, w_transfer, w_new)
    a_opt = transfer_opt_state(state.a_opt, state.alpha, a_transfer, a_new)
    return state.replace(params=params, batch_stats=stats, alpha=alpha, w_opt=w_opt, a_opt=a_opt)


# ---------------------------------------------------------------------------------------------- structure

def channels_at(spec: NetSpec, position: int) -> int:
    """Channels of the activation entering block ``position`` (``len(blocks)``: entering the head)."""
    return spec.stem_channels if position == 0 else spec.blocks[position - 1].c_out


@dataclass(frozen=True)
class Stage:
    """A maximal run of layers at one channel count.

    ``producer``: -1 for the stem, else the block whose input conv creates the width; ``blocks``: the
    blocks whose mixed ops run at this width (the producer block included); ``consumer``: the block
    whose input conv reads the stage output, or None for the head."""
    producer: int
    blocks: tuple[int, ...]
    channels: int
    consumer: int | None


def stages(spec: NetSpec) -> list[Stage]:
    out: list[Stage] = []
    producer, members, c = -1, [], spec.stem_channels
    for i, b in enumerate(spec.blocks):
        if b.input_conv:
            out.append(Stage(producer, tuple(members), c, i))
            producer, members, c = i, [i], b.c_out
        else:
            if b.c_in != c or b.c_out != c:
                raise ValueError(f"block {i} has no input conv but maps {b.c_in} -> {b.c_out} channels (stage width {c})")
            members.append(i)
    out.append(Stage(producer, tuple(members), c, None))
    return out


# ---------------------------------------------------------------------------------------------- deepen

def _skip_row(alpha: jax.Array, ops: tuple[str, ...], skip_prob: float) -> jax.Array:
    """Every entry ``m = mean(alpha)``, ``skip_connect`` = ``max(max(alpha) + 1, m + log(p / (1 - p) * (n - 1)))``
    (``n`` ops, ``p = skip_prob``).

    Skip is the argmax by >= 1 logit (the exact identity in ``argmax`` mode) and ``softmax(row)[skip] >= p``:
    the probability that a training step's hard Gumbel sample, ``argmax(alpha + g)`` at any tau, picks it.
    A margin of 1 alone gives ``e / (e + n - 1)``, 0.23 for 10 ops: most training steps would route the
    no-residual chain through a fresh op (or ``none``), and the alpha LR cannot close a gap of that size."""
    a = jnp.asarray(alpha, jnp.float32)
    mean, top = (jnp.mean(a), jnp.max(a)) if a.size else (0.0, 0.0)
    n = len(ops)
    margin = math.log(skip_prob / (1 - skip_prob) * (n - 1)) if n > 1 else -math.inf
    skip = jnp.maximum(top + 1.0, mean + margin)
    return jnp.full((n,), mean, jnp.float32).at[ops.index("skip_connect")].set(skip)


def deepen(spec: NetSpec, state, position: int, key: jax.Array,
           skip_prob: float = GrowthConfig.deepen_skip_prob):
    """Insert a new block at index ``position`` (0..len(blocks)) that computes the identity.

    The block has ``c_in = c_out = channels_at(spec, position)``, stride 1, no input conv, one path,
    weights from ``model.init_block`` (BN stats initial).

    * ``resnet``: a normal residual block whose ``path_scale`` is 0: ``y = h + 0 * mixed(h) = h``, exact in
      every mode; its alpha row is ``0.1 * N(0, 1)``.
    * ``original`` (no residual): the alpha row has every entry ``mean(alpha)`` and ``skip_connect`` the
      argmax by >= 1 logit, which is the exact identity at stride 1 in ``argmax`` mode; its logit is also
      high enough that training steps sample it with probability >= ``skip_prob`` (``softmax(row)``,
      see :func:`_skip_row`), so the new block starts as the identity in most training steps too.
      Raises ``ValueError`` if the op set lacks ``skip_connect`` or ``skip_prob`` is outside (0, 1).
    """
    position = int(position)
    if not 0 <= position <= len(spec.blocks):
        raise ValueError(f"deepen position {position} outside 0..{len(spec.blocks)}")
    if spec.skeleton == "original":
        if "skip_connect" not in spec.ops:
            raise ValueError("deepen on the 'original' skeleton needs 'skip_connect' in the op set "
                             f"(ops: {', '.join(spec.ops)})")
        if not 0 < skip_prob < 1:
            raise ValueError(f"deepen skip_prob {skip_prob} outside (0, 1)")
    c = channels_at(spec, position)
    block = skeleton_block(spec.skeleton, c, c, 1)  # no input conv; residual on resnet only
    new_spec = dataclasses.replace(spec, blocks=spec.blocks[:position] + (block,) + spec.blocks[position:])
    k_w, k_a = jax.random.split(key)
    bp, bs = init_block(k_w, new_spec, block, path_scale_init=0.0)
    if block.residual:
        new_row = NEW_ROW_SCALE * jax.random.normal(k_a, (len(spec.ops),), jnp.float32)
    else:
        new_row = _skip_row(state.alpha, spec.ops, skip_prob)

    def w_transfer(tree, new_block):
        blocks = list(tree["blocks"])
        blocks.insert(position, new_block)
        return {**tree, "blocks": blocks}

    r = (spec.row_offsets() + (spec.num_rows,))[position]
    a_transfer = _insert_row(r)
    params = w_transfer(state.params, bp)
    stats = w_transfer(state.batch_stats, bs)
    alpha = a_transfer(state.alpha, new_row[None])
    return new_spec, _finish(state, params, stats, alpha, w_transfer, bp, a_transfer, new_row[None])


# ---------------------------------------------------------------------------------------------- widen

def widen_mapping(c: int, c_new: int, key: jax.Array) -> np.ndarray:
    """Net2Wider channel map ``g``: new channel -> old channel (host int array ``[c_new]``).

    Grouped for FactorizedReduce (whose output is ``concat(conv1 -> first c//2, conv2 -> the rest)``):
    new channels ``[0, c_new//2)`` map to old ``[0, c//2)`` (first the old ones in order, then random
    replicas of them) and ``[c_new//2, c_new)`` to old ``[c//2, c)`` likewise. Every old channel appears
    at least once. Deterministic in ``key``."""
    if c < 2 or c_new < c:
        raise ValueError(f"cannot widen {c} -> {c_new} channels (need 2 <= c <= c_new)")
    h, h_new = c // 2, c_new // 2
    rng = host_rng(key)
    extra_a = rng.integers(0, h, h_new - h)
    extra_b = rng.integers(h, c, (c_new - h_new) - (c - h))
    return np.concatenate([np.arange(h), extra_a, np.arange(h, c), extra_b]).astype(np.int32)


def widened_channels(c: int, factor: float) -> int:
    """``ceil(c * factor)`` (rounded to 6 decimals first so 10 * 1.1 gives 11), at least ``c + 1``."""
    if not factor > 1.0:
        raise ValueError(f"widen factor must be > 1, got {factor}")
    return max(c + 1, math.ceil(round(c * factor, 6)))


class _Widener:
    """The index maps of one Net2Wider step: ``g`` (new -> old channel, every old channel at least once, see
    :func:`widen_mapping`) and ``div``, the replica count of each new channel's source. The weights it maps were
    made for the stage's width by ``OpDef.init`` and the spec (and the tests widen every registered op), so their
    shapes are not checked again."""

    def __init__(self, c: int, g: np.ndarray):
        self.g, self.h, self.h_new = np.asarray(g), c // 2, len(g) // 2
        self.div = np.asarray(np.bincount(self.g, minlength=c)[self.g], np.float32)

    def out(self, w):
        """Output channels (last axis) by g: conv output columns, BN scale/bias/mean/var, depthwise filters."""
        return jnp.take(jnp.asarray(w), self.g, axis=-1)

    def inp(self, w, axis: int):
        """Input channels on ``axis`` by g, divided by the replica count (consumers of the stage)."""
        w = jnp.take(jnp.asarray(w), self.g, axis=axis)
        shape = [1] * w.ndim
        shape[axis] = len(self.g)
        return w / jnp.asarray(self.div.reshape(shape), w.dtype)

    def full(self, w):
        """A C -> C conv inside the stage: in by g / cnt, out by g."""
        return self.out(self.inp(w, 2))

    def reduce_low(self, w):
        """FactorizedReduce conv1 (-> old [0, c//2)): in by g / cnt, out by the first half of g."""
        return jnp.take(self.inp(w, 2), self.g[:self.h_new], axis=-1)

    def reduce_high(self, w):
        """FactorizedReduce conv2 (-> old [c//2, c)): in by g / cnt, out by the second half of g."""
        return jnp.take(self.inp(w, 2), self.g[self.h_new:] - self.h, axis=-1)

    def op_params(self, op: str, p: dict) -> dict:
        """The weights of op ``op``, each by its ``OpDef.channel_roles`` entry."""
        roles = OP_REGISTRY[op].channel_roles
        rules = {DEPTHWISE: self.out, FULL: self.full, REDUCE_LOW: self.reduce_low, REDUCE_HIGH: self.reduce_high}
        new = {}
        for name, w in p.items():
            if roles.get(name) not in rules:
                raise ValueError(f"widen: no channel rule for parameter {op}.{name}")
            new[name] = rules[roles[name]](w)
        return new

    def stats(self, tree):
        """Per-channel BN statistics (any nesting) by g."""
        return jax.tree.map(self.out, tree)

    def conv_bn_out(self, p: dict) -> dict:
        """A producer conv-BN(affine): output columns and scale/bias by g."""
        return {**p, "w": self.out(p["w"]), "scale": self.out(p["scale"]), "bias": self.out(p["bias"])}


def widen(spec: NetSpec, state, stage: int, factor: float, key: jax.Array):
    """Net2Wider on stage ``stage`` (see :func:`stages`): its width C becomes ``C' = ceil(C * factor)``.

    ``g = widen_mapping(C, C', key)`` (new -> old channel, grouped for FactorizedReduce), ``cnt(i)`` = the
    number of new channels copying old channel ``i``. The same ``g`` is used for every layer of the stage
    (the ops' outputs are summed, and in ``resnet`` added to the replicated input):

    * producer (stem, or the input conv of the stage's first block): conv output columns and the affine
      BN's scale/bias/running mean/var copied by g;
    * inside the ops: per-channel things (depthwise filters, non-affine BN statistics) copied by g;
      full convs (pointwise, 1x7/7x1, 3x3) ``W'[.., a, b] = W[.., g(a), g(b)] / cnt(g(a))``;
      FactorizedReduce ``conv1'[.., a, j] = conv1[.., g(a), g(j)] / cnt(g(a))`` for ``j < C'//2`` and
      ``conv2'[.., a, j] = conv2[.., g(a), g(C'//2 + j) - C//2] / cnt(g(a))``;
    * consumer (next stage's input conv, or the head): ``W'[.., a, :] = W[.., g(a), :] / cnt(g(a))``.

    Every layer's output is the old output with channels replicated by g, so the logits are unchanged
    (in every mixed-op mode, up to fp32 rounding of the division). Momentum buffers go through the very
    same maps (division included); alpha and its Adam state are unchanged.
    """
    all_stages = stages(spec)
    if not 0 <= stage < len(all_stages):
        raise ValueError(f"widen stage {stage} outside 0..{len(all_stages) - 1}")
    st = all_stages[stage]
    c = st.channels
    c_new = widened_channels(c, factor)
    wd = _Widener(c, widen_mapping(c, c_new, key))

    def stage_transfer(tree, producer, path, params: bool):
        """``tree`` (weights or BN statistics) with the stage's producer and paths mapped, and for the weights
        its consumer's input channels (a consumer's statistics are per output channel: unchanged)."""
        new, blocks = dict(tree), [dict(b) for b in tree["blocks"]]
        if st.producer < 0:
            new["stem"] = producer(tree["stem"])
        else:
            blocks[st.producer]["input_conv"] = producer(blocks[st.producer]["input_conv"])
        for i in st.blocks:
            blocks[i]["paths"] = [path(p) for p in blocks[i]["paths"]]
        if params and st.consumer is None:
            new["head"] = {**tree["head"], "w": wd.inp(tree["head"]["w"], 0)}
        elif params:
            ic = blocks[st.consumer]["input_conv"]
            blocks[st.consumer]["input_conv"] = {**ic, "w": wd.inp(ic["w"], 2)}
        return {**new, "blocks": blocks}

    def w_transfer(tree, _unused=None):
        op_params = lambda path: {op: wd.op_params(op, w) for op, w in path.items()}  # noqa: E731
        return stage_transfer(tree, wd.conv_bn_out, op_params, params=True)

    blocks = list(spec.blocks)
    if st.producer >= 0:
        blocks[st.producer] = dataclasses.replace(blocks[st.producer], c_out=c_new)
    for i in st.blocks:
        if i != st.producer:
            blocks[i] = dataclasses.replace(blocks[i], c_in=c_new, c_out=c_new)
    if st.consumer is not None:
        blocks[st.consumer] = dataclasses.replace(blocks[st.consumer], c_in=c_new)
    new_spec = dataclasses.replace(spec, blocks=tuple(blocks),
                                   stem_channels=c_new if st.producer < 0 else spec.stem_channels)

    a_transfer = lambda old, _: jnp.array(old)  # noqa: E731 (alpha is unchanged: a copy)
    params = w_transfer(state.params)
    stats = stage_transfer(state.batch_stats, wd.stats, wd.stats, params=False)
    alpha = a_transfer(state.alpha, None)
    return new_spec, _finish(state, params, stats, alpha, w_transfer, None, a_transfer, None)


# ---------------------------------------------------------------------------------------------- branch

def branch(spec: NetSpec, state, block_index: int, key: jax.Array):
    """Add one mixed-op *path* to block ``block_index``.

    "Branch" means: the block's mixed ops, which all read the same input ``h`` (after the block's input
    conv) and whose outputs are summed, ``y = [h +] sum_p path_scale[p] * mixed_p(h)``, get one more
    summand: a new, independent mixed op over the block's op set (``n_paths -> n_paths + 1``) with its own
    weights (``model.init_path``, same channels and op stride as the block), fresh BN statistics and its
    own alpha row (``0.1 * N(0, 1)``), inserted right after the block's existing rows. Its
    ``path_scale`` entry is 0 (a block that had no ``path_scale`` -- ``original`` with one path -- gets
    ``[1.0, 0.0]``), so the function is exactly preserved in every mode; training then moves the scale
    away from 0.
    """
    block_index = int(block_index)
    if not 0 <= block_index < len(spec.blocks):
        raise ValueError(f"branch block {block_index} outside 0..{len(spec.blocks) - 1}")
    b = spec.blocks[block_index]
    new_block = dataclasses.replace(b, n_paths=b.n_paths + 1)
    new_spec = dataclasses.replace(spec, blocks=spec.blocks[:block_index] + (new_block,) + spec.blocks[block_index + 1:])
    k_p, k_a = jax.random.split(key)
    pp, ps = init_path(k_p, spec.ops, b.c_out, b.op_stride)
    # model.init_block gives a block path_scale exactly when uses_path_scale: without one it has a single path
    had_scale = "path_scale" in state.params["blocks"][block_index]
    scale_new = jnp.zeros((1,), jnp.float32) if had_scale else jnp.array([1.0, 0.0], jnp.float32)
    new_parts = {"path": pp, "path_scale": scale_new}

    def w_transfer(tree, parts):
        blocks = list(tree["blocks"])
        blk = dict(blocks[block_index])
        blk["paths"] = list(blk["paths"]) + [parts["path"]]
        if "path_scale" in blk:
            old = jnp.asarray(blk["path_scale"])
            blk["path_scale"] = jnp.concatenate([old, jnp.asarray(parts["path_scale"], old.dtype)])
        else:
            blk["path_scale"] = parts["path_scale"]
        blocks[block_index] = blk
        return {**tree, "blocks": blocks}

    stat_blocks = list(state.batch_stats["blocks"])
    stat_blocks[block_index] = {**stat_blocks[block_index], "paths": list(stat_blocks[block_index]["paths"]) + [ps]}
    stats = {**state.batch_stats, "blocks": stat_blocks}

    r = spec.row_offsets()[block_index] + b.n_paths
    a_transfer = _insert_row(r)
    new_row = NEW_ROW_SCALE * jax.random.normal(k_a, (1, len(spec.ops)), jnp.float32)
    params = w_transfer(state.params, new_parts)
    alpha = a_transfer(state.alpha, new_row)
    return new_spec, _finish(state, params, stats, alpha, w_transfer, new_parts, a_transfer, new_row)


# ---------------------------------------------------------------------------------------------- checks

@partial(jax.jit, static_argnums=(0, 4))
def _inference_logits(spec: NetSpec, params, stats, alpha, mode: str, x):
    sel = mixed_op.select_rows(mixed_op.MODES[mode].eval_weights(alpha), mode)
    return apply_network(spec, params, stats, x, sel, mode, train=False)[0]


def max_abs_logit_diff(spec_a: NetSpec, state_a, spec_b: NetSpec, state_b, x, mode: str = "argmax") -> float:
    """Largest ``|logits_a - logits_b|`` on the batch ``x`` in inference mode (BN running statistics), each
    network selecting its ops from ``mode``'s eval weights (``argmax``: alpha; the weighted modes: softmax)."""
    x = jnp.asarray(x, jnp.float32)

    def logits(spec, st):
        return _inference_logits(spec, st.params, st.batch_stats, jnp.asarray(st.alpha), mode, x)
    return float(jnp.max(jnp.abs(logits(spec_a, state_a) - logits(spec_b, state_b))))


# ---------------------------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class Growth:
    """One growth kind. ``apply(spec, state, position, key, g) -> (spec, state)`` with ``g`` the GrowthConfig;
    ``positions(spec)``: how many positions it can act on (``grow`` draws one uniformly from ``0..positions-1``);
    ``feasible(spec, state, g)``: whether the network may take it now (by default always)."""
    apply: Callable[..., tuple[NetSpec, Any]]
    positions: Callable[[NetSpec], int]
    feasible: Callable[[NetSpec, Any, GrowthConfig], bool] = lambda spec, state, g: True


def _deepen_feasible(spec: NetSpec, state, g: GrowthConfig) -> bool:
    """Below ``max_depth`` blocks, below ``depth_param_cap`` weights (if set) and, on ``original``, with
    ``skip_connect`` in the op set."""
    return (len(spec.blocks) < g.max_depth
            and not (g.depth_param_cap and count_params(state.params) >= g.depth_param_cap)
            and not (spec.skeleton == "original" and "skip_connect" not in spec.ops))


GROWTHS: dict[str, Growth] = {
    "deepen": Growth(lambda spec, state, pos, key, g: deepen(spec, state, pos, key, g.deepen_skip_prob),
                     lambda spec: len(spec.blocks) + 1, _deepen_feasible),
    "widen": Growth(lambda spec, state, pos, key, g: widen(spec, state, pos, g.widen_factor, key),
                    lambda spec: len(stages(spec))),
    "branch": Growth(lambda spec, state, pos, key, g: branch(spec, state, pos, key),
                     lambda spec: len(spec.blocks)),
}


def feasible_kinds(spec: NetSpec, state, g: GrowthConfig) -> tuple[str, ...]:
    """The kinds of ``g.kinds`` that the network may take now (each kind's ``Growth.feasible``)."""
    return tuple(kind for kind in g.kinds if GROWTHS[kind].feasible(spec, state, g))


def grow(kind: str, spec: NetSpec, state, key: jax.Array, g: GrowthConfig):
    """Apply one growth of ``kind`` at a position drawn uniformly from ``key`` (reproducible) among its
    ``Growth.positions``. Returns ``(spec, state, info)``, ``info = {kind, position, params_before, params_after}``.
    A kind the network cannot take now raises ``ValueError``: pick kinds with :func:`feasible_kinds`. ``g.kinds``
    is not enforced here."""
    if kind not in GROWTHS:
        raise ValueError(f"unknown growth kind {kind!r} (known: {', '.join(GROWTHS)})")
    growth = GROWTHS[kind]
    k_pos, k_grow = jax.random.split(key)
    before = count_params(state.params)
    if not growth.feasible(spec, state, g):
        raise ValueError(f"{kind} not allowed: {len(spec.blocks)} blocks (max_depth {g.max_depth}), {before} weights "
                         f"(depth_param_cap {g.depth_param_cap}), skeleton {spec.skeleton!r}; see feasible_kinds")
    position = int(jax.random.randint(k_pos, (), 0, growth.positions(spec)))
    new_spec, new_state = growth.apply(spec, state, position, k_grow, g)
    info = {"kind": kind, "position": position, "params_before": before,
            "params_after": count_params(new_state.params)}
    return new_spec, new_state, info
