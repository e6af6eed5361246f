"""GPU busy fraction over one timed search epoch of a config (default: configs/default.py).

    python scripts/gpu_busy.py [--preset default] [--data-dir DIR] [--set key=value ...]
    python scripts/gpu_busy.py --set mixed_op.mode=routed --set mixed_op.arch_mode=dense   # conditional-free

Runs one weight epoch to compile and warm up, then traces the next weight epoch with the JAX profiler
and reports the union of GPU kernel intervals over the epoch's wall time (device sync at both ends),
plus images/s, and where the time went (``breakdown``: kernel time by kernel, host time by trace event,
the idle gaps between kernels, the host time of XLA's conditional thunks), with the conditionals in one
weight step (``conditionals_per_step``); divide by ``steps`` for per-step figures. Prints one JSON line;
``--keep-trace DIR`` keeps the perfetto trace.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from benchlib import kernel_busy, trace_breakdown, trace_events


def conditionals_per_step(run) -> int | None:
    """How many conditionals (``lax.switch``/``lax.cond``, StableHLO ``case``) one weight step runs, counted on
    its lowering (no compilation); None for the host-dispatched engine, whose per-block programs have none."""
    import numpy as np

    step = run.steps.weight_step
    if not hasattr(step, "lower"):
        return None
    perm = np.zeros((1, run.cfg.data.batch_size), np.int32)
    text = step.lower(run.state, run.x_train, run.y_train, perm, 0, run.steps.sample(run.state)).as_text()
    return text.count("stablehlo.case")


def main() -> None:
    import jax

    from asose_jax import config as config_lib
    from asose_jax.cli import check_registered_names
    from asose_jax.cycle import Run, Task
    from asose_jax.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep-trace", default=None, help="copy the profiler trace (perfetto/Chrome JSON) here")
    args = ap.parse_args()
    cfg = config_lib.load_config_file(config_lib.preset_path(args.preset))
    overrides = args.overrides + ["checkpoint.enabled=false"] + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    cfg = config_lib.validate(check_registered_names(config_lib.apply_overrides(cfg, overrides)))
    cfg = dataclasses.replace(cfg, cycle=dataclasses.replace(cfg.cycle, eval_every_epoch=False))
    data = load_dataset(cfg.data, cfg.seed)
    with tempfile.TemporaryDirectory() as tdir:
        run = Run(cfg, data, tdir, progress=False)
        run.init_state()
        t0 = time.perf_counter()
        run.run_epoch(Task("epoch", 1, "weight", 0, 0))
        warm_s = time.perf_counter() - t0
        timed = {}

        def traced_epoch() -> None:
            t = time.perf_counter()
            run.run_epoch(Task("epoch", 1, "weight", 1, 1))
            timed["epoch_s"] = time.perf_counter() - t
        events, gpu = trace_events(traced_epoch, keep=args.keep_trace)
    row = run.metrics[-1]
    print(json.dumps({"preset": args.preset, "device": jax.devices()[0].device_kind, "epoch_s": timed["epoch_s"],
                      "steps": run.n_weight_steps, "batch": cfg.data.batch_size,
                      "conditionals_per_step": conditionals_per_step(run),
                      "first_epoch_s_with_compile": warm_s, "img_per_s": row["img_per_s"],
                      "gpu_busy": kernel_busy(events, gpu) if gpu else None,
                      "mode": cfg.mixed_op.mode, "dispatch": cfg.mixed_op.dispatch,
                      "arch_mode": cfg.mixed_op.arch_mode or cfg.mixed_op.mode, "precision": cfg.precision,
                      "breakdown": trace_breakdown(events, gpu)}))


if __name__ == "__main__":
    main()
