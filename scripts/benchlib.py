"""What the benchmark scripts share: the `original` network's JAX setup, warm-up and timing, profiler traces and
what they say about the GPU, and the identity of a comparison record.

``python scripts/x.py`` puts ``scripts/`` on ``sys.path``, so each script imports this module as ``import
benchlib``. The scripts import ``asose_jax`` too: install the package (``make install``) or set ``PYTHONPATH=.``.
"""
from __future__ import annotations

import glob
import gzip
import json
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

N_BATCHES = 8  # distinct batches on the device, cycled through by the timed steps


# ================================================================================================ timing

def median_ms(run_chunk, steps: int, chunks: int = 5) -> float:
    """Median over ``chunks`` calls of ``run_chunk(steps)`` (each ending in a device sync) of ms per step."""
    times = []
    for _ in range(chunks):
        t = time.perf_counter()
        run_chunk(steps)
        times.append(1000 * (time.perf_counter() - t) / steps)
    return statistics.median(times)


def batches_u8(batch: int, data_dir: str | None):
    """N_BATCHES batches of uint8 NHWC images and int labels (identical for both frameworks): synthetic from seed 0,
    or the first images of CIFAR-10's training batches in ``data_dir``."""
    n = batch * N_BATCHES
    if data_dir:
        from asose_jax.data import load_cifar10_dir
        train, _ = load_cifar10_dir(data_dir)
        return train.images[:n], train.labels[:n].astype(np.int32)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, (n,), dtype=np.int32)


# ================================================================================================ JAX setup

def paired_arch_mode(mode: str) -> str:
    """The ``mixed_op.arch_mode`` a benchmark of ``mode`` runs with: "" (``mode`` itself) where ``mode`` trains
    alpha, else ``dense`` (``routed`` + ``dense``: the conditional-free search)."""
    from asose_jax import mixed_op
    return "" if mixed_op.MODES[mode].trainable else "dense"


