"""What each op costs in each row of a supernet, and the differentiable expected cost of alpha.

A cost table is ``[rows, num_ops]``: the cost of op ``o`` at the input shape of alpha row ``r``, from XLA's flop
count (``flops``, on any machine) or from a latency table measured on the target GPU by ``scripts/bench_ops.py
--latency-out`` (``latency:PATH``: forward + backward in ms, e.g. ``docs/results/latency_h100.json``).

The cost-aware arch loss is ``CE + lambda * expected_cost(alpha, table)`` (``lambda``: ``arch.cost_weight``), as
FBNet and ProxylessNAS add the expected latency of the sampled network. The table is normalised so that the
expected cost is 1 at uniform alpha whatever the unit or the network size: ``lambda`` weighs a whole network's
relative cost against the cross-entropy.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from asose_jax.config import Config
from asose_jax.errors import ConfigError
from asose_jax.model import NetSpec, apply_network, build_spec, count_params, init_network
from asose_jax.ops import OP_REGISTRY

LATENCY_FORMAT = "asose_jax.latency/1"
IMAGE_SIZE = 32  # CIFAR-10 images are 32 x 32


@dataclass(frozen=True)
class RowShape:
    """The input of one mixed op: ``[N, height, height, channels]``, run at ``stride``."""
    channels: int
    height: int
    stride: int


def _downsampled(height: int, stride: int) -> int:
    """Spatial size after a 'same'-padded conv or pool of ``stride`` (every op and input conv pads so)."""
    return -(-height // stride)


def row_shapes(spec: NetSpec) -> tuple[RowShape, ...]:
    """The input shape of every alpha row, block by block and path by path (the order of alpha's rows).

    A block's input conv (if any) runs at the block stride; its ops then run at ``op_stride`` on that
    output (``original`` applies the stride twice, ``resnet`` once)."""
    shapes, h = [], IMAGE_SIZE
    for block in spec.blocks:
        h_in = _downsampled(h, block.stride) if block.input_conv else h
        shapes += [RowShape(block.c_out, h_in, block.op_stride)] * block.n_paths
        h = _downsampled(h_in, block.op_stride)
    return tuple(shapes)


def forward_flops(fn, *args) -> float:
    """XLA's flop count of ``jax.jit(fn)(*args)``; ``args`` may be arrays or ``jax.ShapeDtypeStruct``."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))


@functools.lru_cache(maxsize=None)
def op_flops(op: str, shape: RowShape) -> float:
    """Flops of one forward pass of ``op`` at ``shape``, batch 1, inference mode (BN with running statistics)."""
    opdef = OP_REGISTRY[op]
    params, stats = jax.eval_shape(lambda: opdef.init(np.random.default_rng(0), shape.channels, shape.stride))
    x = jax.ShapeDtypeStruct((1, shape.height, shape.height, shape.channels), jnp.float32)
    return forward_flops(lambda p, s, v: opdef.apply(p, s, v, shape.stride, False)[0], params, stats, x)


def flops_table(spec: NetSpec) -> np.ndarray:
    """``[rows, ops]`` forward flops per image of each op at each row's shape (cached by shape)."""
    return np.array([[op_flops(op, shape) for op in spec.ops] for shape in row_shapes(spec)], np.float64)


def network_cost(spec: NetSpec) -> tuple[float, int]:
    """``(flops per image, weights)`` of the fixed-op network ``spec`` (a genotype's final network): XLA's
    count of one inference-mode forward pass at batch 1, stem and head included. Nothing is allocated."""
    params, stats = jax.eval_shape(lambda: init_network(0, spec))
    x = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, spec.in_channels), jnp.float32)
    flops = forward_flops(lambda p, s, v: apply_network(spec, p, s, v, None, "fixed", False)[0], params, stats, x)
    return flops, count_params(params)


# ---------------------------------------------------------------------------------------------- latency tables

def latency_key(op: str, shape: RowShape, precision: str) -> tuple:
    return op, shape.channels, shape.height, shape.stride, precision


