"""``python -m asose_jax.search``: the ASO-SE search on CIFAR-10, end to end.

Re-running the same command with the same ``--workdir`` resumes from the newest checkpoint.
Bad input ends with one line on stderr and exit code 2 (``--debug`` shows the traceback).

Exit codes: 0 done; 2 bad input (config, data, workdir, checkpoints, genotype); 3 the loss or state became
NaN/Inf (the last good checkpoint is kept); 130 interrupted (Ctrl-C; queued checkpoints are finalised).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from asose_jax import config as config_lib
from asose_jax.config import Config, ConfigError

logger = logging.getLogger("asose_jax")
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class UsageError(RuntimeError):
    """Bad input found by the CLI itself (workdir, config change); one line for the user."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``error: ...``) with exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


SEARCH_EPILOG = ("examples:\n"
                 "  python -m asose_jax.search --preset smoke --workdir runs/smoke\n"
                 "  python -m asose_jax.search --preset original --data-dir ~/data/cifar10 --set cycle.max_cycles=1\n"
                 "  python -m asose_jax.search --config configs/cifar10_95.py --workdir runs/c95")


def build_parser(prog: str = "python -m asose_jax.search", description: str = __doc__, epilog: str = SEARCH_EPILOG,
                 workdir_help: str = "run directory (default: runs/<config name>); re-use it to resume"
                 ) -> argparse.ArgumentParser:
    """The CLI shared by ``asose_jax.search`` and ``asose_jax.train``."""
    p = OneLineParser(prog=prog, description=description.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="PATH", help="config file defining get_config() (default: configs/default.py)")
    src.add_argument("--preset", metavar="NAME", help="a config from configs/ by name: default, original, smoke, cifar10_95")
    p.add_argument("--workdir", metavar="DIR", help=workdir_help)
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config value, e.g. --set optim.lr=0.05 --set mixed_op.mode=dense (repeatable)")
    p.add_argument("--data-dir", metavar="DIR", help="cifar-10-batches-py directory (same as --set data.dir=DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def resolve_config(args) -> tuple[Config, str]:
    """Config from --config/--preset plus overrides, validated; and a name for the default workdir."""
    if args.preset:
        path = config_lib.preset_path(args.preset)
    else:
        path = Path(args.config) if args.config else config_lib.preset_path("default")
    cfg = config_lib.load_config_file(path)
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    cfg = config_lib.validate(config_lib.apply_overrides(cfg, overrides))
    return cfg, Path(path).stem


def check_workdir(workdir: Path, cfg: Config) -> bool:
    """Create the workdir, check it is writable, and refuse a changed config on an existing run.

    Writes nothing else (see :func:`write_config`); returns True when this call created the directory.
    Only the fields that change results count as a change (``checkpoint.*``, ``data.dir`` and ``resume.*``
    may differ on a resume; see :func:`asose_jax.checkpoint.resume_hash`).
    """
    from asose_jax.checkpoint import resume_hash
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"workdir {workdir} is not writable ({e.strerror or e})") from None
    cfg_path = workdir / "config.json"
    if cfg_path.exists() and not cfg.resume.allow_config_change:
        try:
            saved = json.loads(cfg_path.read_text())
            old_hash = saved.get("resume_hash")
        except (json.JSONDecodeError, OSError, AttributeError):
            old_hash = None
        if old_hash and old_hash != resume_hash(cfg):
            raise UsageError(f"workdir {workdir} holds a run with a different config; use a new --workdir or "
                             f"--set resume.allow_config_change=true")
    return created


def write_config(workdir: Path, cfg: Config) -> None:
    """``config.json``: the full config, its hash and the resume hash (atomically replaced)."""
    from asose_jax.checkpoint import resume_hash
    cfg_path = workdir / "config.json"
    payload = {"config_hash": config_lib.config_hash(cfg), "resume_hash": resume_hash(cfg),
               "config": config_lib.to_dict(cfg)}
    tmp = cfg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg_path)


