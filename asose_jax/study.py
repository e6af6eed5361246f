"""``python -m asose_jax.study``: searched networks against baselines under one final recipe, with error bars and costs.

    python -m asose_jax.study --config configs/cifar10_95.py --seeds 0,1,2 \\
        --baselines random:3,uniform:sep_conv_3x3 --workdir runs/study

Every network trains under the config's final recipe (``final.*``, on even where ``final.enabled=False``) with
the seed of a searched network and on its blocks (depth, widths, branches), so that a baseline differs from it in
op choice alone: ``searched`` (the search's genotype), ``random:N`` (N draws, :func:`random_ops`) and
``uniform:OP`` (OP on every path). A lambda sweep, ``--set arch.cost_weight=0,0.1,0.3`` (a comma list for this key
only), runs the searches once per lambda; the baselines use the first lambda's blocks. The README's "Study"
section describes the outputs.

In the workdir: ``search[_l<lambda>]_s<seed>/`` (each search), ``nets/<name>/`` (each final training, its
``record.json`` written atomically once it is done) and ``study.json`` / ``study.md`` / ``study.png``, rewritten
after each network. Re-running the same command resumes: a search or final training from its own checkpoints,
and a network with a ``record.json`` is not trained again, so a kill -9 costs only the unfinished network's work
since its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from asose_jax import cli
from asose_jax import config as config_lib
from asose_jax.config import Config, FinalConfig
from asose_jax.cost import check_search_cost, network_cost
from asose_jax.data import load_dataset
from asose_jax.errors import ConfigError, UsageError
from asose_jax.final import train_final
from asose_jax.genotype import genotype_spec
from asose_jax.ops import OP_REGISTRY
from asose_jax.search import run_search
from asose_jax.utils import write_json

logger = logging.getLogger("asose_jax")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Network:
    """One trained network of a study. ``seed``: its training seed, and that of the search whose blocks it uses;
    ``cost_weight``: the search's ``arch.cost_weight`` in a lambda sweep (None: the config's, no sweep)."""
    kind: str  # searched | random | uniform
    seed: int
    draw: int | None = None  # random: the seed of its op draw
    op: str | None = None  # uniform: its one op
    cost_weight: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "random":
            return f"random_d{self.draw}_s{self.seed}"
        if self.kind == "uniform":
            return f"uniform_{self.op}_s{self.seed}"
        return f"searched{_sweep_tag(self.cost_weight)}_s{self.seed}"

    @property
    def group(self) -> str:
        """How study.md groups it: ``searched`` (``searched λ=W`` in a sweep), ``random`` or ``uniform:OP``."""
        if self.kind == "searched" and self.cost_weight is not None:
            return f"searched λ={self.cost_weight:g}"
        return f"uniform:{self.op}" if self.kind == "uniform" else self.kind


def _sweep_tag(cost_weight: float | None) -> str:
    """``_l<lambda>`` in the names of a sweep's searches and searched networks; nothing outside a sweep."""
    return "" if cost_weight is None else f"_l{cost_weight:g}"


def search_dir_name(cost_weight: float | None, seed: int) -> str:
    return f"search{_sweep_tag(cost_weight)}_s{seed}"


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: distinct non-negative integers, at least one."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
    if not all(s.isdigit() for s in items):
        raise UsageError(f"--seeds={text!r}: expected non-negative integers separated by commas")
    seeds = tuple(int(s) for s in items)
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds={text!r} repeats a seed")
    return seeds