def load_latency(path: str | Path) -> dict[tuple, float]:
    """``{(op, channels, height, stride, precision): ms}`` from a ``scripts/bench_ops.py --latency-out`` JSON."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"arch.cost: latency table {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"arch.cost: latency table {path} is not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != LATENCY_FORMAT:
        raise ConfigError(f"arch.cost: {path} is not a latency table (format {LATENCY_FORMAT!r}; write one with "
                          f"scripts/bench_ops.py --latency-out)")
    table = {}
    for e in doc.get("entries", []):
        shape = RowShape(int(e["channels"]), int(e["height"]), int(e["stride"]))
        table[latency_key(e["op"], shape, e["precision"])] = float(e["ms"])
    return table


def latency_table(spec: NetSpec, path: str | Path, precision: str) -> np.ndarray:
    """``[rows, ops]`` measured ms of each op at each row's shape; a shape the table lacks is a ConfigError."""
    measured, shapes = load_latency(path), row_shapes(spec)
    for r, shape in enumerate(shapes):
        missing = [op for op in spec.ops if latency_key(op, shape, precision) not in measured]
        if missing:
            c, h, s = shape.channels, shape.height, shape.stride
            raise ConfigError(f"arch.cost: latency table {path} has no {precision} entry for {missing[0]} at C{c} "
                              f"{h}x{h} s{s} (row {r}); add it on the target GPU with scripts/bench_ops.py --no-torch "
                              f"--shapes {c}/{h}/{s} --precisions {precision} --latency-out {path}")
    return np.array([[measured[latency_key(op, shape, precision)] for op in spec.ops] for shape in shapes], np.float64)


# ---------------------------------------------------------------------------------------------- the arch-loss term

def cost_table(spec: NetSpec, source: str, precision: str = "fp32") -> np.ndarray:
    """The raw ``[rows, ops]`` table of ``source``: ``flops`` or ``latency:PATH`` (see the module docstring)."""
    if source == "flops":
        return flops_table(spec)
    if source.startswith("latency:") and source[len("latency:"):]:
        return latency_table(spec, source[len("latency:"):], precision)
    raise ConfigError(f"arch.cost={source!r} is out of range: allowed flops | latency:PATH")


def normalise(table: np.ndarray) -> np.ndarray:
    """``table / mean_o(sum_r table[r, o])`` as float32: the expected cost at uniform alpha becomes 1.

    A table of zeros (only free ops) stays zero."""
    scale = float(np.mean(np.sum(table, axis=0)))
    return (table / scale if scale > 0 else np.zeros_like(table)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def arch_cost_table(spec: NetSpec, source: str, precision: str = "fp32") -> jax.Array:
    """The normalised ``[rows, ops]`` table the arch loss uses (float32, on the default device; cached per spec,
    so the engines of one spec share it)."""
    return jnp.asarray(normalise(cost_table(spec, source, precision)))


def search_cost_table(spec: NetSpec, cfg: Config) -> jax.Array | None:
    """The table of the cost term of ``spec``'s arch steps, or None when ``arch.cost_weight`` is 0 (no cost term:
    the steps trace exactly the plain arch loss). A growth makes a new spec with new rows, hence a new table; a
    latency table that lacks one of its shapes (widen growth makes new channel counts) is a one-line ConfigError."""
    if cfg.arch.cost_weight == 0:
        return None
    return arch_cost_table(spec, cfg.arch.cost, cfg.precision)


def check_search_cost(cfg: Config) -> None:
    """Build the cost table of the supernet a search starts from, so that a latency table lacking one of its
    shapes stops the search in one line before any data is loaded (nothing happens when ``cost_weight`` is 0)."""
    m = cfg.model
    search_cost_table(build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes,
                                 m.stage_width_mult), cfg)


def expected_cost(alpha: jax.Array, table: jax.Array) -> jax.Array:
    """``sum_r softmax(alpha_r) . table_r``: the expected cost of a network drawn from alpha ``[rows, ops]``.

    Differentiable in alpha; its gradient moves each row's probability mass toward its cheaper ops."""
    return jnp.sum(jax.nn.softmax(alpha, axis=-1) * table)
