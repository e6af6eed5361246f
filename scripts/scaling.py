"""Data-parallel scaling on paper, and the all-reduce share of a step on simulated CPU devices (docs/scaling.md).

    python scripts/scaling.py                       # paper figures of the default and cifar10_95 supernets
    python scripts/scaling.py --measure 8           # and the CPU measurement on 8 simulated devices

Paper: for each preset, the weights of its initial supernet (the gradient all-reduced each weight step, fp32), the
collectives in its one-program weight step partitioned over 8 devices, the share of the step's XLA FLOPs that each
of the 8 devices computes (1/8 when the step partitions fully), and the predicted speed-up at N GPUs:
``t(N) = t(1) / N * (8 * share) + ring all-reduce (2 (N-1) / N * bytes / bandwidth) + latency * collectives``,
with the share and the collectives of 8 devices, and no overlap of communication and compute (a lower bound: XLA on
GPUs overlaps the gradient all-reduce with the backward pass).
``t(1)`` is the step's work (``STEP_GFLOP``: the one-op-per-image floor of docs/benchmarks.md, run CF) at the
effective throughput ``--tflops``.

Measured (``--measure N``): the preset's weight step on N simulated CPU devices, and alone the all-reduces that
the step holds (the gradient's, and the small ones of the BatchNorm moments); their share of the step. Simulated
devices share the CPU's cores and memory: a CPU figure, not a GPU one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINKS_GBPS = {"NVLink 4 (H100 SXM), 450 GB/s a direction": 450.0, "400 Gb/s between hosts": 50.0,
              "100 Gb/s between hosts": 12.5}
LATENCY_US = {"NVLink 4 (H100 SXM), 450 GB/s a direction": 10.0, "400 Gb/s between hosts": 25.0,
              "100 Gb/s between hosts": 25.0}  # one small all-reduce (NCCL, a few KiB)
SIZES = (2, 4, 8)
STEP_GFLOP = {"default": 40.36, "cifar10_95": 2 * 48.42}  # the floor at the preset's batch (128; 256 = 2 x 128)


def _setup(devices: int) -> None:
    """Simulated CPU devices: set before jax is imported."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))


def preset_cfg(name: str):
    """The preset with its weight steps in one program (``single`` moves to ``dispatch=switch``)."""
    from asose_jax.config import apply_overrides, load_config_file, preset_path
    return apply_overrides(load_config_file(preset_path(name)), ["mixed_op.dispatch=switch"])


