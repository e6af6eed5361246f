"""Plots (PNG) and ``summary.md`` for a workdir: alpha per block and path over time and per cycle, loss and
accuracy curves with growth events, and a diagram of the derived architecture."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from asose_jax.config import tta_label
from asose_jax.utils import write_json

PHASE_COLORS = {"warmup": "tab:gray", "weight": "tab:blue", "arch": "tab:orange", "retrain": "tab:green"}


Row = tuple[int, int]  # an alpha row's identity: (block index in the final net, path index in that block)


@dataclasses.dataclass(frozen=True)
class RowHistory:
    """Which (block, path) each alpha row was at every size the supernet had, and where grown rows came from."""

    rows_by_count: dict[int, list[Row]]  # number of alpha rows -> the rows in alpha's order
    born: dict[Row, str]  # a row added by growth -> e.g. "deepen, cycle 3"

    def rows(self, n_rows: int) -> list[Row]:
        if n_rows not in self.rows_by_count:
            raise ValueError(f"an alpha snapshot has {n_rows} rows; the growth events give "
                             f"{sorted(self.rows_by_count)}")
        return self.rows_by_count[n_rows]


def paths_per_block(genotype: dict) -> list[int]:
    """Paths of each block of the final supernet: a multi-path block's genotype entry lists one op per path."""
    return [len(op) if isinstance(op, list) else 1 for op in genotype["ops"]]


def row_history(final_paths: list[int], growths: list[dict]) -> RowHistory:
    """Track each alpha row by its block and path across growth.

    alpha has one row per path, block by block. Growth renumbers rows: a deepen at ``position`` inserts a
    block (one row) there, a branch of block ``position`` appends a path (one row) to it; a widen keeps the
    rows. Undoing the deepen and branch events (``growths``, the metrics' growth records in order) from the
    final structure gives every earlier one. Each adds exactly one row, so a snapshot's row count tells
    which structure it belongs to.
    """
    blocks = [[b, n] for b, n in enumerate(final_paths)]  # [final block index, paths at that time]
    structures, born = [], {}
    for g in reversed([g for g in growths if g["kind"] in ("deepen", "branch")]):
        structures.append([(b, p) for b, n in blocks for p in range(n)])
        # a deepen added a block of one path (later branches undone already); a branch added a second or later path
        fits = 0 <= g["position"] < len(blocks) and (blocks[g["position"]][1] == 1 if g["kind"] == "deepen"
                                                     else blocks[g["position"]][1] >= 2)
        if not fits:
            raise ValueError(f"the {g['kind']} at {g['position']} in cycle {g['cycle']} does not fit the final "
                             f"structure (paths per block {final_paths})")
        if g["kind"] == "deepen":
            b, _ = blocks.pop(g["position"])
            born[(b, 0)] = f"deepen, cycle {g['cycle']}"
        else:
            blocks[g["position"]][1] -= 1
            b, n = blocks[g["position"]]
            born[(b, n)] = f"branch, cycle {g['cycle']}"
    structures.append([(b, p) for b, n in blocks for p in range(n)])
    return RowHistory({len(rows): rows for rows in structures}, born)


def row_label(row: Row, final_paths: list[int], long: bool = False) -> str:
    """``block 3`` / ``block 3 path 1`` (``long``), or ``3`` / ``3 p1``: the path only where the block has several."""
    b, p = row
    if final_paths[b] == 1:
        return f"block {b}" if long else f"{b}"
    return f"block {b} path {p}" if long else f"{b} p{p}"


