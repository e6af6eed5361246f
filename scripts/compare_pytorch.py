"""Side-by-side PyTorch vs JAX on one GPU: step time, img/s, peak memory, GPU busy fraction, compile time.

    python scripts/compare_pytorch.py                      # every configuration, batches 128, 256, 512
    python scripts/compare_pytorch.py --resume             # the same, measuring only what --out lacks
    python scripts/compare_pytorch.py --batches 128 --only-main

One command. By default: PyTorch `allops` and `single` at every batch, its profiled and compiled variants at
batch 128; JAX `single` and `dense` in fp32 and bf16 at every batch, and at batch 128 `topk` and `threshold`,
every mode with remat, and the in-program `lax.switch` single path (``DEFAULT_JAX_CONFIGS``). By the measured
compile and step times that takes about 40 minutes on an H100, mostly JAX compilation; ``--resume``
continues an interrupted run. The PyTorch configurations of every batch size run first, in this process; then each
JAX configuration (of every batch size) runs in a child process (``--worker``) with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that its ``peak_bytes_in_use`` belongs to that configuration
alone. Both sides train the `original` network (C0=32, L=4) on the same uint8 batches (synthetic by
default, real CIFAR-10 with ``--data-dir``), already on the GPU.

Each JAX configuration takes two child processes sharing a fresh persistent compilation cache. The first
compiles every program of the configuration (and runs its XLA cost analysis) into the cache and exits; these
compile in parallel, in waves of ``--jax-parallel`` (0: all at once), so ``compile_s`` is measured under
``compile_parallel`` concurrent compilations (recorded with each JAX record). Then, one configuration at a
time, a second child loads the programs from the cache (``load_s``), prints ``READY``, and times once it
gets ``GO``: only one process touches the GPU while timing, and its ``peak_bytes_in_use`` holds the steps'
memory alone, not the scratch memory XLA's autotuner takes while compiling (a loaded program is not
autotuned again).

Timing: median over 5 chunks of ``--steps`` steps, each chunk closed by a device sync, after warm-up. A JAX
child's warm-up first runs every op of every row in weight and then arch steps (``run_every_op``): a branch's
first run is far slower than the next ones, and random choices leave some branches unrun for many steps.
GPU busy: the union of kernel intervals over the span from the first kernel to the last, from a
profiler trace of 20 steps (JAX: perfetto trace; PyTorch: torch.profiler).
Writes ``--out`` (JSON; with ``--merge`` a new record replaces the old one of the same configuration),
a markdown table (``--md``) and a bar chart (``--png``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import gzip
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
N_BATCHES = 8


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


def batches_u8(batch: int, data_dir: str | None):
    """N_BATCHES batches of uint8 NHWC images and int labels (identical for both frameworks)."""
    n = batch * N_BATCHES
    if data_dir:
        sys.path.insert(0, str(ROOT))
        from asose_jax.data import load_cifar10_dir
        train, _ = load_cifar10_dir(data_dir)
        return train.images[:n], train.labels[:n].astype(np.int32)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, (n,), dtype=np.int32)


def median_ms(run_chunk, steps: int, chunks: int = 5) -> float:
    times = []
    for _ in range(chunks):
        t = time.perf_counter()
        run_chunk(steps)
        times.append(1000 * (time.perf_counter() - t) / steps)
    return statistics.median(times)


# ================================================================================================ JAX worker

def jax_setup(mode: str, precision: str, batch: int, remat: bool = False, dispatch: str = "host",
              data_dir: str | None = None, ops: tuple[str, ...] | None = None):
    """The `original` network (C0=32, L=4) in one mixed-op mode: ``(spec, x, y, perm, state, steps)``, with
    N_BATCHES uint8 batches on the device and ``perm`` ``[N_BATCHES, batch]`` indexing them in order.
    ``ops``: the candidate ops (default: the original's ten)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(ROOT))
    from asose_jax import model
    from asose_jax import steps as steps_lib
    from asose_jax.config import Config, DataConfig, MixedOpConfig, ModelConfig

    model_cfg = ModelConfig(skeleton="original", init_channels=32, num_layers=4)
    if ops is not None:
        model_cfg = dataclasses.replace(model_cfg, ops=tuple(ops))
    cfg = dataclasses.replace(Config(), precision=precision, remat=remat, model=model_cfg,
                              mixed_op=MixedOpConfig(mode=mode, k=3, weight_threshold=0.01, dispatch=dispatch),
                              data=DataConfig(batch_size=batch))
    spec = model.build_spec("original", 32, 4, cfg.model.ops)
    xs, ys = batches_u8(batch, data_dir)
    perm = jnp.arange(batch * N_BATCHES, dtype=jnp.int32).reshape(N_BATCHES, batch)
    state = jax.jit(steps_lib.create_train_state, static_argnums=(1, 2, 3))(jax.random.PRNGKey(0), spec, cfg, N_BATCHES)
    return spec, jnp.asarray(xs), jnp.asarray(ys), perm, state, steps_lib.make_steps(spec, cfg, N_BATCHES)


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


def forced_choices(spec, mode: str, host: bool, k: int = 3) -> list:
    """Op choices that, one step each, run every op of every row: ``[rows, 1]`` op ``j`` everywhere
    (``single``/``argmax``; the host engine's ``{"idx", "noise"}``), ``[rows, k]`` (``topk``), every op
    at once (``threshold``'s keep-mask), or one dummy choice (``dense``). ``topk``: ``k`` consecutive ops from each
    op on, so every op runs in each of a row's ``k`` switches."""
    import jax.numpy as jnp
    n, rows = len(spec.ops), spec.num_rows
    if host:
        return [{"idx": np.full((rows,), j, np.int32), "noise": np.zeros((rows, n), np.float32)} for j in range(n)]
    if mode in ("single", "argmax"):
        return [jnp.full((rows, 1), j, jnp.int32) for j in range(n)]
    if mode == "topk":  # every op in each of the k switches of a row
        return [jnp.tile((j + jnp.arange(k, dtype=jnp.int32)) % n, (rows, 1)) for j in range(n)]
    if mode == "threshold":
        return [jnp.ones((rows, n), bool)]
    return [jnp.zeros((rows, 1), jnp.int32)]


def run_every_op(spec, S, mode: str, host: bool, state, x, y, perm):
    """Weight steps, then arch steps, on ``forced_choices``: compiles every program and runs every branch of every
    conditional once, before timing. The first run of a branch costs far more than the next ones in bf16: the
    ``lax.switch`` path's bf16 arch steps measured 31-147 ms each when timed while branches still ran for the
    first time, 2.1-2.3 ms after this warm-up (H100, docs/benchmarks.md section 2). Returns the state."""
    import jax
    for fn in (S.weight_step, S.arch_step):
        for choice in forced_choices(spec, mode, host):
            state = fn(state, x, y, perm, 0, choice)
        jax.block_until_ready(state)
    return state


def weight_step_cost(S, state, x, y, perm) -> dict:
    """XLA's cost analysis of one compiled weight step: ``{"flops", "bytes"}`` (bytes accessed; a conditional counts
    as its most expensive branch)."""
    cost = S.weight_step.lower(state, x, y, perm, 0, S.sample(state)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def jax_worker(args) -> dict:
    """Compile (into ``--cache-dir`` when given); with ``--compile-only`` return ``compile_s`` and the XLA FLOP
    count; else print READY, wait for GO on stdin, then time, and return the record."""
    import jax
    sys.path.insert(0, str(ROOT))
    if args.cache_dir:
        from asose_jax.search import enable_compilation_cache
        os.environ.update(ASOSE_JAX_CACHE=args.cache_dir, ASOSE_JAX_CACHE_MIN_COMPILE_S="0")
        enable_compilation_cache()

    mode, prec, batch = args.mode, args.precision, args.batch
    spec, x, y, perm, state, S = jax_setup(mode, prec, batch, args.remat, args.dispatch, args.data_dir)
    host = mode == "single" and args.dispatch == "host"
    box = {"state": state, "i": 0}

    def step(fn):
        s = box["state"]
        box["state"] = fn(s, x, y, perm, box["i"] % N_BATCHES, S.sample(s))
        box["i"] += 1

    def chunk(fn):
        def run(n):
            for _ in range(n):
                step(fn)
            jax.block_until_ready(box["state"])
        return run

    t0 = time.perf_counter()
    box["state"] = run_every_op(spec, S, mode, host, box["state"], x, y, perm)
    compile_s = time.perf_counter() - t0
    cost = {}
    if args.compile_only and not host:
        try:
            cost = weight_step_cost(S, box["state"], x, y, perm)
        except Exception:  # cost analysis is best effort
            cost = {}
    if args.compile_only:
        return {"compile_s": compile_s, "xla_flops_per_step": cost.get("flops"),
                "xla_bytes_per_step": cost.get("bytes")}
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        sys.exit("no GO from the parent")

    chunk(S.weight_step)(10)
    weight_ms = median_ms(chunk(S.weight_step), args.steps)
    chunk(S.arch_step)(5)
    arch_ms = median_ms(chunk(S.arch_step), max(args.steps // 2, 5))
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 20
    chunk(S.weight_step)(3)
    busy = traced_gpu_busy(lambda: chunk(S.weight_step)(20))
    return {"framework": "jax", "mode": mode, "precision": prec, "batch": batch, "remat": bool(args.remat),
            "dispatch": args.dispatch if mode == "single" else None, "weight_ms": weight_ms, "arch_ms": arch_ms,
            "img_per_s": batch / weight_ms * 1000, "peak_mib": peak, "gpu_busy": busy, "compile_s": compile_s}


class JaxChild:
    """A ``--worker`` process for one JAX job; its stdout lines arrive on a queue (None at EOF), its
    stderr goes to a temporary file so that a full pipe cannot block it."""

    def __init__(self, batch: int, spec: str, args, cache_dir: str | None = None, compile_only: bool = False):
        self.batch, self.parts = batch, spec.split(":")
        cmd = [sys.executable, __file__, "--worker", "--mode", self.parts[0], "--precision", self.parts[1],
               "--batch", str(batch), "--steps", str(args.steps)]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
        if compile_only:
            cmd.append("--compile-only")
        if "remat" in self.parts:
            cmd.append("--remat")
        if "switch" in self.parts:
            cmd += ["--dispatch", "switch"]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next_line(self, deadline: float | None) -> str | None:
        """The child's next stdout line (None at its end); past ``deadline``, kill it and raise TimeoutError."""
        try:
            return self.lines.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
        except queue.Empty:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError from None

    def _result(self, deadline: float | None = None) -> dict | None:
        """The RESULT record the child prints before it exits (None if it prints none); waits for the exit."""
        rec = None
        while (line := self._next_line(deadline)) is not None:
            if line.startswith("RESULT "):
                rec = json.loads(line[len("RESULT "):])
        self.proc.wait()
        return rec

    def _close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.stderr.close()

    def wait_ready(self, deadline: float) -> str | None:
        """None once the child prints READY; else why not (it exited, or missed the deadline and is killed)."""
        while True:
            try:
                line = self._next_line(deadline)
            except TimeoutError:
                return "not READY within --ready-timeout, killed"
            if line == "READY":
                return None
            if line is None:
                self.proc.wait()
                return self._last_stderr()

    def compiled(self, deadline: float) -> dict:
        """The RESULT of a ``--compile-only`` child (``compile_s``, ``xla_flops_per_step``), or ``{"error": why}``."""
        try:
            rec = self._result(deadline) or {"error": self._last_stderr()}
        except TimeoutError:
            rec = {"error": "not compiled within --ready-timeout, killed"}
        self._close()
        return rec

    def run(self, ready_error: str | None) -> dict:
        """Send GO to a ready child and return its RESULT record, or the error record."""
        rec, error = None, ready_error
        if error is None:
            with contextlib.suppress(BrokenPipeError):  # if it died after READY, its stderr tells why
                self.proc.stdin.write("GO\n")
                self.proc.stdin.flush()
            rec = self._result()
            error = None if rec else self._last_stderr()
        self._close()
        return rec or {**jax_record_head(self.batch, ":".join(self.parts)), "error": error}

    def _last_stderr(self) -> str:
        self.stderr.seek(0)
        return (self.stderr.read().strip().splitlines() or ["?"])[-1][:300]


# the matrix: every mode in both precisions, with and without remat, at batch 128; the plain modes
# at every batch; the in-program `lax.switch` single path for reference
DEFAULT_JAX_CONFIGS = (
    ["single:fp32", "single:bf16", "dense:fp32", "dense:bf16"]
    + [f"{m}:{p}@128" for m in ("topk", "threshold") for p in ("fp32", "bf16")]
    + [f"{m}:{p}:remat@128" for m in ("single", "dense", "topk", "threshold") for p in ("fp32", "bf16")]
    + ["single:fp32:switch@128"])


def at_batch(specs: list[str], batch: int) -> list[str]:
    """The names of ``specs`` (``name`` or ``name@B``) that run at ``batch``."""
    out = []
    for spec in specs:
        name, _, pinned = spec.partition("@")
        if not pinned or int(pinned) == batch:
            out.append(name)
    return out


def jax_jobs(batches: list[int], specs: list[str]) -> list[tuple[int, str]]:
    """(batch, config) pairs in the order given: a config ``name@B`` runs once, at batch B; the others
    at every batch of ``batches``."""
    jobs = []
    for batch in batches:
        for spec in specs:
            name, _, pinned = spec.partition("@")
            if not pinned:
                jobs.append((batch, name))
            elif batch == batches[0]:
                jobs.append((int(pinned), name))
    return jobs


def pending(batches: list[int], torch_modes: list[str], jax_cfgs: list[str], measured: list[dict]):
    """What is left to run: ``[(batch, [torch mode, ...]), ...]`` and the JAX ``[(batch, config), ...]``, leaving
    out every configuration that ``measured`` (earlier records) holds without an error."""
    done = {record_key(r) for r in measured if "error" not in r}
    torch_todo = [(b, [m for m in at_batch(torch_modes, b) if torch_key(m, b) not in done]) for b in batches]
    return ([(b, modes) for b, modes in torch_todo if modes],
            [(b, spec) for b, spec in jax_jobs(batches, jax_cfgs) if jax_key(b, spec) not in done])


def run_jax_wave(jobs: list[tuple[int, str]], args, add) -> None:
    """Compile every job of the wave concurrently into its own cache, then load and time them one at a time."""
    with tempfile.TemporaryDirectory(prefix="compare_xla_") as root:
        caches = [str(Path(root) / str(i)) for i in range(len(jobs))]
        compilers = [JaxChild(batch, spec, args, cache, compile_only=True)
                     for (batch, spec), cache in zip(jobs, caches)]
        deadline = time.monotonic() + args.ready_timeout
        compiled = [child.compiled(deadline) for child in compilers]
        for (batch, spec), cache, comp in zip(jobs, caches, compiled):
            if "error" in comp:
                rec = {**jax_record_head(batch, spec), "error": comp["error"]}
            else:
                child = JaxChild(batch, spec, args, cache)
                rec = child.run(child.wait_ready(time.monotonic() + args.ready_timeout))
                if "error" not in rec:
                    rec["load_s"] = rec.pop("compile_s")
                    rec.update(comp, peak_after_cache_load=True)
            rec["compile_parallel"] = len(jobs)
            print(json.dumps(rec), flush=True)
            add(rec)


# ================================================================================================ torch

def torch_records(batch: int, steps: int, data_dir: str | None, modes: list[str]) -> list[dict]:
    import torch
    sys.path.insert(0, str(ROOT))
    from asose_jax.baseline import torch_asose as ta

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    xs, ys = batches_u8(batch, data_dir)
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.2023, 0.1994, 0.2010], device=dev).view(1, 3, 1, 1) * 255
    xb = [((torch.from_numpy(xs[i * batch:(i + 1) * batch]).to(dev).permute(0, 3, 1, 2).float() - mean) / std)
          for i in range(N_BATCHES)]
    yb = [torch.from_numpy(ys[i * batch:(i + 1) * batch]).long().to(dev) for i in range(N_BATCHES)]
    out = []
    for name in modes:
        compiled = name.endswith("_compiled")
        base_mode = name.replace("_compiled", "").replace("_profiled", "")
        torch.manual_seed(0)
        net = ta.TorchASOSE(32, 4, mode=base_mode).to(dev)
        net.profile_syncs = name.endswith("_profiled")
        inputs = xb
        if compiled:
            net = net.to(memory_format=torch.channels_last)
            inputs = [t.contiguous(memory_format=torch.channels_last) for t in xb]
        opt_w, opt_a = ta.make_optimizers(net)
        runner = torch.compile(net) if compiled else net
        ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if compiled else None
        box = {"i": 0}

        def run(fn, n):
            for _ in range(n):
                i = box["i"] % N_BATCHES
                if ctx:
                    with ctx():
                        fn(runner, opt_w if fn is ta.weight_step else opt_a, inputs[i], yb[i])
                else:
                    fn(runner, opt_w if fn is ta.weight_step else opt_a, inputs[i], yb[i])
                box["i"] += 1
            sync()
        rec = torch_record_head(name, batch)
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run(ta.weight_step, 3)
            run(ta.arch_step, 3)
            rec["compile_s"] = time.perf_counter() - t0
            run(ta.weight_step, 5)
            rec["weight_ms"] = median_ms(lambda n: run(ta.weight_step, n), steps)
            rec["arch_ms"] = median_ms(lambda n: run(ta.arch_step, n), max(steps // 2, 5))
            rec["img_per_s"] = batch / rec["weight_ms"] * 1000
            rec["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else float("nan")
            rec["gpu_busy"] = float("nan")
            if dev.type == "cuda":
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run(ta.weight_step, 20)
                iv = [(e.time_range.start, e.time_range.end) for e in prof.events()
                      if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
                rec["gpu_busy"] = union_busy(iv)
        except Exception as e:  # e.g. torch.compile failing on the data-dependent single path
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(json.dumps(rec), flush=True)
        out.append(rec)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def roofline() -> dict:
    """Measured ceilings: device-to-device copy bandwidth and bf16 matmul rate (PyTorch)."""
    import torch
    a = torch.empty(2 ** 30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 2 * 10 / (time.perf_counter() - t)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        m @ m
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        m @ m
    torch.cuda.synchronize()
    tflops = 2 * 8192 ** 3 * 10 / (time.perf_counter() - t) / 1e12
    del a, b, m
    torch.cuda.empty_cache()
    return {"copy_GBps": bw / 1e9, "bf16_matmul_TFLOPs": tflops}


# ================================================================================================ report

def record_key(rec: dict) -> tuple:
    """What makes two records the same measurement (``--merge`` keeps only the newer)."""
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


def _order(r: dict) -> tuple:
    return (r["batch"], r["framework"] != "torch", r["mode"], r["precision"], bool(r.get("remat")),
            bool(r.get("profile_syncs")), r.get("dispatch") or "")


def _mode_label(r: dict) -> str:
    """The record's mode, with PyTorch's profiling syncs or JAX's in-program ``lax.switch`` path named."""
    return r["mode"] + (" (+profile syncs)" if r.get("profile_syncs") else "") + \
        (" (lax.switch)" if r.get("dispatch") == "switch" else "")


def write_outputs(result: dict, md_path: Path, png_path: Path) -> None:
    """Markdown table (ordered by batch, framework, mode) and a two-panel chart: img/s of every
    configuration at the smallest batch, and img/s against the batch size."""
    recs = sorted((r for r in result["records"] if "weight_ms" in r), key=_order)
    lines = ["| framework | mode | precision | batch | remat | weight ms | arch ms | img/s | peak MiB | GPU busy | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        mode = _mode_label(r)
        par = r.get("compile_parallel") or 1
        compile_cell = f"{r['compile_s']:.1f}" + (f" ({par} at once)" if par > 1 else "")
        # JAX peaks of records from before the two-child measurement include the autotuner's scratch: bounds
        bound = "<= " if r["framework"] == "jax" and not r.get("peak_after_cache_load") else ""
        lines.append(f"| {r['framework']} | {mode} | {r['precision']} | {r['batch']} | {'yes' if r['remat'] else 'no'} | "
                     f"{r['weight_ms']:.2f} | {r['arch_ms']:.2f} | {r['img_per_s']:,.0f} | "
                     f"{bound}{r['peak_mib']:.0f} | "
                     f"{r['gpu_busy']:.2f} | {compile_cell} |")
    for r in result["records"]:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['mode']} | {r['precision']} | {r['batch']} | – | failed: {r['error']} |||||||")
    md_path.write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    small = min((r["batch"] for r in recs), default=0)
    first = [r for r in recs if r["batch"] == small and not r["remat"]]
    labels = [f"{r['framework']}\n{_mode_label(r)}\n{r['precision']}".replace(" (", "\n(") for r in first]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(first)) + 5, 4.5),
                                  gridspec_kw={"width_ratios": [max(8, 0.9 * len(first)), 5]})
    ax.bar(range(len(first)), [r["img_per_s"] for r in first],
           color=["tab:red" if r["framework"] == "torch" else "tab:blue" for r in first])
    ax.set_xticks(range(len(first)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("weight-step images / s")
    ax.set_yscale("log")
    ax.set_title(f"`original` network, batch {small}, {result['device']} (red: PyTorch, blue: JAX)", fontsize=9)
    series: dict[tuple, list] = {}
    for r in recs:
        if not r["remat"] and not r.get("profile_syncs"):
            series.setdefault((r["framework"], _mode_label(r), r["precision"]), []).append((r["batch"], r["img_per_s"]))
    for (fw, mode, prec), pts in series.items():
        if len(pts) > 1:
            ax2.plot(*zip(*sorted(pts)), marker="o", linestyle="-" if fw == "jax" else "--",
                     label=f"{fw} {mode} {prec}")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("weight-step images / s")
    ax2.set_title("throughput against batch size", fontsize=9)
    if ax2.get_lines():
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="128,256,512")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    ap.add_argument("--data-dir", default=None, help="cifar-10-batches-py dir for real batches (default: synthetic)")
    ap.add_argument("--only", choices=["torch", "jax"], default=None)
    ap.add_argument("--only-main", action="store_true", help="only torch allops/single, JAX dense bf16 and single")
    ap.add_argument("--torch-modes",
                    default="allops,single,single_profiled@128,allops_compiled@128,single_compiled@128",
                    help="PyTorch modes, run at every batch of --batches, or only at batch B with a suffix @B")
    ap.add_argument("--jax-configs", default=",".join(DEFAULT_JAX_CONFIGS),
                    help="JAX configurations mode:precision[:remat][:switch], run at every batch of --batches, "
                         "or only at batch B with a suffix @B (e.g. dense:bf16@512)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/compare_h100.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/results/compare_h100.md"))
    ap.add_argument("--png", default=str(ROOT / "docs/results/compare_h100.png"))
    ap.add_argument("--jax-parallel", type=int, default=3,
                    help="JAX children compiling at once (default 3; 0: all; 1: one after the other); timing is "
                         "always serial. More than ~3 contend for the GPU's autotuner and compile slower")
    ap.add_argument("--ready-timeout", type=float, default=900,
                    help="seconds a JAX wave may take to compile (and a child to load its compiled programs) "
                         "before the child is killed")
    ap.add_argument("--merge", action="store_true",
                    help="keep the records already in --out, replacing those of a configuration measured again")
    ap.add_argument("--resume", action="store_true",
                    help="like --merge, and skip every configuration that --out already holds without an error: "
                         "re-running the same command after an interruption measures only what is missing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dispatch", default="host", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(jax_worker(args)), flush=True)
        return

    import jax
    import torch
    out_path = Path(args.out)
    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "jax": jax.__version__, "python": sys.version.split()[0]},
              "command": "python " + " ".join(sys.argv), "records": []}
    old_records, new_records = [], []  # with --merge, an old record goes when a new one of its key comes
    if (args.merge or args.resume) and out_path.exists():
        old = json.loads(out_path.read_text())
        old_records = old["records"]
        result["records"] = list(old_records)
        result["roofline"] = old.get("roofline")
    if not result.get("roofline") and cuda:
        result["roofline"] = roofline()
        print(json.dumps(result["roofline"]), flush=True)

    def add(rec: dict) -> None:
        old_records[:] = [r for r in old_records if record_key(r) != record_key(rec)]
        new_records.append(rec)
        result["records"] = old_records + new_records
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    batches = [int(b) for b in args.batches.split(",")]
    torch_modes, jax_cfgs = args.torch_modes.split(","), args.jax_configs.split(",")
    if args.only_main:
        torch_modes, jax_cfgs = ["allops", "single"], ["single:bf16", "dense:bf16"]
    torch_todo, jobs = pending(batches, torch_modes, jax_cfgs, old_records if args.resume else [])
    try:
        if args.only != "jax":
            for batch, modes in torch_todo:
                for rec in torch_records(batch, args.steps, args.data_dir, modes):
                    add(rec)
        if args.only != "torch":
            wave = args.jax_parallel or len(jobs)
            for i in range(0, len(jobs), wave):
                run_jax_wave(jobs[i:i + wave], args, add)
    finally:  # an interrupted run (Ctrl-C, the call's limit) still leaves the table and chart of what it has
        write_outputs(result, Path(args.md), Path(args.png))
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