def parse_baselines(text: str) -> tuple[tuple[str, str], ...]:
    """``"random:3,uniform:sep_conv_3x3"`` -> ``(("random", "3"), ("uniform", "sep_conv_3x3"))``, checked."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        kind, _, arg = item.partition(":")
        if kind == "uniform" and arg not in OP_REGISTRY:
            raise UsageError(f"--baselines: unknown op {arg!r} in {item!r} (known: {', '.join(OP_REGISTRY)})")
        if not (kind == "uniform" or (kind == "random" and arg.isdigit() and int(arg) >= 1)):
            raise UsageError(f"--baselines: unknown baseline {item!r} (allowed: random:N with N >= 1, uniform:OP)")
        if (kind == "random" and any(k == "random" for k, _ in out)) or (kind, arg) in out:
            raise UsageError(f"--baselines: {item!r} is given twice")
        out.append((kind, arg))
    return tuple(out)


def parse_cost_weights(overrides: list[str]) -> tuple[list[str], tuple[float, ...] | None]:
    """Take a lambda sweep, ``arch.cost_weight=W1,W2,...``, out of the ``--set`` items: ``(the other items, the
    weights)``; ``(overrides, None)`` when no item gives a comma list. Each weight is checked with the config."""
    key = "arch.cost_weight"
    mine = [item for item in overrides if item.partition("=")[0].strip() == key]
    if not any("," in item for item in mine):
        return overrides, None
    if len(mine) > 1:
        raise UsageError(f"--set {key} is given {len(mine)} times: give the lambda sweep once")
    raw = mine[0].partition("=")[2]
    try:
        weights = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--set {key}={raw!r}: expected numbers separated by commas, e.g. 0,0.1,0.3") from None
    if not weights or len(set(weights)) != len(weights):
        raise UsageError(f"--set {key}={raw!r}: give distinct numbers separated by commas, e.g. 0,0.1,0.3")
    return [item for item in overrides if item not in mine], weights


def plan_networks(seeds: tuple[int, ...], baselines: tuple[tuple[str, str], ...],
                  cost_weights: tuple[float, ...] | None = None) -> list[Network]:
    """The searched networks (per lambda of a sweep, in seed order), then the baselines in the order given."""
    nets = [Network("searched", s, cost_weight=w) for w in (cost_weights or (None,)) for s in seeds]
    for kind, arg in baselines:
        if kind == "random":
            nets += [Network("random", seeds[j % len(seeds)], draw=j) for j in range(int(arg))]
        else:
            nets += [Network("uniform", s, op=arg) for s in seeds]
    return nets


# ---------------------------------------------------------------------------------------------- genotypes

def with_ops(genotype: dict, ops: list[str]) -> dict:
    """A copy of ``genotype`` whose paths, in row order, get ``ops`` (a block of several paths keeps a list)."""
    it = iter(ops)
    rows = [[next(it) for _ in row] if isinstance(row, list) else next(it) for row in genotype["ops"]]
    return {**genotype, "ops": rows}


def random_ops(op_set: tuple[str, ...], arch_cfg, rows: int, draw: int) -> list[str]:
    """``rows`` ops drawn uniformly from those a searched genotype may hold, then, past the cap
    ``arch.max_parameter_free``, the later parameter-free picks drawn again among the parametric ops."""
    choices = [op for op in op_set if not (op == "none" and arch_cfg.genotype_exclude_none and len(op_set) > 1)]
    parametric = [op for op in choices if not OP_REGISTRY[op].parameter_free]
    rng = np.random.default_rng(draw)
    ops = [choices[i] for i in rng.integers(len(choices), size=rows)]
    free_rows = [r for r, op in enumerate(ops) if OP_REGISTRY[op].parameter_free]
    if arch_cfg.max_parameter_free >= 0 and parametric:
        for r in free_rows[arch_cfg.max_parameter_free:]:
            ops[r] = parametric[rng.integers(len(parametric))]
    return ops


def network_genotype(net: Network, searched: dict, cfg: Config) -> dict:
    """The genotype ``net`` trains: the searched one of its seed, or its ops on that one's blocks."""
    if net.kind == "searched":
        return searched
    rows = sum(len(row) if isinstance(row, list) else 1 for row in searched["ops"])
    ops = [net.op] * rows if net.kind == "uniform" else random_ops(cfg.model.ops, cfg.arch, rows, net.draw)
    return with_ops(searched, ops)


# ---------------------------------------------------------------------------------------------- running

def study_config(cfg: Config) -> Config:
    """``cfg`` with its final training on (a study trains every network under ``final.*``), validated again:
    ``final.val_size`` must leave images to train on."""
    if not cfg.final.enabled:
        logger.info("final.enabled=False in the config: the study trains every network under final.* anyway")
        cfg = replace(cfg, final=replace(cfg.final, enabled=True))
    return config_lib.validate(cfg)


