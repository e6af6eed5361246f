"""GPU busy fraction over one timed search epoch of a config (default: configs/default.py).

    python scripts/gpu_busy.py [--preset default] [--data-dir DIR] [--set key=value ...]

Runs one weight epoch to compile and warm up, then traces the next weight epoch with the JAX profiler
and reports the union of GPU kernel intervals over the epoch's wall time (device sync at both ends),
plus images/s. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    import jax
    from compare_pytorch import union_busy

    from asose_jax import config as config_lib
    from asose_jax.cycle import Run, Task
    from asose_jax.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = config_lib.load_config_file(config_lib.preset_path(args.preset))
    overrides = args.overrides + ["checkpoint.enabled=false"] + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    cfg = config_lib.validate(config_lib.apply_overrides(cfg, overrides))
    cfg = dataclasses.replace(cfg, cycle=dataclasses.replace(cfg.cycle, eval_every_epoch=False))
    data = load_dataset(cfg.data, cfg.seed)
    with tempfile.TemporaryDirectory() as tdir:
        run = Run(cfg, data, tdir, progress=False)
        run.init_state()
        t0 = time.perf_counter()
        run.run_epoch(Task("epoch", 1, "weight", 0, 0))
        warm_s = time.perf_counter() - t0
        trace_dir = Path(tdir) / "trace"
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
        t0 = time.perf_counter()
        run.run_epoch(Task("epoch", 1, "weight", 1, 1))
        epoch_s = time.perf_counter() - t0
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
           and "GPU" in str(e.get("args", {}).get("name", ""))}
    row = run.metrics[-1]
    print(json.dumps({"preset": args.preset, "device": jax.devices()[0].device_kind, "epoch_s": epoch_s,
                      "first_epoch_s_with_compile": warm_s, "img_per_s": row["img_per_s"],
                      "gpu_busy": union_busy([(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                                              if e.get("ph") == "X" and e.get("pid") in gpu]),
                      "mode": cfg.mixed_op.mode, "dispatch": cfg.mixed_op.dispatch, "precision": cfg.precision}))


if __name__ == "__main__":
    main()
