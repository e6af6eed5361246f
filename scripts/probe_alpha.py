"""Does alpha move in a `cifar10_95`-style search? A small CPU-sized version on real CIFAR-10.

    python scripts/probe_alpha.py --data-dir DIR [--arch-lr 0.02] [--set key=value ...]

C0=8, 10,240 weight images, 5,120 arch-val images, no growth, no final training, 4 cycles (20 arch steps
each). Prints one JSON line: alpha entropy after each arch epoch (the uniform maximum for 11 ops is
2.398 nats), the largest change of any alpha entry, the mean op probability and the genotype.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import jax
    import numpy as np

    from asose_jax import config as config_lib
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--arch-lr", type=float, default=0.02)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = config_lib.load_config_file(config_lib.preset_path("cifar10_95"))
    cfg = config_lib.validate(config_lib.apply_overrides(cfg, [
        f"data.dir={args.data_dir}", "checkpoint.enabled=false", "model.init_channels=8", "data.train_subset=10240",
        "data.arch_val_size=5120", "data.test_subset=1000", "final.enabled=false", "growth.enabled=false",
        "mixed_op.precompile_workers=0", f"arch.lr={args.arch_lr}", "cycle.max_cycles=4"] + args.overrides))
    data = load_dataset(cfg.data, cfg.seed)
    run = Run(cfg, data, tempfile.mkdtemp(), progress=False)
    run.init_state()
    alpha0 = np.asarray(run.state.alpha)
    run.execute()
    alpha = np.asarray(run.state.alpha)
    probs = np.asarray(jax.nn.softmax(alpha, -1)).mean(0)
    print(json.dumps({
        "arch_lr": args.arch_lr,
        "entropy_per_arch_epoch": [round(r["alpha_entropy"], 4) for r in run.metrics
                                   if r.get("event") == "epoch" and r["phase"] == "arch"],
        "max_abs_alpha_change": round(float(np.abs(alpha - alpha0).max()), 4),
        "mean_op_prob": {op: round(float(p), 3) for op, p in zip(cfg.model.ops, probs)},
        "genotype": run.genotype()["ops"]}))


if __name__ == "__main__":
    main()