def check_cost_weights(cfg: Config, cost_weights: tuple[float, ...] | None) -> None:
    """Check each lambda of a sweep, and build the cost table of each cost-aware search's starting network:
    a bad weight or a latency table lacking a shape stops the study before its first search."""
    for w in cost_weights or (None,):
        check_search_cost(with_cost_weight(cfg, w))


def with_cost_weight(cfg: Config, cost_weight: float | None) -> Config:
    """``cfg`` with ``arch.cost_weight`` set (validated); ``cfg`` itself for None (no sweep)."""
    if cost_weight is None:
        return cfg
    return config_lib.validate(replace(cfg, arch=replace(cfg.arch, cost_weight=cost_weight)))


def run_searches(cfg: Config, workdir: Path, seeds: tuple[int, ...], cost_weights: tuple[float, ...] | None,
                 progress: bool) -> dict[tuple, dict]:
    """``{(cost_weight, seed): {"genotype", "wall_s"}}`` (cost_weight None outside a sweep): each search, run,
    resumed or read from its ``study_search.json``."""
    out = {}
    for w in cost_weights or (None,):
        for seed in seeds:
            sdir = workdir / search_dir_name(w, seed)
            done = sdir / "study_search.json"
            if not done.is_file():
                scfg = replace(with_cost_weight(cfg, w), seed=seed, final=replace(cfg.final, enabled=False))
                cli.check_workdir(sdir, scfg)
                logger.info("study: search of seed %d%s in %s", seed, "" if w is None else f", λ={w:g}", sdir)
                result = run_search(scfg, sdir, progress)
                genotype = json.loads((sdir / "genotype.json").read_text())
                write_json(done, {"genotype": genotype, "wall_s": result["wall_s"]})
            out[(w, seed)] = json.loads(done.read_text())
    return out


def train_record(cfg: Config, net: Network, genotype: dict, search: dict | None, ndir: Path, progress: bool) -> dict:
    """Train ``net`` (or resume it) in ``ndir`` and return its study record."""
    ncfg = replace(cfg, seed=net.seed)
    cli.check_workdir(ndir, ncfg)
    cli.write_config(ndir, ncfg)
    final = train_final(ncfg, genotype, load_dataset(ncfg.data, ncfg.seed), ndir, progress)
    flops = network_cost(genotype_spec(genotype, cfg.final.skeleton, cfg.final.width))[0]
    cost_weight = (cfg.arch.cost_weight if net.cost_weight is None else net.cost_weight) if search else None
    return {"name": net.name, "kind": net.kind, "group": net.group, "seed": net.seed, "draw": net.draw,
            "op": net.op, "cost_weight": cost_weight, "config_hash": config_lib.config_hash(cfg),
            "search_wall_s": search["wall_s"] if search else None, "final_wall_s": final["wall_s"],
            "test_acc": final["test_acc"], "test_acc_tta": final["test_acc_tta"], "tta": final.get("tta"),
            "val_acc": final.get("val_acc"), "val_acc_tta": final.get("val_acc_tta"), "val_size": final.get("val_size"),
            "epochs": final["epochs"], "params": final["params"],
            "flops_per_image": flops, "img_per_s": training_throughput(ndir),
            "device": final["device"], "commit": git_commit(), "genotype": genotype}


def run_study(cfg: Config, workdir: Path, seeds: tuple[int, ...], baselines: tuple[tuple[str, str], ...],
              progress: bool = True, cost_weights: tuple[float, ...] | None = None) -> list[dict]:
    """Search (per lambda of a sweep), train every network of the plan (skipping those with a ``record.json``),
    and write the report after each one; returns the records in plan order."""
    searches = run_searches(cfg, workdir, seeds, cost_weights, progress)
    nets = plan_networks(seeds, baselines, cost_weights)
    blocks_from = cost_weights[0] if cost_weights else None  # the baselines' search
    records = []
    for i, net in enumerate(nets):
        ndir = workdir / "nets" / net.name
        done = ndir / "record.json"
        if not done.is_file():
            logger.info("study: network %d/%d, %s", i + 1, len(nets), net.name)
            search = searches[(net.cost_weight, net.seed)] if net.kind == "searched" else None
            genotype = network_genotype(net, (search or searches[(blocks_from, net.seed)])["genotype"], cfg)
            write_json(done, train_record(cfg, net, genotype, search, ndir, progress))
        records.append(json.loads(done.read_text()))
        write_report(workdir, cfg, seeds, baselines, records, cost_weights)
    return records


