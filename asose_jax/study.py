"""``python -m asose_jax.study``: searched networks against baselines under one final recipe, with error bars and costs.

    python -m asose_jax.study --config configs/cifar10_95.py --seeds 0,1,2 \\
        --baselines random:3,uniform:sep_conv_3x3 --workdir runs/study

Every network trains under the config's final recipe (``final.*``; ``final.enabled=False`` is overridden):

* ``searched``: for each seed, a search in ``<workdir>/search_s<seed>`` (its final training off), then the
  final training of its genotype in ``<workdir>/nets/searched_s<seed>``, both with ``seed=<seed>``.
* ``random:N``: N genotypes. Genotype ``j`` draws each path's op uniformly, from a generator seeded by ``j``,
  among the ops a searched genotype may hold (the op set, less ``none`` under ``arch.genotype_exclude_none``,
  with at most ``arch.max_parameter_free`` parameter-free ops), on the blocks of the searched network of seed
  ``seeds[j % len(seeds)]``, and trains with that seed. The same blocks (depth, widths, branches) as a
  searched network make the comparison one of op choice alone; ``random:<number of seeds>`` pairs each
  searched network with one random network.
* ``uniform:OP``: OP on every path, on the blocks of each seed's searched network, trained with that seed.

Outputs in the workdir: ``study.json`` (one record per trained network: config hash, kind, seed, search and
final wall time, test accuracy plain and with TTA, val accuracy, weights, flops per image, final-training
img/s, device, commit), ``study.md`` (mean ± std per kind, each kind's difference from the searched networks
with its standard error and its cost difference, the networks) and ``study.png`` (accuracy against flops per
image and against final-training time).

Re-running the same command resumes: a search or final training picks up from its own checkpoints, and a
network whose ``record.json`` exists (written atomically once it is done) is not trained again, so a kill -9
costs only the unfinished network's work since its last checkpoint. Exit codes and errors: see
:mod:`asose_jax.cli`; an unknown baseline, an empty seed list or a config without ``final`` exit 2.
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
from asose_jax.errors import ConfigError, UsageError
from asose_jax.ops import OP_REGISTRY
from asose_jax.utils import write_json

logger = logging.getLogger("asose_jax")
TIMING_FIELDS = ("search_wall_s", "final_wall_s", "img_per_s")  # the fields that differ between equal runs
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- entry points
# The one place that names the modules a study drives: the search, the final training, the genotype's network.

def search_network(cfg: Config, workdir: Path, progress: bool) -> dict:
    """Run (or resume) the search of ``cfg`` in ``workdir``; its result dict (``wall_s``, accuracies)."""
    from asose_jax.search import run_search
    return run_search(cfg, workdir, progress)


def train_network(cfg: Config, genotype: dict, workdir: Path, progress: bool) -> dict:
    """Train (or resume) the final network of ``genotype`` in ``workdir``; the ``final.json`` dict."""
    from asose_jax.data import load_dataset
    from asose_jax.final import train_final
    return train_final(cfg, genotype, load_dataset(cfg.data, cfg.seed), workdir, progress)


def final_network_cost(cfg: Config, genotype: dict) -> float:
    """Flops per image of the final network of ``genotype`` (``final.skeleton``, ``final.width``)."""
    from asose_jax.cost import network_cost
    from asose_jax.genotype import genotype_spec
    return network_cost(genotype_spec(genotype, cfg.final.skeleton, cfg.final.width))[0]


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Network:
    """One trained network of a study. ``seed``: its training seed, and the search whose blocks it uses."""
    kind: str  # searched | random | uniform
    seed: int
    draw: int | None = None  # random: the seed of its op draw
    op: str | None = None  # uniform: its one op

    @property
    def name(self) -> str:
        if self.kind == "random":
            return f"random_d{self.draw}_s{self.seed}"
        if self.kind == "uniform":
            return f"uniform_{self.op}_s{self.seed}"
        return f"searched_s{self.seed}"

    @property
    def group(self) -> str:
        """How study.md groups it: ``searched``, ``random`` or ``uniform:OP``."""
        return f"uniform:{self.op}" if self.kind == "uniform" else self.kind


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
        if kind == "random" and arg.isdigit() and int(arg) >= 1:
            pass
        elif kind == "uniform" and arg in OP_REGISTRY:
            pass
        elif kind == "uniform":
            raise UsageError(f"--baselines: unknown op {arg!r} in {item!r} (known: {', '.join(OP_REGISTRY)})")
        else:
            raise UsageError(f"--baselines: unknown baseline {item!r} (allowed: random:N with N >= 1, uniform:OP)")
        if (kind == "random" and any(k == "random" for k, _ in out)) or (kind, arg) in out:
            raise UsageError(f"--baselines: {item!r} is given twice")
        out.append((kind, arg))
    return tuple(out)


def plan_networks(seeds: tuple[int, ...], baselines: tuple[tuple[str, str], ...]) -> list[Network]:
    """The searched networks (seed order), then the baselines in the order given."""
    nets = [Network("searched", s) for s in seeds]
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


def genotype_rows(genotype: dict) -> int:
    return sum(len(row) if isinstance(row, list) else 1 for row in genotype["ops"])


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
    rows = genotype_rows(searched)
    ops = [net.op] * rows if net.kind == "uniform" else random_ops(cfg.model.ops, cfg.arch, rows, net.draw)
    return with_ops(searched, ops)


# ---------------------------------------------------------------------------------------------- running

def study_config(cfg: Config) -> Config:
    """``cfg`` with its final training on (a study trains every network under ``final.*``)."""
    if not cfg.final.enabled:
        logger.info("final.enabled=False in the config: the study trains every network under final.* anyway")
        cfg = replace(cfg, final=replace(cfg.final, enabled=True))
    return cfg


def run_searches(cfg: Config, workdir: Path, seeds: tuple[int, ...], progress: bool) -> dict[int, dict]:
    """``{seed: {"genotype", "wall_s"}}``: each seed's search, run, resumed or read from ``study_search.json``."""
    out = {}
    for seed in seeds:
        sdir = workdir / f"search_s{seed}"
        done = sdir / "study_search.json"
        if not done.is_file():
            scfg = replace(cfg, seed=seed, final=replace(cfg.final, enabled=False))
            cli.check_workdir(sdir, scfg)
            logger.info("study: search of seed %d in %s", seed, sdir)
            result = search_network(scfg, sdir, progress)
            genotype = json.loads((sdir / "genotype.json").read_text())
            write_json(done, {"genotype": genotype, "wall_s": result["wall_s"]})
        out[seed] = json.loads(done.read_text())
    return out


