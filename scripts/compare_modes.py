"""Accuracy of the search with ASO-SE's alpha-sampled weight steps against the conditional-free search (issue 19).

    python scripts/compare_modes.py --seeds 0,1,2 --data-dir DIR [--out runs/compare_modes/records.jsonl]

For each seed and each mode of ``--modes``, one search of ``--preset`` (default: ``default``) in a subprocess, with
the same ``--set`` overrides (default: CPU-sized, ``SIZE_SETS``) and that mode's ``MODE_SETS``:

* ``single``: hard-Gumbel single-path weight and arch steps through the host-dispatched engine (the default
  preset's search before issue 19);
* ``routed``: routed weight steps (every image through one op, uniformly) and dense arch steps, each one program.

Each run appends one JSON line to ``--out``: mode, seed, the arch-val accuracy of the derived (argmax) network
with the supernet's weights (what the search decides on), its test accuracy (reported, not used to choose),
the search's wall time (compilation included: each run has its own XLA cache), the device, the command, the
commit and the date. A (mode, seed) already in ``--out`` is not run again, and a run killed midway resumes from
its workdir. Then a table of mean ± std per mode is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODE_SETS = {
    "single": ["mixed_op.mode=single", "mixed_op.dispatch=host", "mixed_op.arch_mode="],
    "routed": ["mixed_op.mode=routed", "mixed_op.arch_mode=dense"],
}
SIZE_SETS = ["data.train_subset=5000", "data.arch_val_size=2000", "cycle.max_cycles=2"]

logger = logging.getLogger("compare_modes")


def search_command(preset: str, mode: str, seed: int, workdir: Path, sets: list[str],
                   data_dir: str | None) -> list[str]:
    """The search of one (mode, seed): ``python -m asose_jax.search`` with the size, mode and seed overrides."""
    cmd = [sys.executable, "-m", "asose_jax.search", "--preset", preset, "--workdir", str(workdir), "--no-progress"]
    for item in sets + MODE_SETS[mode] + [f"seed={seed}"]:
        cmd += ["--set", item]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


def run_one(args, mode: str, seed: int) -> dict:
    """One search to its end (resuming its workdir); its record."""
    from asose_jax.study import git_commit
    workdir = Path(args.runs) / f"{mode}_s{seed}"
    cmd = search_command(args.preset, mode, seed, workdir, args.sets, args.data_dir)
    env = {**os.environ, "ASOSE_JAX_CACHE": str(Path(args.runs) / "xla" / f"{mode}_s{seed}")}
    logger.info("%s seed %d: %s", mode, seed, shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} seed {seed} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = json.loads((workdir / "result.json").read_text())
    genotype = json.loads((workdir / "genotype.json").read_text())
    return {"mode": mode, "seed": seed, "arch_val_acc": result["arch_val_acc"], "test_acc": result["test_acc"],
            "wall_s": result["wall_s"], "layers": result["layers"], "params": result["params"],
            "genotype": genotype.get("ops"), "device": result["device"], "command": shlex.join(cmd),
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict], modes: list[str]) -> str:
    """Markdown: per mode, the seeds and mean ± std (sample std) of arch-val accuracy, test accuracy and wall time."""
    lines = ["| mode | seeds | arch-val acc % | test acc % | search wall s |", "|---|---|---|---|---|"]
    for mode in modes:
        rs = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["seed"])
        lines.append(f"| {mode} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{mean_std([r['arch_val_acc'] for r in rs])} | {mean_std([r['test_acc'] for r in rs])} | "
                     f"{mean_std([r['wall_s'] for r in rs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--modes", default="single,routed", help=f"comma-separated, of: {', '.join(MODE_SETS)}")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--data-dir", default=None, help="cifar-10-batches-py directory (else the preset's data source)")
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help=f"a config override for every run, repeatable (default: {' '.join(SIZE_SETS)})")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "compare_modes"), help="workdirs and XLA caches go here")
    ap.add_argument("--out", default=None, help="JSONL records (default: RUNS/records.jsonl)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.sets = SIZE_SETS if args.sets is None else args.sets
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODE_SETS]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODE_SETS)}")
    args.runs = str(Path(args.runs).resolve())  # the searches run in the repository root
    out = Path(args.out or Path(args.runs) / "records.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["mode"], r["seed"]) for r in read_records(out)}
    for seed in (int(s) for s in args.seeds.split(",")):
        for mode in modes:
            if (mode, seed) in done:
                continue
            rec = run_one(args, mode, seed)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            logger.info("%s seed %d: arch-val %.2f %%, test %.2f %%, %.0f s", mode, seed, rec["arch_val_acc"],
                        rec["test_acc"], rec["wall_s"])
    print(table(read_records(out), modes))


if __name__ == "__main__":
    main()