def plot_alpha_over_time(alpha_history: list[dict], ops: list[str], history: RowHistory, final_paths: list[int],
                         path: Path) -> plt.Figure | None:
    """One panel per (block, path) of the final net: softmax(alpha) of every op at each snapshot (arch epochs
    and phase ends). A row added by growth starts at its first snapshot; its line stays with its block.
    Returns the saved (closed) figure."""
    if not alpha_history:
        return None
    series: dict[Row, tuple[list[int], list[list[float]]]] = {}
    for i, snap in enumerate(alpha_history):
        for row, probs in zip(history.rows(len(snap["probs"])), snap["probs"]):
            xs, ys = series.setdefault(row, ([], []))
            xs.append(i)
            ys.append(probs)
    panels = sorted(series)
    cols = min(4, len(panels))
    grid_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(4 * cols, 2.8 * grid_rows), squeeze=False, sharex=True,
                             sharey=True)
    colors = plt.cm.tab10(np.arange(len(ops)) % 10)
    for ax, row in zip(axes.ravel(), panels):
        xs, ys = series[row]
        for j, op in enumerate(ops):
            ax.plot(xs, [y[j] for y in ys], color=colors[j], label=op, lw=1.3, marker="o", ms=2)
        title = row_label(row, final_paths, long=True)
        ax.set_title(f"{title} (new: {history.born[row]})" if row in history.born else title, fontsize=9)
        ax.set_xlabel("snapshot (arch epoch / phase end)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelbottom=True)  # sharex would keep them only under the bottom panel of each column
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("softmax(alpha)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(5, len(ops)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_alpha_heatmaps(alpha_history: list[dict], ops: list[str], history: RowHistory, final_paths: list[int],
                        path: Path) -> plt.Figure | None:
    """softmax(alpha) as a rows x ops heatmap at the end of each cycle's arch phase.

    The values sit close to 1 / len(ops), so one colour scale spans the plotted data's own range (min to
    max over every panel), which the colour bar states. Rows are labelled by block (and path) of the final
    net, as in the other plots, so a grown row shows as a new label. Returns the saved (closed) figure.
    """
    snaps = {h["cycle"]: np.asarray(h["probs"]) for h in alpha_history if h["phase"] == "arch"}
    if not snaps:
        return None
    cycles = sorted(snaps)
    vmin = min(float(v.min()) for v in snaps.values())
    vmax = max(float(v.max()) for v in snaps.values())
    cols = min(5, len(cycles))
    grid_rows = -(-len(cycles) // cols)
    max_rows = max(len(v) for v in snaps.values())
    fig, axes = plt.subplots(grid_rows, cols, figsize=(2.6 * cols + 1.5, (0.25 * max_rows + 1.6) * grid_rows),
                             squeeze=False, layout="constrained")
    for k, (ax, c) in enumerate(zip(axes.ravel(), cycles)):
        im = ax.imshow(snaps[c], vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"cycle {c}", fontsize=9)
        ax.set_xticks(range(len(ops)), ops, rotation=90, fontsize=6)
        labels = [row_label(r, final_paths) for r in history.rows(len(snaps[c]))]
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if k % cols == 0:
            ax.set_ylabel("block (final numbering)", fontsize=8)
    for ax in axes.ravel()[len(cycles):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="softmax(alpha)\ncolours span the data, not 0 to 1")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Training loss/accuracy per epoch coloured by phase, arch-val accuracy, growth events as lines. The loss
    line joins the epochs that train the weights (their loss is on the weights split); arch epochs, whose loss
    is on the arch-val split, stay separate points."""
    epochs = [r for r in metrics if r.get("event") == "epoch"]
    if not epochs:
        return
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4))
    xs = np.arange(len(epochs))
    for phase, color in PHASE_COLORS.items():
        idx = [i for i, r in enumerate(epochs) if r["phase"] == phase]
        if idx:
            ax_l.scatter(xs[idx], [epochs[i]["loss"] for i in idx], s=12, color=color, label=phase)
            ax_a.scatter(xs[idx], [epochs[i]["acc"] for i in idx], s=12, color=color, label=f"{phase} (train)")
    on_weights = [i for i, r in enumerate(epochs) if r.get("split", "weights") == "weights"]
    ax_l.plot(xs[on_weights], [epochs[i]["loss"] for i in on_weights], color="k", lw=0.5, alpha=0.5)
    val = [(i, r["val_acc"]) for i, r in enumerate(epochs) if "val_acc" in r]
    if val:
        ax_a.plot([v[0] for v in val], [v[1] for v in val], color="k", lw=1.2, label="arch-val (inference)")
    step_to_x = {r["step"]: i for i, r in enumerate(epochs)}
    for r in metrics:
        if r.get("event") == "growth":
            x = max([i for s, i in step_to_x.items() if s <= r["step"]], default=0) + 0.5
            for ax in (ax_l, ax_a):
                ax.axvline(x, color="red", ls="--", lw=1)
            ax_a.text(x, ax_a.get_ylim()[0], f" {r['kind']}", color="red", fontsize=7, rotation=90, va="bottom")
    ax_l.set(xlabel="epoch", ylabel="loss",
             title="loss per epoch (line: the weights split; arch epochs: the arch-val split)")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (growth events dashed)")
    ax_l.legend(fontsize=8)
    ax_a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_architecture(genotype: dict, path: Path) -> None:
    """The derived chain: stem, one box per block (ops, channels, stride), head."""
    blocks = genotype["blocks"]
    labels = [f"stem\n3x3 conv\n{genotype['stem_channels']} ch"]
    for b, op in zip(blocks, genotype["ops"]):
        ops = op if isinstance(op, list) else [op]
        labels.append("\n+ ".join(ops) + f"\n{b['c_in']}->{b['c_out']} ch, s{b['stride']}")
    labels.append(f"GAP + linear\n{genotype['num_classes']} classes")
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(labels)), 2.4))
    for i, text in enumerate(labels):
        ax.add_patch(plt.Rectangle((i * 1.9, 0), 1.6, 1.4, fc="#e8eef7", ec="#34558b"))
        ax.text(i * 1.9 + 0.8, 0.7, text, ha="center", va="center", fontsize=7)
        if i:
            ax.annotate("", xy=(i * 1.9, 0.7), xytext=(i * 1.9 - 0.3, 0.7), arrowprops={"arrowstyle": "->"})
    ax.set_xlim(-0.2, len(labels) * 1.9)
    ax.set_ylim(-0.2, 1.6)
    ax.axis("off")
    ax.set_title(f"derived architecture ({genotype['skeleton']} skeleton)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(workdir: Path, metrics: list[dict], alpha_history: list[dict], genotype: dict, result: dict) -> None:
    """All plots and ``summary.md`` in ``workdir`` (plots under ``plots/``), and ``result.json``."""
    plots = workdir / "plots"
    plots.mkdir(exist_ok=True)
    ops = genotype["op_set"]
    final_paths = paths_per_block(genotype)
    growths = [r for r in metrics if r.get("event") == "growth"]
    history = row_history(final_paths, growths)
    plot_alpha_over_time(alpha_history, ops, history, final_paths, plots / "alpha_over_time.png")
    plot_alpha_heatmaps(alpha_history, ops, history, final_paths, plots / "alpha_heatmaps.png")
    plot_curves(metrics, plots / "curves.png")
    plot_architecture(genotype, plots / "architecture.png")
    phase_wall: dict[str, float] = {}
    prev = 0.0
    for r in metrics:
        if "wall_s" in r:
            key = r.get("phase") or r.get("event")
            phase_wall[key] = phase_wall.get(key, 0.0) + r["wall_s"] - prev
            prev = r["wall_s"]
    lines = [f"# Search summary: `{workdir.name}`", "",
             f"- device: {result.get('device', '?')}",
             f"- arch-val accuracy (inference, argmax ops): **{result['arch_val_acc']:.2f} %**",
             f"- test accuracy of the supernet's argmax architecture (reporting only): **{result['test_acc']:.2f} %**",
             f"- weights: {result['params']:,}; blocks: {result['layers']}; steps: {result['steps']}",
             f"- search wall time: {result.get('wall_s', 0.0):.1f} s", ""]
    if "final" in result:
        f = result["final"]
        lines += ["## Final training of the derived network", "",
                  f"- test accuracy: **{f['test_acc']:.2f} %** ({tta_label(f)}: {f['test_acc_tta']:.2f} %)",
                  f"- epochs: {f['epochs']}, wall: {f['wall_s']:.1f} s, weights: {f['params']:,}", ""]
    lines += ["## Genotype", "", "| block | op | channels | stride |", "|---|---|---|---|"]
    for i, (b, op) in enumerate(zip(genotype["blocks"], genotype["ops"])):
        lines.append(f"| {i} | {op if isinstance(op, str) else ' + '.join(op)} | {b['c_in']}->{b['c_out']} | {b['stride']} |")
    lines += ["", "## Time per phase (s)", "", "| phase | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in phase_wall.items()]
    if growths:
        lines += ["", "## Growth timeline", "", "| cycle | kind | position | params before | after | max abs logit diff |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {g['cycle']} | {g['kind']} | {g['position']} | {g['params_before']:,} | {g['params_after']:,} | "
                  f"{g['max_abs_logit_diff']:.2e} |" for g in growths]
    lines += ["", "## Plots", "", "![alpha over time](plots/alpha_over_time.png)", "",
              "![alpha per cycle](plots/alpha_heatmaps.png)", "", "![curves](plots/curves.png)", "",
              "![architecture](plots/architecture.png)", "",
              "Files: `genotype.json`, `metrics.jsonl` (one JSON object per line), `config.json`, `checkpoints/`.", ""]
    (workdir / "summary.md").write_text("\n".join(lines))
    write_json(workdir / "result.json", result)
