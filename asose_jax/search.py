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
from asose_jax.config import Config, check
from asose_jax.errors import CheckpointError
from asose_jax.utils import FINAL_CHECKPOINTS, holds_checkpoint

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

    Whatever can refuse the run (the device mesh against the batch size and the engine, the data, the batch size
    against it, the checkpoints, the final training's checkpoints) is checked before ``config.json`` is written,
    and before anything compiles. With many processes only process 0 writes the workdir's files. With ``final.enabled`` the derived network is
    trained after the search (``asose_jax.final``, which resumes from ``workdir/final_checkpoints``; the
    search above then restores as "all tasks done")."""
    import jax

    from asose_jax.cost import check_search_cost
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset
    from asose_jax.estimate import FirstStepsEstimate, steps_left
    from asose_jax.final import train_final
    from asose_jax.model import count_params
    from asose_jax.parallel import make_placement
    from asose_jax.report import write_report
    from asose_jax.steps import check_devices

    placement = make_placement(cfg.parallel)
    check_devices(cfg, placement.size)
    check(not (cfg.final.enabled and jax.process_count() > 1), "final.enabled",
          "false with many processes (run python -m asose_jax.final on one process after the search)", True)
    check_search_cost(cfg)  # a latency table lacking a shape stops here, before the data loads
    data = load_dataset(cfg.data, cfg.seed)
    check_batches_fit(cfg, data)
    run = Run(cfg, data, workdir, progress=progress, placement=placement)
    if not run.try_resume():
        run.init_state()
        logger.info("new run in %s: %s skeleton, %d blocks, %d weights, mixed-op mode %s", workdir,
                    cfg.model.skeleton, len(run.spec.blocks), count_params(run.state.params), cfg.mixed_op.mode)
    if cfg.final.enabled:
        check_final_resume(cfg, run, data, workdir)
    if run.main:
        cli.write_config(workdir, cfg)  # only now: a refused run leaves config.json as it was
    if jax.default_backend() == "cpu" and run.main:
        run.on_sync = FirstStepsEstimate(steps_left(run), int(run.state.step), cfg.data.batch_size)
    result = run.execute()
    result["wall_s"] = run.wall_s()
    genotype = run.genotype()
    if cfg.final.enabled:
        result["final"] = train_final(cfg, genotype, data, workdir, progress=progress)
    if run.main:
        write_report(workdir, run.metrics, run.alpha_history, genotype, result)
    return result


def check_batches_fit(cfg: Config, data) -> None:
    """ConfigError unless ``data.batch_size`` leaves a batch in the weights split, and in arch-val when there
    are arch epochs (every epoch drops its last partial batch)."""
    splits = [("weights split", len(data.train))] + ([("arch-val split", len(data.arch_val))]
                                                      if cfg.cycle.arch_epochs else [])
    for split, n in splits:
        check(cfg.data.batch_size <= n, "data.batch_size", f"1..{n} (the {split} has {n} images)",
              cfg.data.batch_size)


def check_final_resume(cfg: Config, run, data, workdir: Path) -> None:
    """CheckpointError unless the final training's checkpoints in ``workdir``, if any, are of this search's
    genotype and ``final.*`` recipe (``resume.allow_config_change`` does not reach them)."""
    from asose_jax.final import check_final_checkpoints
    if run.task_index == len(run.tasks):  # the search is done: its genotype is the final training's
        check_final_checkpoints(cfg, run.genotype(), data, workdir)
    elif holds_checkpoint(workdir / FINAL_CHECKPOINTS):
        raise CheckpointError(f"{workdir / FINAL_CHECKPOINTS} holds the final training of a finished search, and "
                              f"this config runs the search further; use a new --workdir or delete that folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.quiet, args.debug)

    def search() -> None:
        cfg, name = cli.resolve_config(args)
        if args.show_config:
            cli.show_config(cfg)
            return
        from asose_jax.parallel import initialize_distributed
        main_process = initialize_distributed(cfg.parallel) == 0
        if not main_process:  # process 0 logs for the run; the others only warn
            logging.getLogger().setLevel(logging.WARNING)
        workdir = Path(args.workdir or Path("runs") / name)
        with cli.open_workdir(workdir, cfg, lock=main_process):
            cli.enable_compilation_cache()
            t0 = time.perf_counter()
            result = run_search(cfg, workdir, progress=cli.progress(args))
        logger.info("done in %.1f s: arch-val %.2f %%, test %.2f %%; genotype %s", time.perf_counter() - t0,
                    result["arch_val_acc"], result["test_acc"], workdir / "genotype.json")

    return cli.run_cli(search, args.debug, "queued checkpoints were written; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
