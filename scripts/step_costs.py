"""FLOPs and bytes of one JAX weight step (XLA's cost analysis) against its measured time and the card's ceilings.

    python scripts/step_costs.py [--configs dense:bf16@128,routed:bf16@128] [--results FILE]
    python scripts/step_costs.py --floors default@128,default@512

Each configuration (``mode:precision[:remat][:switch]@batch``, as in ``compare_pytorch.py``) is the `original`
network's weight step, compiled in this process with ``--xla_gpu_autotune_level=0`` unless ``XLA_FLAGS`` is
set (the counts do not depend on which convolution algorithm runs, and compiling without autotuning takes a
fraction of the time). The measured step time and the ceilings (device-to-device copy GB/s, bf16 matmul
TFLOP/s) come from ``--results`` (``compare_pytorch.py``'s JSON). A conditional counts as its most expensive
branch. Prints one JSON line per configuration and a markdown table.

``--floors PRESET@BATCH,...``: instead, the FLOPs of a preset's routed weight step (its initial network) against
its floor, the mean over the ops of the same step with every row fixed to that op (``benchlib.routed_floor``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchlib import jax_key, jax_record_head, jax_setup, record_key, routed_floor, weight_step_cost

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CONFIGS = ("dense:bf16@128,dense:bf16@512,dense:fp32@512,single:bf16:switch@128,single:fp32:switch@128,"
                   "routed:bf16@128,routed:bf16@512,routed:fp32@512")


def floors(items: str) -> None:
    """Print, per ``PRESET@BATCH``, the routed weight step's FLOPs against its fixed-op floor (JSON, then markdown)."""
    import dataclasses

    from asose_jax import config as config_lib
    rows = []
    for item in items.split(","):
        preset, batch = item.split("@")
        cfg = config_lib.load_config_file(config_lib.preset_path(preset))
        cfg = dataclasses.replace(cfg, mixed_op=dataclasses.replace(cfg.mixed_op, mode="routed", arch_mode="dense"),
                                  data=dataclasses.replace(cfg.data, batch_size=int(batch)))
        row = {"preset": preset, "batch": int(batch), **routed_floor(cfg)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| preset | batch | routed GFLOP | floor GFLOP (mean over ops) | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['routed_flops'] / 1e9:.2f} | {r['floor_flops'] / 1e9:.2f} | "
              f"{r['ratio']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--results", default=str(ROOT / "docs/results/compare_h100.json"))
    ap.add_argument("--floors", default=None,
                    help="PRESET@BATCH,...: the routed weight step's FLOPs against its fixed-op floor")
    args = ap.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    import jax

    if args.floors:
        floors(args.floors)
        return

    results = json.loads(Path(args.results).read_text())
    ceil = results.get("roofline", {})
    measured = {record_key(r): r for r in results["records"] if "weight_ms" in r}
    rows = []
    for item in args.configs.split(","):
        spec, batch = item.split("@")
        head = jax_record_head(int(batch), spec)
        _, x, y, perm, state, steps = jax_setup(head["mode"], head["precision"], head["batch"], head["remat"],
                                                head["dispatch"] or "host")
        cost = weight_step_cost(steps, state, x, y, perm)
        rec = measured.get(jax_key(int(batch), spec), {})
        row = {**head, "gflop": cost["flops"] / 1e9, "gbytes": cost["bytes"] / 1e9, "weight_ms": rec.get("weight_ms"),
               "device": jax.devices()[0].device_kind}
        if row["weight_ms"]:
            s = row["weight_ms"] / 1e3
            row["tflop_per_s"] = row["gflop"] / s / 1e3
            row["gb_per_s"] = row["gbytes"] / s
            if ceil:
                row["pct_matmul_peak"] = 100 * row["tflop_per_s"] / ceil["bf16_matmul_TFLOPs"]
                row["pct_copy_bw"] = 100 * row["gb_per_s"] / ceil["copy_GBps"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| configuration | GFLOP / step | GB / step | weight ms | TFLOP/s (% of bf16 matmul) | GB/s (% of copy) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = f"{r['mode']} {r['precision']}{' switch' if r['dispatch'] == 'switch' else ''} @ {r['batch']}"
        if r["weight_ms"]:
            print(f"| {label} | {r['gflop']:.2f} | {r['gbytes']:.2f} | {r['weight_ms']:.2f} | "
                  f"{r['tflop_per_s']:.2f} ({r.get('pct_matmul_peak', float('nan')):.2f} %) | "
                  f"{r['gb_per_s']:.0f} ({r.get('pct_copy_bw', float('nan')):.1f} %) |")
        else:
            print(f"| {label} | {r['gflop']:.2f} | {r['gbytes']:.2f} | - | - | - |")


if __name__ == "__main__":
    main()