def train_record(cfg: Config, net: Network, genotype: dict, search: dict | None, ndir: Path, progress: bool) -> dict:
    """Train ``net`` (or resume it) in ``ndir`` and return its study record."""
    ncfg = replace(cfg, seed=net.seed)
    cli.check_workdir(ndir, ncfg)
    cli.write_config(ndir, ncfg)
    final = train_network(ncfg, genotype, ndir, progress)
    return {"name": net.name, "kind": net.kind, "group": net.group, "seed": net.seed, "draw": net.draw,
            "op": net.op, "config_hash": config_lib.config_hash(cfg),
            "search_wall_s": search["wall_s"] if search else None, "final_wall_s": final["wall_s"],
            "test_acc": final["test_acc"], "test_acc_tta": final["test_acc_tta"], "tta": final.get("tta"),
            "val_acc": final.get("val_acc"), "epochs": final["epochs"], "params": final["params"],
            "flops_per_image": final_network_cost(ncfg, genotype), "img_per_s": training_throughput(ndir),
            "device": final["device"], "commit": git_commit(), "genotype": genotype}


def run_study(cfg: Config, workdir: Path, seeds: tuple[int, ...], baselines: tuple[tuple[str, str], ...],
              progress: bool = True) -> list[dict]:
    """Search, train every network of the plan (skipping those with a ``record.json``), and write the report
    after each one; returns the records in plan order."""
    searches = run_searches(cfg, workdir, seeds, progress)
    nets = plan_networks(seeds, baselines)
    records = []
    for i, net in enumerate(nets):
        ndir = workdir / "nets" / net.name
        done = ndir / "record.json"
        if not done.is_file():
            logger.info("study: network %d/%d, %s", i + 1, len(nets), net.name)
            search = searches[net.seed] if net.kind == "searched" else None
            genotype = network_genotype(net, searches[net.seed]["genotype"], cfg)
            write_json(done, train_record(cfg, net, genotype, search, ndir, progress))
        records.append(json.loads(done.read_text()))
        write_report(workdir, cfg, seeds, baselines, records)
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