def prepare_workdir(workdir: Path, cfg: Config) -> None:
    """:func:`check_workdir` then :func:`write_config`."""
    check_workdir(workdir, cfg)
    write_config(workdir, cfg)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def enable_compilation_cache() -> None:
    """Persistent XLA cache so re-runs (and resumes) skip compilation.

    ``ASOSE_JAX_CACHE``: the cache directory; ``ASOSE_JAX_CACHE_MIN_COMPILE_S``: cache only programs that
    took at least this long to compile (default 1.0; the tests use 0 so tiny CPU runs restart fast).
    """
    import jax
    cache = os.environ.get("ASOSE_JAX_CACHE", str(Path.home() / ".cache" / "asose_jax" / "xla"))
    try:
        min_s = float(os.environ.get("ASOSE_JAX_CACHE_MIN_COMPILE_S", "1.0"))
    except ValueError:
        raise UsageError("ASOSE_JAX_CACHE_MIN_COMPILE_S must be a number of seconds") from None
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    if min_s <= 0:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_search(cfg: Config, workdir: Path, progress: bool = True) -> dict:
    """Load data, resume or start, run every task, write genotype, plots and summary; returns the result."""
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset
    from asose_jax.report import write_report

    data = load_dataset(cfg.data, cfg.seed)
    logger.info("data: %s (weights %d, arch-val %d, test %d)", data.source, len(data.train.labels),
                len(data.arch_val.labels), len(data.test.labels))
    run = Run(cfg, data, workdir, progress=progress)
    if not run.try_resume():
        run.init_state()
        logger.info("new run in %s: %s skeleton, %d blocks, %d weights, mixed-op mode %s", workdir,
                    cfg.model.skeleton, len(run.spec.blocks), run.param_count(), cfg.mixed_op.mode)
    write_config(workdir, cfg)  # only now: bad data or unusable checkpoints leave config.json as it was
    result = run.execute()
    result["wall_s"] = run.wall_s()
    genotype = run.genotype()
    # Resume of the final training is train_final's: it checkpoints to workdir/final_checkpoints and continues
    # from there when re-run (the search above then restores as "all tasks done" and only re-evaluates).
    if cfg.final.enabled:
        from asose_jax.train import train_final
        result["final"] = train_final(cfg, genotype, data, workdir, progress=progress)
    write_report(workdir, run.metrics, run.alpha_history, genotype, result, config_lib.to_dict(cfg))
    return result


def run_cli(action: Callable[[], None], debug: bool, bad_input: tuple[type[BaseException], ...], interrupted: str,
            on_bad_input: Callable[[], None] = lambda: None) -> int:
    """Run ``action`` and turn what a user can cause into one line on stderr and an exit code: an error of
    ``bad_input`` -> 2 (after ``on_bad_input``), divergence -> 3, Ctrl-C -> 130 (with ``interrupted``),
    success -> 0. With ``debug`` the errors propagate, full traceback included."""
    from asose_jax.cycle import DivergenceError
    try:
        action()
    except bad_input as e:
        on_bad_input()
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergenceError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from asose_jax.arch import GenotypeError
    from asose_jax.checkpoint import CheckpointError
    from asose_jax.data import DataError
    run: dict = {"workdir": None, "created": False}

    def search() -> None:
        cfg, name = resolve_config(args)
        run["workdir"] = workdir = Path(args.workdir or Path("runs") / name)
        run["created"] = check_workdir(workdir, cfg)
        enable_compilation_cache()
        t0 = time.perf_counter()
        result = run_search(cfg, workdir, progress=not args.no_progress)
        logger.info("done in %.1f s: arch-val %.2f %%, test %.2f %%; genotype %s", time.perf_counter() - t0,
                    result["arch_val_acc"], result["test_acc"], workdir / "genotype.json")

    def forget_new_workdir() -> None:  # a workdir this call made and left empty goes again
        if run["created"]:
            _remove_if_empty(run["workdir"])

    return run_cli(search, args.debug, (ConfigError, DataError, UsageError, GenotypeError, CheckpointError),
                   "queued checkpoints were written; re-run the same command to resume", forget_new_workdir)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
