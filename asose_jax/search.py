"""``python -m asose_jax.search``: the ASO-SE search on CIFAR-10, end to end.

Re-running the same command with the same ``--workdir`` resumes from the newest checkpoint. Exit codes and
errors: see :mod:`asose_jax.cli`.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from asose_jax import cli
from asose_jax.config import Config

logger = logging.getLogger("asose_jax")

EPILOG = ("examples:\n"
          "  python -m asose_jax.search --preset smoke --workdir runs/smoke\n"
          "  python -m asose_jax.search --preset original --data-dir ~/data/cifar10 --set cycle.max_cycles=1\n"
          "  python -m asose_jax.search --config configs/cifar10_95.py --workdir runs/c95")


def build_parser():
    return cli.build_parser("python -m asose_jax.search", __doc__, EPILOG,
                            "run directory (default: runs/<config name>); re-use it to resume")


def run_search(cfg: Config, workdir: Path, progress: bool = True) -> dict:
    """Load data, resume or start, run every task, write genotype, plots and summary; returns the result.

    With ``final.enabled`` the derived network is trained after the search (``asose_jax.final``, which
    resumes from ``workdir/final_checkpoints``; the search above then restores as "all tasks done")."""
    from asose_jax.cost import check_search_cost
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset
    from asose_jax.final import train_final
    from asose_jax.report import write_report

    check_search_cost(cfg)  # a latency table lacking a shape stops here, before the data loads
    data = load_dataset(cfg.data, cfg.seed)
    logger.info("data: %s (weights %d, arch-val %d, test %d)", data.source, len(data.train.labels),
                len(data.arch_val.labels), len(data.test.labels))
    run = Run(cfg, data, workdir, progress=progress)
    if not run.try_resume():
        run.init_state()
        logger.info("new run in %s: %s skeleton, %d blocks, %d weights, mixed-op mode %s", workdir,
                    cfg.model.skeleton, len(run.spec.blocks), run.param_count(), cfg.mixed_op.mode)
    cli.write_config(workdir, cfg)  # only now: bad data or unusable checkpoints leave config.json as it was
    result = run.execute()
    result["wall_s"] = run.wall_s()
    genotype = run.genotype()
    if cfg.final.enabled:
        result["final"] = train_final(cfg, genotype, data, workdir, progress=progress)
    write_report(workdir, run.metrics, run.alpha_history, genotype, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.quiet)
    run: dict = {"workdir": None, "created": False}

    def search() -> None:
        cfg, name = cli.resolve_config(args)
        run["workdir"] = workdir = Path(args.workdir or Path("runs") / name)
        run["created"] = cli.check_workdir(workdir, cfg)
        cli.enable_compilation_cache()
        t0 = time.perf_counter()
        result = run_search(cfg, workdir, progress=not args.no_progress)
        logger.info("done in %.1f s: arch-val %.2f %%, test %.2f %%; genotype %s", time.perf_counter() - t0,
                    result["arch_val_acc"], result["test_acc"], workdir / "genotype.json")

    def forget_new_workdir() -> None:  # a workdir this call made and left empty goes again
        if run["created"]:
            cli.remove_if_empty(run["workdir"])

    return cli.run_cli(search, args.debug, "queued checkpoints were written; re-run the same command to resume",
                       forget_new_workdir)


if __name__ == "__main__":
    sys.exit(main())