def write_report(workdir: Path, cfg: Config, seeds, baselines, records: list[dict]) -> None:
    """``study.json``, ``study.md`` and ``study.png`` from the records so far."""
    write_json(workdir / "study.json", {"config_hash": config_lib.config_hash(cfg), "seeds": list(seeds),
                                        "baselines": [f"{k}:{a}" for k, a in baselines], "records": records})
    plot_accuracy_vs_cost(records, workdir / "study.png", workdir.name)
    (workdir / "study.md").write_text(study_markdown(workdir.name, records, "study.png"))


def _pm(mean: float | None, spread: float | None, nd: int = 2, signed: bool = False) -> str:
    """``mean ± spread`` (``mean`` alone without a spread; ``-`` without a mean)."""
    if mean is None:
        return "-"
    text = f"{mean:+.{nd}f}" if signed else f"{mean:.{nd}f}"
    return text if spread is None else f"{text} ± {spread:.{nd}f}"


def _relative(group: list[float], searched: list[float]) -> str:
    """How much larger the group's mean is than the searched networks' mean, in percent."""
    mg, ms = mean_std(group)[0], mean_std(searched)[0]
    return "-" if mg is None or not ms else f"{100.0 * (mg / ms - 1.0):+.1f} %"


def _column(records: list[dict], key: str, scale: float = 1.0) -> list[float | None]:
    return [None if r.get(key) is None else r[key] * scale for r in records]


