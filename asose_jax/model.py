"""The supernet: stem -> evolvable blocks (each an optional input conv and one or more mixed ops) ->
global average pool -> linear head, described by a static, hashable :class:`NetSpec`.

Two skeletons:

* ``original``: the ASO-SE chain as the PyTorch code really built it. Blocks at i in {L//3, 2L//3} have
  stride 2 and double the channels; the stride is applied twice (1x1 input conv *and* op), and there
  is no residual. At C0=32, L=4: 937,258 weights + 40 alpha.
* ``resnet``: one downsampling per stage (a 3x3 conv-BN-ReLU input conv at stride 2; ops at stride 1),
  and ``y = h + sum_p scale_p * mixed_p(h)`` around every block.

A block may hold several mixed-op *paths* (``n_paths``; added by branch growth), each with its own
alpha row. Rows are ordered block by block, path by path.

The final network of a genotype is the same :class:`NetSpec` with one fixed op per row (``fixed_ops``): its
paths hold only that op's weights, and it runs through the same blocks in the mixed op's ``fixed`` mode.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asose_jax import mixed_op
from asose_jax.ops import (
    OP_REGISTRY,
    batch_norm,
    bn_stats_init,
    conv2d,
    conv_init,
    exact_precision,
    host_rng,
    relu,
)


@dataclass(frozen=True)
class BlockSpec:
    c_in: int
    c_out: int
    stride: int  # spatial downsampling of the block (1 or 2)
    input_conv: int  # kernel size of the input conv-BN-ReLU (0 = none)
    op_stride: int  # stride of the mixed op itself (original: = stride; resnet: 1)
    residual: bool
    n_paths: int = 1


@dataclass(frozen=True)
class NetSpec:
    skeleton: str
    stem_channels: int
    blocks: tuple[BlockSpec, ...]
    ops: tuple[str, ...]
    num_classes: int = 10
    in_channels: int = 3
    fixed_ops: tuple[int, ...] = ()  # one index into ``ops`` per row: a fixed-op (final) network; () = supernet

    @property
    def num_rows(self) -> int:
        """Rows of alpha: one per mixed-op path."""
        return sum(b.n_paths for b in self.blocks)

    def row_offsets(self) -> tuple[int, ...]:
        offs, r = [], 0
        for b in self.blocks:
            offs.append(r)
            r += b.n_paths
        return tuple(offs)

    def block_ops(self, b: int) -> tuple[str, ...]:
        """The fixed op of each path of block ``b`` (a fixed-op spec)."""
        off = self.row_offsets()[b]
        return tuple(self.ops[i] for i in self.fixed_ops[off:off + self.blocks[b].n_paths])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "NetSpec":
        blocks = tuple(BlockSpec(**b) for b in d["blocks"])
        return NetSpec(d["skeleton"], d["stem_channels"], blocks, tuple(d["ops"]), d["num_classes"], d["in_channels"],
                       tuple(d.get("fixed_ops", ())))


def downsample_positions(num_layers: int) -> set[int]:
    return {num_layers // 3, (2 * num_layers) // 3}


def skeleton_block(skeleton: str, c_in: int, c_out: int, stride: int, n_paths: int = 1) -> BlockSpec:
    """A block of ``skeleton`` (see module docstring); it gets an input conv where the shape changes."""
    changes = c_out != c_in or stride != 1
    if skeleton == "original":
        return BlockSpec(c_in, c_out, stride, 1 if changes else 0, stride, residual=False, n_paths=n_paths)
    if skeleton == "resnet":
        return BlockSpec(c_in, c_out, stride, 3 if changes else 0, 1, residual=True, n_paths=n_paths)
    raise ValueError(f"unknown skeleton {skeleton!r}")


def build_spec(skeleton: str, init_channels: int, num_layers: int, ops, num_classes: int = 10,
               width_mult: int = 2) -> NetSpec:
    """The initial spec of a skeleton (see module docstring)."""
    down = downsample_positions(num_layers)
    blocks, c = [], init_channels
    for i in range(num_layers):
        stride = 2 if i in down else 1
        c_out = c * width_mult if stride == 2 else c
        blocks.append(skeleton_block(skeleton, c, c_out, stride))
        c = c_out
    return NetSpec(skeleton, init_channels, tuple(blocks), tuple(ops), num_classes)


def uses_path_scale(block: BlockSpec) -> bool:
    return block.residual or block.n_paths > 1


# ---------------------------------------------------------------------------------------------- init

def init_path(seed, ops, c: int, stride: int) -> tuple[dict, dict]:
    """Params and BN stats of one mixed op: ``{op_name: ...}``, host arrays; each op draws from its own child of
    ``host_rng(seed)`` (``seed``: an int, a concrete JAX key or a numpy ``Generator``)."""
    params, stats = {}, {}
    for name, rng in zip(ops, host_rng(seed).spawn(len(ops))):
        params[name], stats[name] = OP_REGISTRY[name].init(rng, c, stride)
    return params, stats


def init_conv_bn(rng: np.random.Generator, k: int, c_in: int, c_out: int) -> tuple[dict, dict]:
    """A k x k conv with an affine BN (the stem and the input convs): params and BN stats."""
    params = {"w": conv_init(rng, k, k, c_in, c_out), "scale": np.ones((c_out,), np.float32),
              "bias": np.zeros((c_out,), np.float32)}
    return params, bn_stats_init(c_out)


def init_block(seed, spec: NetSpec, block: BlockSpec, first_row: int = 0,
               path_scale_init: float = 1.0) -> tuple[dict, dict]:
    """Input conv, paths and path scales of one block (host arrays from ``host_rng(seed)``). In a fixed-op spec,
    path ``p`` holds only the op of row ``first_row + p``; ``path_scale_init`` is the initial residual scale of
    every path."""
    r_in, r_paths = host_rng(seed).spawn(2)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    if block.input_conv:
        params["input_conv"], stats["input_conv"] = init_conv_bn(r_in, block.input_conv, block.c_in, block.c_out)
    rngs = r_paths.spawn(block.n_paths)
    if spec.fixed_ops:  # {op: ...} with the path's one op, drawn from the path's generator itself
        names = [spec.ops[i] for i in spec.fixed_ops[first_row:first_row + block.n_paths]]
        inits = [OP_REGISTRY[n].init(r, block.c_out, block.op_stride) for n, r in zip(names, rngs)]
        paths = [({n: p}, {n: s}) for n, (p, s) in zip(names, inits)]
    else:
        paths = [init_path(r, spec.ops, block.c_out, block.op_stride) for r in rngs]
    params["paths"] = [p for p, _ in paths]
    stats["paths"] = [s for _, s in paths]
    if uses_path_scale(block):
        params["path_scale"] = np.full((block.n_paths,), path_scale_init, np.float32)
    return params, stats


def apply_head(params: dict, h: jax.Array) -> jax.Array:
    """Global average pool of ``h`` ``[N, H, W, C]`` then the linear head: float32 logits ``[N, classes]``."""
    pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return jnp.dot(pooled, params["w"], precision=exact_precision(pooled.dtype)) + params["b"]


def init_network(seed, spec: NetSpec, path_scale_init: float = 1.0) -> tuple[dict, dict]:
    """Weights and BN running statistics of the whole network (supernet, or fixed-op network): float32 host
    arrays drawn from ``host_rng(seed)`` (an int, a concrete JAX key or a numpy ``Generator``), no compilation."""
    r_stem, r_blocks, r_head = host_rng(seed).spawn(3)
    c0, c_last = spec.stem_channels, spec.blocks[-1].c_out
    stem_params, stem_stats = init_conv_bn(r_stem, 3, spec.in_channels, c0)
    params, stats = {"stem": stem_params}, {"stem": stem_stats}
    blocks = [init_block(r, spec, b, off, path_scale_init)
              for r, b, off in zip(r_blocks.spawn(len(spec.blocks)), spec.blocks, spec.row_offsets())]
    params["blocks"] = [p for p, _ in blocks]
    stats["blocks"] = [s for _, s in blocks]
    bound = 1.0 / math.sqrt(c_last)  # the linear head, {"w": [C, classes], "b": [classes]}: PyTorch's default init
    params["head"] = {"w": r_head.uniform(-bound, bound, (c_last, spec.num_classes)).astype(np.float32),
                      "b": r_head.uniform(-bound, bound, (spec.num_classes,)).astype(np.float32)}
    return params, stats


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------- apply

def conv_bn_relu(p: dict, s: dict, x: jax.Array, stride: int, train: bool) -> tuple[jax.Array, dict]:
    k = p["w"].shape[0]
    y = conv2d(x, p["w"], (stride, stride), ((k // 2, k // 2), (k // 2, k // 2)))
    y, s = batch_norm(y, s, train, p["scale"], p["bias"])
    return relu(y), s


def apply_block(spec: NetSpec, block: BlockSpec, params: dict, stats: dict, x: jax.Array, sels: list,
                mode: str, train: bool) -> tuple[jax.Array, dict]:
    """One block; ``sels`` holds one mixed-op selection per path."""
    new_stats: dict[str, Any] = {}
    h = x
    if block.input_conv:
        h, new_stats["input_conv"] = conv_bn_relu(params["input_conv"], stats["input_conv"], x, block.stride, train)
    y = h if block.residual else None
    path_stats = []
    for p in range(block.n_paths):
        out, s = mixed_op.apply(spec.ops, block.op_stride, params["paths"][p], stats["paths"][p], h, sels[p], mode, train)
        path_stats.append(s)
        if "path_scale" in params:
            out = params["path_scale"][p].astype(out.dtype) * out
        y = out if y is None else y + out
    new_stats["paths"] = path_stats
    return y, new_stats


def apply_network(spec: NetSpec, params: dict, stats: dict, x: jax.Array, selection: dict, mode: str,
                  train: bool, remat: bool = False, dtype=jnp.float32) -> tuple[jax.Array, dict]:
    """Logits ``[N, classes]`` (float32) and updated BN stats for images ``x`` ``[N, H, W, 3]``.

    ``selection`` is a mixed-op selection with a leading rows axis (``mixed_op.select_rows``). In mode
    ``fixed`` it is None: each row runs its op of ``spec.fixed_ops`` with coefficient 1. ``remat``:
    ``jax.checkpoint`` each block (its activations are recomputed in the backward pass)."""
    x = x.astype(dtype)
    h, stem_stats = conv_bn_relu(params["stem"], stats["stem"], x, 1, train)
    new_stats = {"stem": stem_stats, "blocks": []}
    for b, (block, off) in enumerate(zip(spec.blocks, spec.row_offsets())):
        if mode == "fixed":
            sels = [{"op": spec.fixed_ops[off + p], "coeff": jnp.ones((), jnp.float32)} for p in range(block.n_paths)]
        else:
            sels = [jax.tree.map(lambda a, r=off + p: a[r], selection) for p in range(block.n_paths)]

        def run(prm, st, inp, sl, block=block):
            return apply_block(spec, block, prm, st, inp, sl, mode, train)
        if remat:
            run = jax.checkpoint(run)
        h, s = run(params["blocks"][b], stats["blocks"][b], h, sels)
        new_stats["blocks"].append(s)
    return apply_head(params["head"], h), new_stats