def training_throughput(workdir: Path) -> float | None:
    """Median final-training img/s over the epochs after the first (which includes compilation)."""
    lines = (workdir / "final_metrics.jsonl").read_text().splitlines()
    rates = [r["img_per_s"] for r in map(json.loads, filter(None, lines)) if r.get("event") == "final_epoch"]
    return statistics.median(rates[1:] or rates) if rates else None


def git_commit() -> str | None:
    """The commit of the code that trains (``git rev-parse HEAD``), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


# ---------------------------------------------------------------------------------------------- the report

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values) of the non-None ``values``."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def difference(group: list[float], searched: list[float]) -> tuple[float | None, float | None]:
    """``mean(group) - mean(searched)`` and its standard error ``sqrt(s_g^2/n_g + s_s^2/n_s)`` (Welch; None
    unless both have two or more values)."""
    (mg, sg), (ms, ss) = mean_std(group), mean_std(searched)
    if mg is None or ms is None:
        return None, None
    se = math.sqrt(sg ** 2 / len(group) + ss ** 2 / len(searched)) if sg is not None and ss is not None else None
    return mg - ms, se


def groups(records: list[dict]) -> dict[str, list[dict]]:
    """Records by ``group``, in order of first appearance (searched first)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["group"], []).append(r)
    return out


def write_report(workdir: Path, cfg: Config, seeds, baselines, records: list[dict],
                 cost_weights: tuple[float, ...] | None = None) -> None:
    """``study.json``, ``study.md`` and ``study.png`` from the records so far."""
    write_json(workdir / "study.json", {"config_hash": config_lib.config_hash(cfg), "seeds": list(seeds),
                                        "baselines": [f"{k}:{a}" for k, a in baselines],
                                        "cost_weights": list(cost_weights) if cost_weights else None,
                                        "records": records})
    plot_accuracy_vs_cost(records, workdir / "study.png", workdir.name)
    (workdir / "study.md").write_text(study_markdown(workdir.name, records, "study.png"))


def plotted_accuracy(records: list[dict]) -> tuple[str, str]:
    """``(record key, label)`` of the accuracy the figure shows: val where every network has one, else test."""
    if records and all(r.get("val_acc") is not None for r in records):
        return "val_acc", "val accuracy (%, final.val_size held out)"
    return "test_acc", "test accuracy (%)"


def _pm(mean: float | None, spread: float | None, nd: int = 2, signed: bool = False) -> str:
    """``mean ± spread`` (``mean`` alone without a spread; ``-`` without a mean)."""
    if mean is None:
        return "-"
    text = f"{mean:+.{nd}f}" if signed else f"{mean:.{nd}f}"
    return text if spread is None else f"{text} ± {spread:.{nd}f}"


def _relative(group: list[float], reference: list[float]) -> str:
    """How much larger the group's mean is than the reference group's mean, in percent."""
    mg, mr = mean_std(group)[0], mean_std(reference)[0]
    return "-" if mg is None or not mr else f"{100.0 * (mg / mr - 1.0):+.1f} %"


def _column(records: list[dict], key: str, scale: float = 1.0) -> list[float | None]:
    return [None if r.get(key) is None else r[key] * scale for r in records]


ACCURACIES = (("val_acc", "val"), ("val_acc_tta", "val TTA"), ("test_acc", "test"), ("test_acc_tta", "test TTA"))
COSTS = (("flops_per_image", "flops"), ("params", "weights"), ("img_per_s", "final img/s"))


def kind_table(by_group: dict[str, list[dict]]) -> list[str]:
    """Mean ± std per kind: accuracies and costs."""
    lines = ["| kind | n | " + " | ".join(f"{label} %" for _, label in ACCURACIES)
             + " | weights (M) | MFLOPs / image | final img/s | final s | search s |", "|---" * 11 + "|"]
    for name, recs in by_group.items():
        cells = [_pm(*mean_std(_column(recs, k)), 2) for k, _ in ACCURACIES]
        cells += [_pm(*mean_std(_column(recs, k, scale)), nd) for k, scale, nd in (
            ("params", 1e-6, 3), ("flops_per_image", 1e-6, 1), ("img_per_s", 1, 0), ("final_wall_s", 1, 1),
            ("search_wall_s", 1, 1))]
        lines.append(f"| {name} | {len(recs)} | " + " | ".join(cells) + " |")
    return lines