def kind_table(by_group: dict[str, list[dict]]) -> list[str]:
    """Mean ± std per kind: accuracies and costs."""
    lines = ["| kind | n | test % | TTA % | val % | weights (M) | MFLOPs / image | final img/s | final s | search s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, recs in by_group.items():
        cells = [_pm(*mean_std(_column(recs, k, scale)), nd) for k, scale, nd in (
            ("test_acc", 1, 2), ("test_acc_tta", 1, 2), ("val_acc", 1, 2), ("params", 1e-6, 3),
            ("flops_per_image", 1e-6, 1), ("img_per_s", 1, 0), ("final_wall_s", 1, 1), ("search_wall_s", 1, 1))]
        lines.append(f"| {name} | {len(recs)} | " + " | ".join(cells) + " |")
    return lines


def difference_table(by_group: dict[str, list[dict]]) -> list[str]:
    """Each kind against the searched networks: accuracy differences ± standard error, and cost differences."""
    searched = by_group.get("searched", [])
    lines = ["| kind | Δ test (points) | Δ TTA (points) | Δ val (points) | flops | weights | final img/s |",
             "|---|---|---|---|---|---|---|"]
    for name, recs in by_group.items():
        if name == "searched":
            continue
        accs = [_pm(*difference(_column(recs, k), _column(searched, k)), signed=True)
                for k in ("test_acc", "test_acc_tta", "val_acc")]
        costs = [_relative(_column(recs, k), _column(searched, k)) for k in ("flops_per_image", "params", "img_per_s")]
        lines.append(f"| {name} | " + " | ".join(accs + costs) + " |")
    return lines


def network_table(records: list[dict]) -> list[str]:
    lines = ["| network | seed | test % | TTA % | val % | weights (M) | MFLOPs | final img/s | final s | ops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ops = ", ".join("+".join(row) if isinstance(row, list) else row for row in r["genotype"]["ops"])
        lines.append(f"| {r['name']} | {r['seed']} | {_pm(r['test_acc'], None)} | {_pm(r['test_acc_tta'], None)} | "
                     f"{_pm(r['val_acc'], None)} | {r['params'] / 1e6:.3f} | {r['flops_per_image'] / 1e6:.1f} | "
                     f"{_pm(r['img_per_s'], None, 0)} | {r['final_wall_s']:.1f} | {ops} |")
    return lines


def study_markdown(name: str, records: list[dict], png: str) -> str:
    by_group = groups(records)
    devices = sorted({r["device"] for r in records})
    commits = sorted({str(r["commit"]) for r in records})
    lines = [f"# Study `{name}`", "",
             f"- {len(records)} networks; config hash {records[0]['config_hash'] if records else '-'}; "
             f"device {', '.join(devices) or '-'}; commit {', '.join(commits) or '-'}",
             "- test accuracy: read once, at the end of each final training; nothing in the study depends on it. "
             "val accuracy: the held-out part of the training images (`-` where the final training keeps none).",
             "- mean ± sample standard deviation per kind; differences are kind minus searched, ± the standard error "
             "sqrt(s_k^2/n_k + s_s^2/n_s) (shown where both kinds have two or more networks); cost columns give "
             "the kind's mean relative to the searched networks' mean.", "",
             "## Per kind", "", *kind_table(by_group), "",
             "## Against the searched networks", "", *difference_table(by_group), "",
             f"![test accuracy against flops per image and final-training time]({png})", "",
             "## Networks", "", *network_table(records), ""]
    return "\n".join(lines)


def plot_accuracy_vs_cost(records: list[dict], path: Path, title: str) -> None:
    """Test accuracy against flops per image (left) and final-training wall time (right): one dot per network,
    and per kind its mean ± std in both coordinates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for (name, recs), color in zip(groups(records).items(), plt.get_cmap("tab10").colors):
        acc = _column(recs, "test_acc")
        for ax, key, scale in ((axes[0], "flops_per_image", 1e-6), (axes[1], "final_wall_s", 1.0)):
            x = _column(recs, key, scale)
            ax.scatter(x, acc, color=color, alpha=0.45, s=28)
            (mx, sx), (my, sy) = mean_std(x), mean_std(acc)
            ax.errorbar([mx], [my], xerr=sx, yerr=sy, fmt="o", color=color, markersize=9, markeredgecolor="black",
                        capsize=4, label=f"{name} (n={len(recs)}): mean ± std")
    axes[0].set_xlabel("flops per image of the final network (millions)")
    axes[1].set_xlabel("final-training wall time (s)")
    axes[0].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"Study {title}: test accuracy against cost (one dot per network)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI

EPILOG = ("examples:\n"
          "  python -m asose_jax.study --config configs/cifar10_95.py --seeds 0,1,2 "
          "--baselines random:3,uniform:sep_conv_3x3 --workdir runs/study\n"
          "  python -m asose_jax.study --config configs/study_smoke.py --seeds 0,1 "
          "--baselines random:1,uniform:conv_3x3")


def build_parser():
    p = cli.build_parser("python -m asose_jax.study", __doc__, EPILOG,
                         "study directory (default: runs/study_<config name>); re-use it to resume")
    p.add_argument("--seeds", required=True, metavar="S,...", help="search seeds, e.g. 0,1,2")
    p.add_argument("--baselines", default="", metavar="B,...",
                   help="random:N (N random genotypes) and/or uniform:OP (OP everywhere), comma-separated")
    return p


def check_has_final(args) -> None:
    """ConfigError unless the config file's ``get_config()`` has a ``final`` section (before validation reads it)."""
    path = config_lib.preset_path(args.preset or "default") if args.preset or not args.config else Path(args.config)
    if not isinstance(getattr(config_lib.load_config_file(path), "final", None), FinalConfig):
        raise ConfigError(f"config {path} has no final section: a study trains every network under final.*")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.quiet)
    run: dict = {"workdir": None, "created": False}

    def study() -> None:
        seeds, baselines = parse_seeds(args.seeds), parse_baselines(args.baselines)
        check_has_final(args)
        cfg, name = cli.resolve_config(args)
        cfg = study_config(cfg)
        run["workdir"] = workdir = Path(args.workdir or Path("runs") / f"study_{name}")
        run["created"] = cli.check_workdir(workdir, cfg)
        cli.write_config(workdir, cfg)
        cli.enable_compilation_cache()
        records = run_study(cfg, workdir, seeds, baselines, progress=not args.no_progress)
        print(f"{len(records)} networks; {workdir / 'study.md'}")

    def forget_new_workdir() -> None:
        if run["created"]:
            cli.remove_if_empty(run["workdir"])

    return cli.run_cli(study, args.debug, "finished networks are kept; re-run the same command to resume",
                       forget_new_workdir)


if __name__ == "__main__":
    sys.exit(main())
