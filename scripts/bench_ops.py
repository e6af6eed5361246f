"""Forward+backward time of every primitive, per block shape of the ``original`` network, JAX vs PyTorch.

For each primitive of ``asose_jax.ops.OP_REGISTRY`` (the 10 PRIMITIVES + our ``conv_3x3``, JAX only), each
block shape and each precision (fp32, bf16):

* JAX: ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` with ``loss(params, x) = sum(op(x))`` (train-mode
  BN, output summed in fp32), inputs NHWC in the compute dtype, weights fp32 (cast inside the op, as in
  training). Ops containing depthwise convs are timed with ``DEPTHWISE_IMPL['impl']`` = ``'lax'`` and
  ``'shift'`` (a fresh jit for each), and the impl that ``'auto'`` picks is reported (found by tracing,
  no compile).
* PyTorch: the op module of ``asose_jax.baseline.torch_asose.OPS`` in train mode, input NCHW fp32 (optionally
  also channels_last), ``loss = op(x).float().sum(); loss.backward()`` with grads w.r.t. the weights and ``x``;
  bf16 through ``torch.autocast(device, dtype=torch.bfloat16)``.

Timing: ``--warmup`` calls (the first JAX one includes the compile, reported separately), then the median of
``--iters`` individually timed calls (host wall clock, device synchronised after each call:
``jax.block_until_ready`` / ``torch.cuda.synchronize``), rotating among 3 different random inputs.

Block shapes (inputs of the mixed op of each block of ``original`` C0=32, L=4): (C=32, 32x32, s1),
(C=64, 16x16, s2), (C=128, 4x4, s2), (C=128, 2x2, s1), at batch ``--batch`` (128).

Usage::

    python scripts/bench_ops.py                                  # full run on the GPU (aimed at < ~3 min on an H100)
    python scripts/bench_ops.py --ops sep_conv_7x7,dil_conv_5x5 --shapes 0,1 --precisions bf16
    python scripts/bench_ops.py --shapes 32/32/1,64/16/2         # C/H/stride (square HxH)
    python scripts/bench_ops.py --smoke --out /tmp/b.json --md /tmp/b.md   # CPU smoke check
    python scripts/bench_ops.py --config configs/cifar10_95.py --no-torch --latency-out latency.json
    python scripts/bench_ops.py --convert docs/results/bench_ops_h100.json --latency-out docs/results/latency_h100.json

``--latency-out PATH`` also writes the per-op, per-shape latency table that ``arch.cost=latency:PATH`` reads
(``asose_jax.cost``): one entry per (op, C, H, stride, precision) with the JAX time of the depthwise impl that
training uses (``jax_auto_ms``). An existing table at PATH (same device and measure) keeps the entries this run
does not measure again, so ``--shapes C/H/stride --latency-out PATH`` adds a shape a search lacks. ``--config PATH`` benchmarks the row shapes of that config's initial
network (``asose_jax.cost.row_shapes``) instead of the default list; ``--convert BENCH.json`` writes the
table from an earlier run's JSON without timing anything.

torch is optional: ``--no-torch``, or skipped automatically when it cannot be imported.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from asose_jax import ops as ops_lib

DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((32, 32, 1), (64, 16, 2), (128, 4, 2), (128, 2, 1))
SMOKE_SHAPES: tuple[tuple[int, int, int], ...] = ((8, 8, 1), (8, 8, 2))
JAX_ONLY_OPS = ("conv_3x3",)
N_INPUTS = 3  # distinct random inputs rotated through the timed calls


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------- arguments

def parse_shapes(spec: str | None, smoke: bool) -> list[tuple[int, int, int]]:
    base = list(SMOKE_SHAPES if smoke else DEFAULT_SHAPES)
    if not spec:
        return base
    out = []
    for tok in spec.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.isdigit():
            out.append(base[int(tok)])
        else:
            parts = tok.split("/")
            if len(parts) != 3:
                raise SystemExit(f"--shapes: {tok!r} is neither an index nor C/H/stride")
            out.append(tuple(int(p) for p in parts))
    return out


def shape_label(shape: tuple[int, int, int]) -> str:
    c, h, s = shape
    return f"C{c} {h}x{h} s{s}"


def build_argparser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Forward+backward time per primitive per block shape, JAX (lax vs shift depthwise) vs "
                    "PyTorch.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('Usage::')[1] if 'Usage::' in __doc__ else None)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; 2 with --smoke)")
    ap.add_argument("--ops", default=None,
                    help="comma-separated op names (default: the 10 PRIMITIVES + conv_3x3)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated indices into the default list (the smoke list with --smoke) "
                         f"{[shape_label(s) for s in DEFAULT_SHAPES]} or C/H/stride triples, e.g. 32/32/1")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16 (default fp32,bf16)")
    ap.add_argument("--impls", default="lax,shift",
                    help="depthwise impls timed for ops that contain a depthwise conv (default lax,shift)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; 1 with --smoke)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls, median reported (default 20; 2 with --smoke)")
    ap.add_argument("--seed", type=int, default=0, help="PRNG seed for weights and inputs (default 0)")
    ap.add_argument("--compile-workers", type=int, default=2,
                    help="threads compiling the JAX variants of one (shape, precision) concurrently (default 2; "
                         "1 = serial). More contend for the GPU's autotuner: with 8 an H100 call ran out of time "
                         "after one shape; with 2 the other three shapes took 174 s")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch timings")
    ap.add_argument("--torch-device", default=None, help="default: cuda if available (cpu with --smoke)")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time torch with channels_last memory format (extra column)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU check: batch 2, shapes C8 8x8 s1/s2, 1 warm-up, 2 timed calls")
    ap.add_argument("--config", default=None, metavar="PATH",
                    help="benchmark the row shapes of this config's initial network (replaces the default list)")
    ap.add_argument("--latency-out", default=None, metavar="PATH",
                    help="also write the latency table that arch.cost=latency:PATH reads (entries are added "
                         "to an existing table of the same device)")
    ap.add_argument("--convert", default=None, metavar="BENCH_JSON",
                    help="time nothing: write --latency-out from an earlier run's JSON")
    ap.add_argument("--out", default="docs/results/bench_ops_h100.json", help="JSON output, rewritten after each row (default docs/results/bench_ops_h100.json)")
    ap.add_argument("--md", default="docs/results/bench_ops_h100.md", help="markdown table, rewritten after each row (default docs/results/bench_ops_h100.md)")
    return ap


# ---------------------------------------------------------------------------------------------- JAX

def _jax_dtype(prec: str):
    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[prec]


def depthwise_choice(name: str, shape, prec: str, batch: int) -> str | None:
    """Which depthwise impl ``DEPTHWISE_IMPL='auto'`` uses for this op ('lax', 'shift', 'mixed'), or None when
    the op has no depthwise conv. Found by tracing the forward (``jax.eval_shape``) with ``_use_shift``
    wrapped to record its answers; nothing is compiled."""
    c, h, s = shape
    opdef = ops_lib.OP_REGISTRY[name]
    seen: list[bool] = []
    orig_fn, orig_impl = ops_lib._use_shift, ops_lib.DEPTHWISE_IMPL["impl"]

    def spy(*a, **k):
        r = orig_fn(*a, **k)
        seen.append(bool(r))
        return r

    ops_lib._use_shift = spy
    ops_lib.DEPTHWISE_IMPL["impl"] = "auto"
    try:
        params, stats = jax.eval_shape(lambda: opdef.init(np.random.default_rng(0), c, s))
        x = jax.ShapeDtypeStruct((batch, h, h, c), _jax_dtype(prec))
        jax.eval_shape(lambda p, st, xx: opdef.apply(p, st, xx, s, True), params, stats, x)
    finally:
        ops_lib._use_shift = orig_fn
        ops_lib.DEPTHWISE_IMPL["impl"] = orig_impl
    if not seen:
        return None
    if all(seen):
        return "shift"
    if not any(seen):
        return "lax"
    return "mixed"


def _loss_fn(name: str, stride: int):
    opdef = ops_lib.OP_REGISTRY[name]

    def loss(params, stats, x):
        y, _ = opdef.apply(params, stats, x, stride, True)
        return jnp.sum(y.astype(jnp.float32))

    return loss


def lower_jax(name: str, shape, prec: str, batch: int, impl: str | None):
    """Trace + lower ``jit(value_and_grad(loss, argnums=(params, x)))`` on abstract inputs with the depthwise
    switch set to ``impl`` (None: left as is). The switch is read at trace time, so each call builds a fresh
    jit of a fresh closure; the switch is restored afterwards."""
    c, h, s = shape
    opdef = ops_lib.OP_REGISTRY[name]
    orig_impl = ops_lib.DEPTHWISE_IMPL["impl"]
    if impl is not None:
        ops_lib.DEPTHWISE_IMPL["impl"] = impl
    try:
        params, stats = jax.eval_shape(lambda: opdef.init(np.random.default_rng(0), c, s))
        x = jax.ShapeDtypeStruct((batch, h, h, c), _jax_dtype(prec))
        f = jax.jit(jax.value_and_grad(_loss_fn(name, s), argnums=(0, 2)))
        return f.lower(params, stats, x)
    finally:
        ops_lib.DEPTHWISE_IMPL["impl"] = orig_impl


def compile_all(lowered: dict, workers: int) -> tuple[dict, dict, dict]:
    """Compile every lowered computation, ``workers`` at a time (XLA compiles outside the GIL; on GPU its
    conv autotuning is serialised per device by XLA itself). Returns (compiled, seconds, errors) by key."""
    compiled, secs, errs = {}, {}, {}

    def one(key):
        t0 = time.perf_counter()
        try:
            return key, lowered[key].compile(), time.perf_counter() - t0, None
        except Exception as e:  # noqa: BLE001
            return key, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:500]

    keys = list(lowered)
    if workers <= 1 or len(keys) <= 1:
        results = [one(k) for k in keys]
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, keys))
    for key, exe, dt, err in results:
        secs[key] = dt
        if err is None:
            compiled[key] = exe
        else:
            errs[key] = err
    return compiled, secs, errs


def time_jax(exe, name: str, shape, prec: str, batch: int, warmup: int, iters: int, seed: int) -> dict[str, Any]:
    """Median ms of the compiled value_and_grad over ``iters`` calls (after ``warmup``), 3 random inputs rotated."""
    c, h, s = shape
    opdef = ops_lib.OP_REGISTRY[name]
    dtype = _jax_dtype(prec)
    kx = jax.random.PRNGKey(seed)
    params, stats = opdef.init(np.random.default_rng(seed), c, s)
    xs = [jax.random.normal(k, (batch, h, h, c), jnp.float32).astype(dtype)
          for k in jax.random.split(kx, N_INPUTS)]
    jax.block_until_ready((params, stats, xs))
    t0 = time.perf_counter()
    jax.block_until_ready(exe(params, stats, xs[0]))
    first_s = time.perf_counter() - t0
    for i in range(1, warmup):
        jax.block_until_ready(exe(params, stats, xs[i % N_INPUTS]))
    ts = []
    for i in range(iters):
        x = xs[i % N_INPUTS]
        t0 = time.perf_counter()
        jax.block_until_ready(exe(params, stats, x))
        ts.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "first_call_s": first_s}


# ---------------------------------------------------------------------------------------------- torch

def try_import_torch():
    try:
        import torch  # noqa: F401
        from asose_jax.baseline import torch_asose  # noqa: F401
        return torch, torch_asose
    except Exception as e:  # ImportError, or a broken install
        log(f"[bench_ops] torch unavailable ({type(e).__name__}: {e}); skipping torch timings")
        return None, None


def time_torch(torch, torch_asose, name: str, shape, prec: str, batch: int, device: str, channels_last: bool,
               warmup: int, iters: int, seed: int) -> dict[str, Any]:
    c, h, s = shape
    torch.manual_seed(seed)
    op = torch_asose.OPS[name](c, s).to(device)
    op.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        op = op.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(batch, c, h, h, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_(True)
          for _ in range(N_INPUTS)]
    params = list(op.parameters())
    is_cuda = device.startswith("cuda")
    dev_type = "cuda" if is_cuda else "cpu"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    def step(x):
        for p in params:
            p.grad = None
        x.grad = None
        if prec == "bf16":
            with torch.autocast(dev_type, dtype=torch.bfloat16):
                out = op(x)
        else:
            out = op(x)
        loss = out.float().sum()
        loss.backward()

    for i in range(warmup):
        step(xs[i % N_INPUTS])
    sync()
    ts = []
    for i in range(iters):
        x = xs[i % N_INPUTS]
        sync()
        t0 = time.perf_counter()
        step(x)
        sync()
        ts.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts)}


# ---------------------------------------------------------------------------------------------- output

def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


TABLE_COLS = ("op", "shape", "prec", "jax_lax_ms", "jax_shift_ms", "jax_auto_choice", "torch_ms",
              "torch_cl_ms", "ratio")


def table_rows(rows: list[dict], with_cl: bool) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in TABLE_COLS if with_cl or c != "torch_cl_ms"]
    out = []
    for r in rows:
        vals = {"op": r["op"], "shape": r["shape"], "prec": r["prec"],
                "jax_lax_ms": _fmt(r.get("jax_lax_ms")), "jax_shift_ms": _fmt(r.get("jax_shift_ms")),
                "jax_auto_choice": r.get("jax_auto_choice") or "-", "torch_ms": _fmt(r.get("torch_ms")),
                "torch_cl_ms": _fmt(r.get("torch_cl_ms")), "ratio": _fmt(r.get("ratio_torch_over_jax_best"), 2)}
        out.append([vals[c] for c in cols])
    hdr = [c if c != "ratio" else "torch/jax_best" for c in cols]
    return hdr, out


def text_table(rows: list[dict], with_cl: bool) -> str:
    hdr, body = table_rows(rows, with_cl)
    w = [max(len(hdr[i]), *(len(b[i]) for b in body)) if body else len(hdr[i]) for i in range(len(hdr))]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(v.ljust(w[i]) for i, v in enumerate(b)) for b in body]
    return "\n".join(lines)


def md_table(meta: dict, rows: list[dict], with_cl: bool) -> str:
    hdr, body = table_rows(rows, with_cl)
    a = meta["args"]
    lines = [
        "# Per-primitive forward+backward time, JAX vs PyTorch",
        "",
        f"- device: JAX `{meta['jax_device']}`, torch `{meta.get('torch_device_name', '-')}`; date {meta['date']}",
        f"- versions: jax {meta['versions'].get('jax')}, jaxlib {meta['versions'].get('jaxlib')}, "
        f"torch {meta['versions'].get('torch', '-')}, python {meta['versions'].get('python')}",
        f"- batch {a['batch']}, {a['warmup']} warm-up calls, median of {a['iters']} timed calls (3 random inputs "
        f"rotated), wall clock with a device sync per call; times in ms; JAX variants of one (shape, "
        f"precision) compiled first ({a['compile_workers']} threads), then timed one by one",
        "- JAX: `jit(value_and_grad(sum(op(x))))` w.r.t. (params, x), NHWC, train-mode BN, input in the compute "
        "dtype. Ops without a depthwise conv have one JAX variant, shown in `jax_lax_ms`; `jax_auto_choice` is "
        "the impl `DEPTHWISE_IMPL='auto'` picks.",
        "- torch: `op(x).float().sum().backward()`, NCHW fp32 input, bf16 via autocast"
        + ("; `torch_cl_ms` = channels_last" if with_cl else "") + ". `conv_3x3` is JAX only.",
        "- `torch/jax_best` = torch_ms / min(JAX variants); > 1 means JAX is faster.",
        "",
        "| " + " | ".join(hdr) + " |",
        "|" + "|".join("---" for _ in hdr) + "|",
    ]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines) + "\n"


def write_outputs(path_json: str | None, path_md: str | None, meta: dict, rows: list[dict], with_cl: bool,
                  done: bool) -> None:
    if path_json:
        os.makedirs(os.path.dirname(os.path.abspath(path_json)), exist_ok=True)
        tmp = path_json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"meta": {**meta, "complete": done}, "rows": rows}, fh, indent=1)
        os.replace(tmp, path_json)
    if path_md:
        os.makedirs(os.path.dirname(os.path.abspath(path_md)), exist_ok=True)
        tmp = path_md + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(md_table(meta, rows, with_cl))
            if not done:
                fh.write("\n_(partial: run did not finish)_\n")
        os.replace(tmp, path_md)


def latency_doc(meta: dict, rows: list[dict], source: str) -> dict:
    """The ``asose_jax.cost`` latency table of a run's rows: forward+backward ms per (op, C, H, stride, precision),
    the JAX time of the depthwise impl that training picks (``jax_auto_ms``); rows without one are left out."""
    from asose_jax.cost import LATENCY_FORMAT
    entries = [{"op": r["op"], "channels": r["C"], "height": r["H"], "stride": r["stride"], "precision": r["prec"],
                "ms": r["jax_auto_ms"]} for r in rows if r.get("jax_auto_ms") is not None]
    return {"format": LATENCY_FORMAT, "source": source,
            "measure": f"median ms of jit(value_and_grad(sum(op(x)))) at batch {meta['args']['batch']}, train-mode "
                       f"BN, DEPTHWISE_IMPL='auto'",
            "device": meta["jax_device"], "date": meta["date"], "versions": meta["versions"], "entries": entries}


def merged_latency(path: str, doc: dict) -> dict:
    """``doc`` plus the entries of the table already at ``path`` that it does not measure again, so that measuring
    a missing shape adds it to a table. A table measured on another device or another way is refused."""
    if not os.path.exists(path):
        return doc
    with open(path) as fh:
        old = json.load(fh)
    if not isinstance(old, dict) or old.get("format") != doc["format"]:
        raise SystemExit(f"--latency-out {path} exists and is not a latency table: give another path")
    for field in ("device", "measure"):
        if old.get(field) != doc[field]:
            raise SystemExit(f"--latency-out {path} holds entries with {field} {old.get(field)!r}, this run's is "
                             f"{doc[field]!r}: give another path")

    def key(e: dict) -> tuple:
        return e["op"], e["channels"], e["height"], e["stride"], e["precision"]
    measured = {key(e) for e in doc["entries"]}
    kept = [e for e in old["entries"] if key(e) not in measured]
    return {**doc, "source": f"{old['source']}; then {doc['source']}", "entries": kept + doc["entries"]}


def write_latency(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def config_shapes(path: str) -> list[tuple[int, int, int]]:
    """(C, H, stride) of every distinct row shape of the initial network of the config at ``path``."""
    from asose_jax.config import load_config_file
    from asose_jax.cost import row_shapes
    from asose_jax.model import build_spec
    m = load_config_file(path).model
    spec = build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes, m.stage_width_mult)
    return list(dict.fromkeys((r.channels, r.height, r.stride) for r in row_shapes(spec)))


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> list[dict]:
    args = build_argparser().parse_args(argv)
    if args.convert:
        if not args.latency_out:
            raise SystemExit("--convert needs --latency-out")
        with open(args.convert) as fh:
            bench = json.load(fh)
        write_latency(args.latency_out, latency_doc(bench["meta"], bench["rows"], args.convert))
        log(f"[bench_ops] {args.convert} -> {args.latency_out}")
        return bench["rows"]
    smoke = args.smoke
    batch = args.batch if args.batch is not None else (2 if smoke else 128)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    iters = args.iters if args.iters is not None else (2 if smoke else 20)
    warmup = max(1, warmup)
    iters = max(1, iters)
    shapes = config_shapes(args.config) if args.config else []
    if args.shapes or not args.config:
        shapes += [sh for sh in parse_shapes(args.shapes, smoke) if sh not in shapes]
    workers = max(1, args.compile_workers)
    precs = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precs:
        if p not in ("fp32", "bf16"):
            raise SystemExit(f"--precisions: unknown {p!r}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in ("lax", "shift"):
            raise SystemExit(f"--impls: unknown {i!r} (lax, shift)")
    all_ops = list(ops_lib.PRIMITIVES) + [o for o in ops_lib.OP_REGISTRY if o not in ops_lib.PRIMITIVES]
    op_names = [o.strip() for o in args.ops.split(",")] if args.ops else all_ops
    for o in op_names:
        if o not in ops_lib.OP_REGISTRY:
            raise SystemExit(f"--ops: unknown op {o!r}; known: {sorted(ops_lib.OP_REGISTRY)}")

    torch = torch_asose = None
    if not args.no_torch:
        torch, torch_asose = try_import_torch()
    torch_device = None
    if torch is not None:
        torch_device = args.torch_device or ("cuda" if (torch.cuda.is_available() and not smoke) else "cpu")
        if args.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if smoke and torch_device == "cpu":
            torch.set_num_threads(1)  # tiny CPU ops: avoid oversubscribing cores shared with XLA's pool

    jdev = jax.devices()[0]
    versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    try:
        import jaxlib
        versions["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    meta: dict[str, Any] = {
        "script": "scripts/bench_ops.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "jax_backend": jax.default_backend(),
        "jax_device": getattr(jdev, "device_kind", str(jdev)),
        "jax_default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
        "versions": versions,
        "depthwise_impl_default": ops_lib.DEPTHWISE_IMPL["impl"],
        "args": {"batch": batch, "warmup": warmup, "iters": iters, "shapes": [list(s) for s in shapes],
                 "precisions": precs, "ops": op_names, "impls": impls, "smoke": smoke, "seed": args.seed,
                 "channels_last": args.channels_last,
                 "compile_workers": workers, "cudnn_benchmark": args.cudnn_benchmark,
                 "argv": sys.argv[1:] if argv is None else list(argv)},
    }
    if torch is not None:
        versions["torch"] = torch.__version__
        meta["torch_device"] = torch_device
        meta["torch_device_name"] = (torch.cuda.get_device_name(torch.device(torch_device))
                                     if torch_device.startswith("cuda") else platform.processor() or "cpu")
        meta["torch_cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        meta["torch_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        if torch_device.startswith("cuda"):
            versions["cudnn"] = torch.backends.cudnn.version()
    log(f"[bench_ops] jax {jax.__version__} on {meta['jax_device']} ({jax.default_backend()}); torch "
        f"{versions.get('torch', 'off')} on {torch_device}; batch {batch}, warmup {warmup}, iters {iters}; "
        f"{len(op_names)} ops x {len(shapes)} shapes x {len(precs)} precisions")

    with_cl = bool(args.channels_last and torch is not None)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for shape in shapes:
        c, h, s = shape
        for prec in precs:
            # 1) trace + lower every JAX variant of this (shape, prec) serially (the impl switch is global),
            # 2) compile them all concurrently, 3) time op by op (nothing else running).
            t_grp = time.perf_counter()
            choices: dict[str, Any] = {}
            lowered: dict[tuple[str, str | None], Any] = {}
            lower_err: dict[str, str] = {}
            for name in op_names:
                try:
                    choices[name] = depthwise_choice(name, shape, prec, batch)
                    for impl in (impls if choices[name] is not None else [None]):
                        lowered[(name, impl)] = lower_jax(name, shape, prec, batch, impl)
                except Exception as e:  # noqa: BLE001
                    lower_err[name] = f"{type(e).__name__}: {e}"[:500]
            t_low = time.perf_counter() - t_grp
            compiled, compile_s, compile_err = compile_all(lowered, workers)
            log(f"[bench_ops] {shape_label(shape)} {prec}: lowered {len(lowered)} variants in {t_low:.1f}s, "
                f"compiled in {time.perf_counter() - t_grp - t_low:.1f}s ({workers} workers)")
            for name in op_names:
                row: dict[str, Any] = {"op": name, "shape": shape_label(shape), "C": c, "H": h, "W": h,
                                       "stride": s, "batch": batch, "prec": prec}
                t_row = time.perf_counter()
                try:
                    if name in lower_err:
                        raise RuntimeError(f"lowering failed: {lower_err[name]}")
                    choice = choices[name]
                    row["has_depthwise"] = choice is not None
                    row["jax_auto_choice"] = choice
                    jax_times = {}
                    for impl in (impls if choice is not None else [None]):
                        key = impl or "lax"  # no depthwise conv: the single variant goes to the lax column
                        row[f"jax_{key}_compile_s"] = compile_s.get((name, impl))
                        if (name, impl) in compile_err:
                            row[f"jax_{key}_error"] = compile_err[(name, impl)]
                            log(f"[bench_ops] JAX {name} {shape_label(shape)} {prec} {key}: compile failed: "
                                f"{compile_err[(name, impl)]}")
                            continue
                        try:
                            r = time_jax(compiled.pop((name, impl)), name, shape, prec, batch, warmup, iters,
                                         args.seed)
                        except Exception as e:  # noqa: BLE001
                            row[f"jax_{key}_error"] = f"{type(e).__name__}: {e}"[:500]
                            log(f"[bench_ops] JAX {name} {shape_label(shape)} {prec} {key} failed: "
                                f"{row[f'jax_{key}_error']}")
                            continue
                        jax_times[key] = r["ms"]
                        row[f"jax_{key}_ms"] = r["ms"]
                        row[f"jax_{key}_min_ms"] = r["min_ms"]
                        row[f"jax_{key}_first_call_s"] = r["first_call_s"]
                    if jax_times:
                        best = min(jax_times, key=jax_times.get)
                        row["jax_best_impl"] = best if choice is not None else None
                        row["jax_best_ms"] = jax_times[best]
                        if choice in jax_times:
                            row["jax_auto_ms"] = jax_times[choice]
                            row["jax_auto_is_best"] = choice == best
                        elif choice is None:
                            row["jax_auto_ms"] = jax_times[best]
                except Exception as e:  # keep going; record the failure
                    row["jax_error"] = f"{type(e).__name__}: {e}"[:500]
                    log(f"[bench_ops] JAX {name} {shape_label(shape)} {prec} failed: {row['jax_error']}")
                if torch is not None and name not in JAX_ONLY_OPS and name in torch_asose.OPS:
                    for cl, col in ((False, "torch_ms"), (True, "torch_cl_ms")):
                        if cl and not args.channels_last:
                            continue
                        try:
                            r = time_torch(torch, torch_asose, name, shape, prec, batch, torch_device, cl,
                                           warmup, iters, args.seed)
                            row[col] = r["ms"]
                            row[col.replace("_ms", "_min_ms")] = r["min_ms"]
                        except Exception as e:
                            row[col.replace("_ms", "_error")] = f"{type(e).__name__}: {e}"[:500]
                            log(f"[bench_ops] torch {name} {shape_label(shape)} {prec} cl={cl} failed: "
                                f"{row[col.replace('_ms', '_error')]}")
                tbest = min([v for v in (row.get("torch_ms"), row.get("torch_cl_ms")) if v is not None], default=None)
                row["torch_best_ms"] = tbest
                row["ratio_torch_over_jax_best"] = (tbest / row["jax_best_ms"]
                                                    if tbest is not None and row.get("jax_best_ms") else None)
                row["row_wall_s"] = time.perf_counter() - t_row
                rows.append(row)
                log(f"[{len(rows):3d}] {name:13s} {shape_label(shape):16s} {prec:4s} "
                    f"lax={_fmt(row.get('jax_lax_ms'))} shift={_fmt(row.get('jax_shift_ms'))} "
                    f"auto={row.get('jax_auto_choice') or '-'} torch={_fmt(row.get('torch_ms'))}"
                    + (f" torch_cl={_fmt(row.get('torch_cl_ms'))}" if with_cl else "")
                    + f" ratio={_fmt(row.get('ratio_torch_over_jax_best'), 2)} "
                    f"({row['row_wall_s']:.1f}s, total {time.perf_counter() - t_start:.0f}s)")
                meta["elapsed_s"] = time.perf_counter() - t_start
                write_outputs(args.out, args.md, meta, rows, with_cl, done=False)
    meta["elapsed_s"] = time.perf_counter() - t_start
    write_outputs(args.out, args.md, meta, rows, with_cl, done=True)
    if args.latency_out:
        source = "scripts/bench_ops.py " + " ".join(meta["args"]["argv"])
        write_latency(args.latency_out, merged_latency(args.latency_out, latency_doc(meta, rows, source)))
    log("")
    log(text_table(rows, with_cl))
    log(f"\n[bench_ops] {len(rows)} rows in {meta['elapsed_s']:.1f}s -> {args.out}, {args.md}")
    return rows


if __name__ == "__main__":
    main()