def difference_table(by_group: dict[str, list[dict]]) -> list[str]:
    """Each kind against the first group (the searched networks, the first lambda of a sweep): accuracy
    differences ± standard error, and next to them the cost differences."""
    reference = next(iter(by_group.values()), [])
    lines = ["| kind | " + " | ".join(f"Δ {label} (points)" for _, label in ACCURACIES) + " | "
             + " | ".join(f"{label} vs reference" for _, label in COSTS) + " |", "|---" * 8 + "|"]
    for name, recs in list(by_group.items())[1:]:
        accs = [_pm(*difference(_column(recs, k), _column(reference, k)), signed=True) for k, _ in ACCURACIES]
        costs = [_relative(_column(recs, k), _column(reference, k)) for k, _ in COSTS]
        lines.append(f"| {name} | " + " | ".join(accs + costs) + " |")
    return lines


def network_table(records: list[dict]) -> list[str]:
    lines = ["| network | seed | λ | val % | test % | test TTA % | weights (M) | MFLOPs | final img/s | final s "
             "| ops |", "|---" * 11 + "|"]
    for r in records:
        ops = ", ".join("+".join(row) if isinstance(row, list) else row for row in r["genotype"]["ops"])
        lam = "-" if r.get("cost_weight") is None else f"{r['cost_weight']:g}"
        lines.append(f"| {r['name']} | {r['seed']} | {lam} | {_pm(r.get('val_acc'), None)} | "
                     f"{_pm(r['test_acc'], None)} | {_pm(r['test_acc_tta'], None)} | {r['params'] / 1e6:.3f} | "
                     f"{r['flops_per_image'] / 1e6:.1f} | {_pm(r['img_per_s'], None, 0)} | {r['final_wall_s']:.1f} | "
                     f"{ops} |")
    return lines


def study_markdown(name: str, records: list[dict], png: str) -> str:
    by_group = groups(records)
    devices = sorted({r["device"] for r in records})
    commits = sorted({str(r["commit"]) for r in records})
    reference = next(iter(by_group), "searched")
    label = plotted_accuracy(records)[1].split(" (")[0]
    lines = [f"# Study `{name}`", "",
             f"- {len(records)} networks; config hash {records[0]['config_hash'] if records else '-'}; "
             f"device {', '.join(devices) or '-'}; commit {', '.join(commits) or '-'}",
             "- val accuracy: the final training's held-out split (`final.val_size` of the training images), what "
             "decisions (a recipe, a cost weight λ) may read; `-` in a reporting study (`final.val_size=0`). "
             "Test accuracy: read once, at the end of each final training; nothing in the study depends on it.",
             "- mean ± sample standard deviation per kind; differences are kind minus the reference "
             f"(`{reference}`), ± the standard error sqrt(s_k^2/n_k + s_r^2/n_r) (shown where both have two or more "
             "networks); the cost columns next to them give the kind's mean relative to the reference's mean, so "
             "an accuracy difference reads together with what it costs.", "",
             "## Per kind", "", *kind_table(by_group), "",
             f"## Against `{reference}`", "", *difference_table(by_group), "",
             f"![{label} against flops per image and final-training time]({png})", "",
             "## Networks", "", *network_table(records), ""]
    return "\n".join(lines)


