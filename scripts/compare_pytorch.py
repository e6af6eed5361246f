"""Side-by-side PyTorch vs JAX on one GPU: step time, img/s, peak memory, GPU busy fraction, compile time.

    python scripts/compare_pytorch.py                      # every configuration, batches 128, 256, 512
    python scripts/compare_pytorch.py --resume             # the same, measuring only what --out lacks
    python scripts/compare_pytorch.py --batches 128 --only-main

One command. By default: PyTorch `allops` and `single` at every batch, its profiled and compiled variants at
batch 128; JAX `single`, `dense` and `routed` (its arch steps `dense`: the conditional-free search) in fp32 and
bf16 at every batch, and at batch 128 `topk` and `threshold`, every mode with remat, and the in-program
`lax.switch` single path (``DEFAULT_JAX_CONFIGS``). That is longer than
one 10-minute device call, mostly JAX compilation; ``--resume`` continues an interrupted run. The PyTorch configurations of every batch size run first, in this process; then each
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
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    N_BATCHES,
    batches_u8,
    jax_key,
    jax_record_head,
    jax_setup,
    median_ms,
    paired_arch_mode,
    record_key,
    run_every_op,
    torch_key,
    torch_record_head,
    traced_gpu_busy,
    union_busy,
    weight_step_cost,
)

ROOT = Path(__file__).resolve().parent.parent


# ================================================================================================ JAX worker

def jax_worker(args) -> dict:
    """Compile (into ``--cache-dir`` when given); with ``--compile-only`` return ``compile_s`` and the XLA FLOP
    count; else print READY, wait for GO on stdin, then time, and return the record."""
    import jax
    if args.cache_dir:
        from asose_jax.cli import enable_compilation_cache
        os.environ.update(ASOSE_JAX_CACHE=args.cache_dir, ASOSE_JAX_CACHE_MIN_COMPILE_S="0")
        enable_compilation_cache()

    mode, prec, batch = args.mode, args.precision, args.batch
    spec, x, y, perm, state, S = jax_setup(mode, prec, batch, args.remat, args.dispatch, args.data_dir)
    host = mode == "single" and args.dispatch == "host"
    box = {"state": state, "i": 0}
    sample_for = {S.weight_step: S.sample, S.arch_step: S.arch_sample}

    def step(fn):
        s = box["state"]
        box["state"] = fn(s, x, y, perm, box["i"] % N_BATCHES, sample_for[fn](s))
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
            "dispatch": args.dispatch if mode == "single" else None, "arch_mode": paired_arch_mode(mode) or None,
            "weight_ms": weight_ms, "arch_ms": arch_ms,
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
    ["single:fp32", "single:bf16", "dense:fp32", "dense:bf16", "routed:fp32", "routed:bf16"]
    + [f"{m}:{p}@128" for m in ("topk", "threshold") for p in ("fp32", "bf16")]
    + [f"{m}:{p}:remat@128" for m in ("single", "dense", "topk", "threshold", "routed") for p in ("fp32", "bf16")]
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

def _order(r: dict) -> tuple:
    return (r["batch"], r["framework"] != "torch", r["mode"], r["precision"], bool(r.get("remat")),
            bool(r.get("profile_syncs")), r.get("dispatch") or "")


def _mode_label(r: dict) -> str:
    """The record's mode, with PyTorch's profiling syncs or JAX's in-program ``lax.switch`` path named."""
    return r["mode"] + (" (+profile syncs)" if r.get("profile_syncs") else "") + \
        (" (lax.switch)" if r.get("dispatch") == "switch" else "") + \
        (f" (arch: {r['arch_mode']})" if r.get("arch_mode") else "")


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
    ap.add_argument("--only-main", action="store_true",
                    help="only torch allops/single, JAX dense, single and routed in bf16")
    ap.add_argument("--torch-modes",
                    default="allops,single,single_profiled@128,allops_compiled@128,single_compiled@128",
                    help="PyTorch modes, run at every batch of --batches, or only at batch B with a suffix @B")
    ap.add_argument("--jax-configs", default=",".join(DEFAULT_JAX_CONFIGS),
                    help="JAX configurations mode:precision[:remat][:switch], run at every batch of --batches, "
                         "or only at batch B with a suffix @B (e.g. dense:bf16@512, routed:fp32)")
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
        torch_modes, jax_cfgs = ["allops", "single"], ["single:bf16", "dense:bf16", "routed:bf16"]
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
