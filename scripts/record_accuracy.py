"""Append one full run (search + final training, or a final training alone) to docs/results/accuracy_h100.json
and redraw the accuracy-vs-wall-clock chart from every record there.

    python scripts/record_accuracy.py --run runs/c95 --config configs/cifar10_95.py --kind searched \\
        [--final-dir DIR] [--process-wall-s S] [--note TEXT] [--out docs/results/accuracy_h100.json] [--png ...]

``--run`` is a search workdir (``result.json``, ``metrics.jsonl``, ``genotype.json``); for a final training
alone (the ablation: ``python -m asose_jax.final``) pass its workdir as ``--final-dir`` and leave ``--run``
out. ``--process-wall-s`` is the wall time of the command(s) as measured outside Python (all resumed
segments summed, interpreter start and data loading included); it is stored next to the run's own clock.
Record fields: ``config, kind, seed, search_wall_s, final_wall_s, total_wall_s, process_wall_s, test_acc,
test_acc_tta, tta, best_of, params, genotype, device, date, curve`` (``curve``: [wall s, accuracy %, what]), and
``note`` when given.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from asose_jax.config import tta_label


BAR_ACC, BAR_WALL_S = 95.0, 900.0  # issue [E]: test accuracy % (best of plain and TTA) within the total wall s


def meets_bar(record: dict) -> bool:
    """A searched run (not an ablation) with test accuracy >= BAR_ACC (plain or TTA) in <= BAR_WALL_S in all."""
    return (record["kind"].startswith("searched") and record["test_acc"] is not None
            and max(record["test_acc"], record["test_acc_tta"]) >= BAR_ACC and record["total_wall_s"] <= BAR_WALL_S)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def build_record(args) -> dict:
    run = Path(args.run) if args.run else None
    final_dir = Path(args.final_dir) if args.final_dir else run
    final = json.loads((final_dir / "final.json").read_text())
    cfg = json.loads((final_dir / "config.json").read_text())["config"]
    search_wall, curve = 0.0, []
    if run is not None:
        result = json.loads((run / "result.json").read_text())
        search_wall = float(result["wall_s"])
        curve += [[r["wall_s"], r["val_acc"], "arch-val accuracy (search)"] for r in _jsonl(run / "metrics.jsonl")
                  if r.get("event") == "cycle_end"]
    what = f"test accuracy, {tta_label(final)} (final training)"
    for r in _jsonl(final_dir / "final_metrics.jsonl"):  # runs with final.val_size > 0 evaluate the val split
        split = "test" if "test_acc_tta" in r else "val" if "val_acc_tta" in r else None
        if split:
            curve.append([search_wall + r["wall_s"], r[f"{split}_acc_tta"], what.replace("test", split, 1)])
    total = search_wall + float(final["wall_s"])
    curve.append([total, final["test_acc_tta"], what])
    best_tta = final["test_acc_tta"] >= final["test_acc"]
    return {"config": args.config, "kind": args.kind, "seed": cfg["seed"], "search_wall_s": round(search_wall, 1),
            "final_wall_s": round(float(final["wall_s"]), 1), "total_wall_s": round(total, 1),
            "process_wall_s": args.process_wall_s, "test_acc": final["test_acc"], "test_acc_tta": final["test_acc_tta"],
            "tta": final.get("tta", "flip"), "best_of": "tta" if best_tta else "plain", "params": final["params"], "genotype": final["genotype"]["ops"],
            "device": final["device"], "date": args.date, "curve": curve}


def plot(records: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(records):
        if r["test_acc"] is None:  # a run that failed (its record says why) has no curve
            continue
        pts = [p for p in r["curve"] if p[1] >= 50]
        best = max(r["test_acc"], r["test_acc_tta"])
        searched, passed = r["kind"].startswith("searched"), meets_bar(r)
        label = f"{r['kind']} (seed {r['seed']}): {best:.2f} % in {r['total_wall_s']:.0f} s{' [bar met]' if passed else ''}"
        # searches solid, ablations dashed; a search that meets the bar in black, thick, a star at its end
        color = "black" if passed else colors[i % len(colors)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if searched else "--", marker="o", ms=3,
                lw=2.5 if passed else 1.3, zorder=3 if passed else 2, color=color, label=label)
        if passed:
            ax.plot(pts[-1][0], pts[-1][1], "*", ms=15, color="gold", mec="black", zorder=4)
    ax.axhline(BAR_ACC, color="grey", ls="--", lw=0.8)
    ax.axvline(BAR_WALL_S, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("wall-clock s (search + final training, compile included)")
    ax.set_ylabel("accuracy %")
    ax.set_title("CIFAR-10: accuracy vs wall-clock (arch-val during search, test during final training)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    """Append the run given on the command line, then redraw the chart from every record."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="search workdir")
    ap.add_argument("--final-dir", help="final-training workdir (default: --run)")
    ap.add_argument("--config", required=True, help="config file the run used, as typed on the command line")
    ap.add_argument("--kind", default="searched", help="searched | random_s<seed> | all_sep_conv_3x3 | ...")
    ap.add_argument("--process-wall-s", type=float, default=None)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--note", default=None, help="free text stored with the record (how the run was made)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/accuracy_h100.json"))
    ap.add_argument("--png", default=str(ROOT / "docs/results/accuracy_vs_wall.png"))
    args = ap.parse_args()
    if not args.run and not args.final_dir:
        raise SystemExit("error: give --run (search workdir) or --final-dir (final-training workdir)")
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    record = build_record(args)
    if args.note:
        record["note"] = args.note
    records.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    plot(records, Path(args.png))
    r = records[-1]
    print(f"{r['kind']}: test {r['test_acc']:.2f} % / TTA {r['test_acc_tta']:.2f} %, total {r['total_wall_s']:.0f} s "
          f"({r['device']}) -> {out}")


if __name__ == "__main__":
    main()