def plot_accuracy_vs_cost(records: list[dict], path: Path, title: str) -> None:
    """Accuracy (:func:`plotted_accuracy`) against flops per image (left) and final-training wall time (right):
    one dot per network and per kind its mean ± std in both coordinates; the searched groups of a lambda sweep
    joined in lambda order (the accuracy-cost frontier of the search)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key, acc_label = plotted_accuracy(records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    frontier: list[tuple[float, list]] = []  # (lambda, [(mean x, mean y) per panel])
    for (name, recs), color in zip(groups(records).items(), plt.get_cmap("tab10").colors):
        acc = _column(recs, acc_key)
        means = []
        for ax, key, scale in ((axes[0], "flops_per_image", 1e-6), (axes[1], "final_wall_s", 1.0)):
            x = _column(recs, key, scale)
            ax.scatter(x, acc, color=color, alpha=0.45, s=28)
            (mx, sx), (my, sy) = mean_std(x), mean_std(acc)
            ax.errorbar([mx], [my], xerr=sx, yerr=sy, fmt="o", color=color, markersize=9, markeredgecolor="black",
                        capsize=4, label=f"{name} (n={len(recs)}): mean ± std")
            means.append((mx, my))
        if recs[0]["kind"] == "searched" and recs[0].get("cost_weight") is not None:
            frontier.append((recs[0]["cost_weight"], means))
    if len(frontier) > 1:
        frontier.sort(key=lambda f: f[0])
        for p, ax in enumerate(axes):
            xs, ys = [m[p][0] for _, m in frontier], [m[p][1] for _, m in frontier]
            ax.plot(xs, ys, "--", color="0.35", zorder=0, label="searched, λ in increasing order" if p == 0 else None)
            for i, ((w, _), x, y) in enumerate(zip(frontier, xs, ys)):  # labels alternate below and above
                ax.annotate(f"λ={w:g}", (x, y), textcoords="offset points", xytext=(8, (-14, 6)[i % 2]), fontsize=9)
    axes[0].set_xlabel("flops per image of the final network (millions)")
    axes[1].set_xlabel("final-training wall time (s)")
    axes[0].set_ylabel(acc_label)
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"Study {title}: {acc_label.split(' (')[0]} against cost (one dot per network)")
    rows = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI

EPILOG = ("examples:\n"
          "  python -m asose_jax.study --config configs/cifar10_95.py --seeds 0,1,2 "
          "--baselines random:3,uniform:sep_conv_3x3 --workdir runs/study\n"
          "  python -m asose_jax.study --config configs/study_smoke.py --seeds 0,1 "
          "--baselines random:1,uniform:conv_3x3\n"
          "  python -m asose_jax.study --config configs/study_smoke.py --seeds 0 --baselines uniform:conv_3x3 "
          "--set arch.cost_weight=0,1   # a cost-weight sweep")


def build_parser():
    p = cli.build_parser("python -m asose_jax.study", __doc__, EPILOG,
                         "study directory (default: runs/study_<config name>); re-use it to resume")
    p.add_argument("--seeds", required=True, metavar="S,...", help="search seeds, e.g. 0,1,2")
    p.add_argument("--baselines", default="", metavar="B,...",
                   help="random:N (N random genotypes) and/or uniform:OP (OP everywhere), comma-separated")
    return p


def check_has_final(args) -> None:
    """ConfigError unless the config file's ``get_config()`` has a ``final`` section (before validation reads it)."""
    path = cli.config_path(args)
    if not isinstance(getattr(config_lib.load_config_file(path), "final", None), FinalConfig):
        raise ConfigError(f"config {path} has no final section: a study trains every network under final.*")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.quiet, args.debug)

    def study() -> None:
        seeds, baselines = parse_seeds(args.seeds), parse_baselines(args.baselines)
        args.overrides, cost_weights = parse_cost_weights(args.overrides)
        if cost_weights:  # the study's own config (its hash, its workdir check) carries the first lambda
            args.overrides.append(f"arch.cost_weight={cost_weights[0]!r}")
        check_has_final(args)
        cfg, name = cli.resolve_config(args)
        cfg = study_config(cfg)
        if args.show_config:
            cli.show_config(cfg)
            return
        check_cost_weights(cfg, cost_weights)
        workdir = Path(args.workdir or Path("runs") / f"study_{name}")
        with cli.open_workdir(workdir, cfg):
            cli.write_config(workdir, cfg)
            cli.enable_compilation_cache()
            records = run_study(cfg, workdir, seeds, baselines, progress=cli.progress(args), cost_weights=cost_weights)
        print(f"{len(records)} networks; {workdir / 'study.md'}")

    return cli.run_cli(study, args.debug, "finished networks are kept; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