def jax_setup(mode: str, precision: str, batch: int, remat: bool = False, dispatch: str = "host",
              data_dir: str | None = None, ops: tuple[str, ...] | None = None):
    """The `original` network (C0=32, L=4) in one mixed-op mode (arch steps in :func:`paired_arch_mode`):
    ``(spec, x, y, perm, state, steps)``, with N_BATCHES uint8 batches on the device and ``perm``
    ``[N_BATCHES, batch]`` indexing them in order. ``ops``: the candidate ops (default: the original's ten)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from asose_jax import model
    from asose_jax import steps as steps_lib
    from asose_jax.config import Config, DataConfig, MixedOpConfig, ModelConfig
    from asose_jax.train_state import create_train_state

    model_cfg = ModelConfig(skeleton="original", init_channels=32, num_layers=4)
    if ops is not None:
        model_cfg = dataclasses.replace(model_cfg, ops=tuple(ops))
    cfg = dataclasses.replace(Config(), precision=precision, remat=remat, model=model_cfg,
                              mixed_op=MixedOpConfig(mode=mode, k=3, weight_threshold=0.01, dispatch=dispatch,
                                                     arch_mode=paired_arch_mode(mode)),
                              data=DataConfig(batch_size=batch))
    spec = model.build_spec("original", 32, 4, cfg.model.ops)
    xs, ys = batches_u8(batch, data_dir)
    perm = jnp.arange(batch * N_BATCHES, dtype=jnp.int32).reshape(N_BATCHES, batch)
    state = create_train_state(0, spec, cfg, N_BATCHES)
    return spec, jnp.asarray(xs), jnp.asarray(ys), perm, state, steps_lib.make_steps(spec, cfg, N_BATCHES)


def forced_choices(spec, mode: str, host: bool, k: int = 3) -> list:
    """Op choices that, one step each, run every op of every row, each from the mode's own ``choose`` (the
    ``mixed_op.MODES`` registry) on weights that rank op ``j`` first, then ``j + 1``, ...: op ``j`` everywhere
    (``single``/``argmax``), ops ``j .. j + k - 1`` (``topk``: every op in each of a row's ``k`` switches;
    ``threshold``: every op kept and skipped), one choice when they are all equal (``dense``). The host engine
    takes ``{"idx", "noise"}`` instead."""
    import jax.numpy as jnp

    from asose_jax import mixed_op
    n, rows = len(spec.ops), spec.num_rows
    if host:
        return [{"idx": np.full((rows,), j, np.int32), "noise": np.zeros((rows, n), np.float32)} for j in range(n)]
    choices = {}
    for j in range(n):
        weights = jnp.tile(jnp.asarray(n - (np.arange(n) - j) % n, jnp.float32), (rows, 1))
        choice = mixed_op.choose_rows(weights / jnp.sum(weights[0]), mode, k, 0.0)
        choices.setdefault(np.asarray(choice).tobytes(), choice)
    return list(choices.values())


def run_every_op(spec, S, mode: str, host: bool, state, x, y, perm):
    """Weight steps, then arch steps (in :func:`paired_arch_mode`), on ``forced_choices``: compiles every program
    and runs every branch of every conditional once, before timing. The first run of a branch costs far more than
    the next ones, and random choices leave some branches unrun for many steps; a search pays that once per
    branch, a timing must not. A mode that draws its choices (routed) runs every op in any step: one sampled
    step. Returns the state."""
    import jax

    from asose_jax import mixed_op
    arch_mode = paired_arch_mode(mode) or mode
    for fn, sample, m in ((S.weight_step, S.sample, mode), (S.arch_step, S.arch_sample, arch_mode)):
        choices = [sample(state)] if mixed_op.MODES[m].draw else forced_choices(spec, m, host and m == mode)
        for choice in choices:
            state = fn(state, x, y, perm, 0, choice)
        jax.block_until_ready(state)
    return state


def weight_step_cost(S, state, x, y, perm) -> dict:
    """XLA's cost analysis of one compiled weight step: ``{"flops", "bytes"}`` (bytes accessed; a conditional counts
    as its most expensive branch). The inputs may be abstract (``jax.ShapeDtypeStruct``): nothing runs."""
    import jax
    choice = jax.eval_shape(S.sample, state)
    cost = S.weight_step.lower(state, x, y, perm, 0, choice).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def config_weight_step_cost(cfg) -> dict:
    """:func:`weight_step_cost` of the one-program weight step of ``cfg``'s initial network at
    ``cfg.data.batch_size``, compiled from abstract inputs."""
    import jax
    import jax.numpy as jnp

    from asose_jax import model
    from asose_jax import steps as steps_lib
    from asose_jax.train_state import create_train_state
    m, b = cfg.model, cfg.data.batch_size
    spec = model.build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes, m.stage_width_mult)
    state = jax.eval_shape(lambda: create_train_state(0, spec, cfg, 1))
    x, y = jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32)
    return weight_step_cost(steps_lib.program_steps(spec, cfg, 1), state, x, y, jax.ShapeDtypeStruct((1, b), jnp.int32))


def routed_floor(cfg) -> dict:
    """The FLOPs of ``cfg``'s routed weight step against its floor: the mean over the ops of the same step with every
    row fixed to that op (the network with that one op, which routed runs as the fixed network). Returns
    ``{"routed_flops", "floor_flops", "ratio", "per_op_flops": {op: flops}}``."""
    import dataclasses
    routed = config_weight_step_cost(cfg)["flops"]
    per_op = {op: config_weight_step_cost(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ops=(op,))))
              ["flops"] for op in cfg.model.ops}
    floor = sum(per_op.values()) / len(per_op)
    return {"routed_flops": routed, "floor_flops": floor, "ratio": routed / floor, "per_op_flops": per_op}


# ================================================================================================ traces

def idle_gaps(intervals: list[tuple[float, float]]) -> list[float]:
    """Lengths of the stretches between the first start and the last end that no interval covers."""
    gaps, end = [], None
    for s, e in sorted(intervals):
        if end is not None and s > end:
            gaps.append(s - end)
        end = e if end is None else max(end, e)
    return gaps


def union_busy(intervals: list[tuple[float, float]]) -> float:
    """Fraction of [first start, last end] covered by at least one interval."""
    if not intervals:
        return float("nan")
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    return 1.0 - sum(idle_gaps(intervals)) / span if span > 0 else float("nan")


def trace_events(run, keep: str | None = None) -> tuple[list[dict], set]:
    """``run()`` under the JAX profiler: its Chrome-trace events and the process ids of the GPU streams (empty
    without a GPU). ``keep``: a folder to copy the trace file (perfetto/Chrome JSON) into."""
    import jax
    with tempfile.TemporaryDirectory() as tdir:
        jax.profiler.start_trace(tdir, create_perfetto_trace=True)
        run()
        jax.profiler.stop_trace()
        files = glob.glob(f"{tdir}/**/*.json.gz", recursive=True)
        if not files:
            return [], set()
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(files[0], Path(keep) / Path(files[0]).name)
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    return events, gpu_pids


def kernel_busy(events: list[dict], gpu_pids: set) -> float:
    """GPU busy fraction: ``union_busy`` of the kernel intervals on ``gpu_pids``; NaN when there are none."""
    return union_busy([(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                       if e.get("ph") == "X" and e.get("pid") in gpu_pids])


def traced_gpu_busy(run) -> float:
    """GPU busy fraction of ``run()`` under the profiler; NaN without a GPU."""
    return kernel_busy(*trace_events(run))


def _kind(name: str) -> str:
    """A kernel or event name without its numeric instance suffixes (``loop_add_fusion_12`` -> ``loop_add_fusion``)."""
    return re.sub(r"([._]\d+)+$", "", name)


def _top(totals: dict[str, float], n: int) -> dict[str, float]:
    return {k: round(v / 1e3, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:n]}


def trace_breakdown(events: list[dict], gpu_pids: set, top: int = 8) -> dict:
    """Where a traced window's time went, from Chrome-trace events (``ts``/``dur`` in us; results in ms).

    ``kernel_ms``: total duration per kernel kind on the GPU (the ``top`` largest) and ``kernel_total_ms``;
    ``host_ms``: total duration per event name on every other process (inclusive: nested events count in
    their parents too); ``gaps``: the idle intervals between merged GPU kernel intervals (count, total ms,
    median/p90/max in us, and how many / how much are longer than 100 us); ``conditionals``: the host events of
    XLA's conditional thunks (``cond.N`` / ``conditional.N``, where the host waits for a branch index), count
    and total ms.
    """
    kernels, host = defaultdict(float), defaultdict(float)
    conds = []
    intervals = []
    for e in events:
        if e.get("ph") != "X":
            continue
        dur = float(e.get("dur", 0))
        if e.get("pid") in gpu_pids:
            kernels[_kind(str(e.get("name", "")))] += dur
            intervals.append((float(e["ts"]), float(e["ts"]) + dur))
        else:
            host[str(e.get("name", ""))] += dur
            if _kind(str(e.get("name", ""))) in ("cond", "conditional"):
                conds.append(dur)
    gaps = sorted(idle_gaps(intervals))
    long = [g for g in gaps if g > 100]

    def pick(q: float) -> float | None:
        return round(gaps[min(int(q * len(gaps)), len(gaps) - 1)], 1) if gaps else None

    return {"kernel_total_ms": round(sum(kernels.values()) / 1e3, 3), "kernel_ms": _top(kernels, top),
            "host_ms": _top(host, top),
            "gaps": {"count": len(gaps), "total_ms": round(sum(gaps) / 1e3, 3), "p50_us": pick(0.5),
                     "p90_us": pick(0.9), "max_us": round(gaps[-1], 1) if gaps else None,
                     "over_100us": len(long), "over_100us_ms": round(sum(long) / 1e3, 3)},
            "conditionals": {"count": len(conds), "total_ms": round(sum(conds) / 1e3, 3)}}


# ================================================================================================ comparison records

def record_key(rec: dict) -> tuple:
    """What makes two comparison records the same measurement (``compare_pytorch.py --merge`` keeps only the newer)."""
    return (rec["framework"], rec["mode"], rec["precision"], rec["batch"], rec["remat"], rec.get("dispatch"),
            rec.get("profile_syncs", False))


def torch_record_head(name: str, batch: int) -> dict:
    """The identifying fields of the record of PyTorch mode ``name`` (of ``--torch-modes``) at ``batch``."""
    compiled = name.endswith("_compiled")
    rec = {"framework": "torch", "mode": name if compiled else name.replace("_profiled", ""),
           "precision": "bf16" if compiled else "fp32", "batch": batch, "remat": False}
    if name.endswith("_profiled"):
        rec["profile_syncs"] = True
    return rec


def jax_record_head(batch: int, spec: str) -> dict:
    """The identifying fields of the record of JAX configuration ``mode:precision[:remat][:switch]``."""
    parts = spec.split(":")
    return {"framework": "jax", "mode": parts[0], "precision": parts[1], "batch": batch, "remat": "remat" in parts,
            "dispatch": ("switch" if "switch" in parts else "host") if parts[0] == "single" else None}


def torch_key(name: str, batch: int) -> tuple:
    return record_key(torch_record_head(name, batch))


def jax_key(batch: int, spec: str) -> tuple:
    return record_key(jax_record_head(batch, spec))