def weight_step(cfg, n_devices: int):
    """(compiled sharded weight step, its inputs) of ``cfg``'s initial supernet on a mesh of ``n_devices``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from asose_jax import model, parallel, steps
    from asose_jax.config import ParallelConfig
    from asose_jax.train_state import create_train_state
    m, b = cfg.model, cfg.data.batch_size
    placement = parallel.make_placement(ParallelConfig(devices=str(n_devices)))
    spec = model.build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes, m.stage_width_mult)
    state = create_train_state(0, spec, cfg, 1, placement.replicated)
    program = steps.program_steps(spec, cfg, 1, placement)
    rng = np.random.default_rng(0)
    x = parallel.place_dataset(rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8), placement)
    y = parallel.place_dataset(rng.integers(0, 10, (b,), dtype=np.int32), placement)
    perm = parallel.place(jnp.arange(b, dtype=jnp.int32)[None], placement.replicated)
    inputs = (state, x, y, perm, 0, program.sample(state))
    return program.weight_step.lower(*inputs).compile(), inputs, placement


def all_reduces(compiled) -> list[int]:
    """Element counts of the all-reduces in a compiled program (after XLA combined them)."""
    sizes = []
    for line in compiled.as_text().splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            shapes = re.findall(r"[fsu](?:32|16|64)\[([\d,]*)\]", line.split("=")[1].split("all-reduce")[0])
            sizes.append(sum(math.prod(int(d) for d in dims.split(",") if d) for dims in shapes))
    return sizes


def collectives(compiled) -> dict[str, int]:
    """How many of each collective a compiled program holds."""
    text = compiled.as_text()
    return {kind: text.count(f" {kind}(") + text.count(f" {kind}-start(")
            for kind in ("all-reduce", "all-gather", "all-to-all", "collective-permute")}


def paper(name: str, tflops: float) -> dict:
    """Weights, FLOPs, all-reduces of the preset's weight step, and the predicted speed-ups."""
    from asose_jax.model import count_params
    cfg = preset_cfg(name)
    per_device = {}
    for n in (1, 8):
        compiled, inputs, _ = weight_step(cfg, n)
        cost = compiled.cost_analysis()
        per_device[n] = float((cost[0] if isinstance(cost, list) else cost)["flops"])  # of one device's program
    weights = count_params(inputs[0].params)
    reduces, counts = all_reduces(compiled), collectives(compiled)
    imbalance = 8 * per_device[8] / per_device[1]  # 1 when each device computes exactly its 1/8
    flops = STEP_GFLOP[name] * 1e9
    t1 = flops / (tflops * 1e12)
    grad_bytes = 4 * weights
    rows = {}
    for link, gbps in LINKS_GBPS.items():
        speed = {}
        for n in SIZES:
            comm = 2 * (n - 1) / n * grad_bytes / (gbps * 1e9) + LATENCY_US[link] * 1e-6 * sum(counts.values())
            speed[n] = round(t1 / (t1 / n * imbalance + comm), 2)
        rows[link] = speed
    return {"preset": name, "mode": cfg.mixed_op.mode, "batch": cfg.data.batch_size, "weights": weights,
            "grad_MB": round(grad_bytes / 1e6, 2), "step_GFLOP": round(flops / 1e9, 1),
            "flop_per_grad_byte": round(flops / grad_bytes), "t1_ms": round(1e3 * t1, 2),
            "all_reduces_on_8": len(reduces), "collectives_on_8": counts,
            "device_share_on_8": round(per_device[8] / per_device[1], 3),
            "speedup": rows}


def median_s(fn, reps: int) -> float:
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(name: str, batch: int, reps: int) -> dict:
    """The weight step of ``name`` at ``batch`` on every simulated device, against its all-reduces alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from asose_jax import parallel
    cfg = preset_cfg(name)
    cfg = replace(cfg, data=replace(cfg.data, batch_size=batch))
    compiled, inputs, placement = weight_step(cfg, len(jax.devices()))
    state, rest = inputs[0], inputs[1:]
    holder = {"state": state}

    def step():
        holder["state"] = compiled(holder["state"], *rest)  # the state is donated: feed the new one back
        return holder["state"]
    t_step = median_s(step, reps)
    sizes = all_reduces(compiled)
    n = placement.size
    parts = [parallel.place(jnp.ones((n, s), jnp.float32), placement.batch) for s in sizes]
    reduce_all = jax.jit(lambda xs: [jnp.sum(x, 0) for x in xs], out_shardings=placement.replicated)
    t_reduce = median_s(lambda: reduce_all(parts), reps)
    return {"preset": name, "batch": batch, "devices": n, "step_ms": round(1e3 * t_step, 1),
            "all_reduces": len(sizes), "all_reduce_floats": int(np.sum(sizes)),
            "all_reduce_ms": round(1e3 * t_reduce, 1), "share": round(t_reduce / t_step, 3),
            "note": "simulated CPU devices sharing the CPU's cores: not a GPU figure"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["default", "cifar10_95"])
    p.add_argument("--tflops", type=float, default=3.4,
                   help="effective throughput of one GPU on these small convs, TFLOP/s (3.4: measured, docs/scaling.md)")
    p.add_argument("--measure", type=int, default=0, metavar="N", help="also measure on N simulated CPU devices")
    p.add_argument("--measure-preset", default="smoke")
    p.add_argument("--measure-batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    _setup(max(args.measure, 8))
    for name in args.presets:
        print(json.dumps(paper(name, args.tflops)), flush=True)
    if args.measure:
        print(json.dumps(measure(args.measure_preset, args.measure_batch, args.reps)), flush=True)


if __name__ == "__main__":
    main()
