"""Final-training throughput probe: ``train_final`` on synthetic 50k images for a few derived networks.

    python scripts/probe_final.py [--epochs 2] [--runs conv128,sep128,mixed128] [--out probe_final.json]

Each run builds a `resnet`-skeleton genotype of 8 blocks (the `cifar10_95` search layout) with the given
ops and final width, trains it with the `cifar10_95` final recipe for ``--epochs`` epochs and prints one
JSON line: weights, wall time per epoch (the first includes compilation) and images/s. Used to size the
final training of `configs/cifar10_95.py` before a real run (accuracy on synthetic data means nothing).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIXED = ["conv_3x3", "sep_conv_3x3", "conv_3x3", "dil_conv_3x3", ["conv_3x3", "skip_connect"], "sep_conv_5x5",
         "conv_3x3", "skip_connect"]
GENOTYPES = {"conv": ["conv_3x3"] * 8, "sep": ["sep_conv_3x3"] * 8, "mixed": MIXED}


def chain_genotype(ops: list, c0: int = 32) -> dict:
    """A genotype on the `build_spec` layout: stride 2 (channels doubled) at blocks L//3 and 2L//3."""
    down = {len(ops) // 3, 2 * len(ops) // 3}
    blocks, c = [], c0
    for i in range(len(ops)):
        s = 2 if i in down else 1
        blocks.append({"c_in": c, "c_out": c * 2 if s == 2 else c, "stride": s})
        c = blocks[-1]["c_out"]
    return {"stem_channels": c0, "num_classes": 10, "ops": ops, "blocks": blocks}


def main() -> None:
    import jax

    from asose_jax import config as config_lib
    from asose_jax.data import Dataset, split_arch_val, synthetic_cifar
    from asose_jax.train import train_final

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--runs", default="conv96,conv128,sep128,mixed128", help="NAME+WIDTH, NAME in conv|sep|mixed")
    ap.add_argument("--out", default=None, help="also write the rows as a JSON list")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = config_lib.load_config_file(config_lib.preset_path("cifar10_95"))
    train, test = synthetic_cifar(50000, 10000, 0)
    weights, arch_val = split_arch_val(train, 10000, 0)
    data = Dataset(weights, arch_val, test, "synthetic")
    rows = []
    for run in args.runs.split(","):
        name, width = run.rstrip("0123456789"), int(run[len(run.rstrip("0123456789")):])
        cfg = replace(base, final=replace(base.final, epochs=args.epochs, width=width, eval_every=0),
                      checkpoint=replace(base.checkpoint, enabled=False))
        t0 = time.perf_counter()
        workdir = Path(tempfile.mkdtemp())
        result = train_final(cfg, chain_genotype(GENOTYPES[name]), data, workdir, progress=False)
        metrics = [json.loads(line) for line in (workdir / "final_metrics.jsonl").read_text().splitlines() if line]
        row = {"run": run, "params": result["params"], "total_s": round(time.perf_counter() - t0, 1),
               "epoch_end_s": [round(m["wall_s"], 1) for m in metrics],
               "img_per_s": [round(m["img_per_s"]) for m in metrics], "device": result["device"],
               "jax": jax.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
