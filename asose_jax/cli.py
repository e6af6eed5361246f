"""What the commands (``asose_jax.search``, ``asose_jax.final``) share: the parser, the config from
``--config``/``--preset``/``--set``, the workdir, logging, the compilation cache, and the exit codes.

Exit codes: 0 done; 2 bad input (:class:`asose_jax.errors.BadInput`: config, data, workdir, checkpoints,
genotype); 3 the loss or state became NaN/Inf (the last good checkpoint is kept); 130 interrupted (Ctrl-C;
queued checkpoints are finalised). Bad input ends with one line on stderr (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from asose_jax import config as config_lib
from asose_jax.config import Config, check
from asose_jax.errors import BadInput, DivergenceError, UsageError
from asose_jax.utils import one_line, write_json

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``error: ...``) with exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(prog: str, description: str, epilog: str, workdir_help: str) -> argparse.ArgumentParser:
    """The flags every command takes: config source, overrides, workdir, data dir, output verbosity."""
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
    cfg = config_lib.validate(check_registered_names(config_lib.apply_overrides(cfg, overrides)))
    return cfg, Path(path).stem


def check_registered_names(cfg: Config) -> Config:
    """Raise ConfigError unless every op, mixed-op mode and growth kind that ``cfg`` names is registered.

    The one place where config names meet the registries (``ops.OP_REGISTRY``, ``mixed_op.MODES``,
    ``growth.GROWTHS``); it sits above them because they import ``config``.
    """
    from asose_jax import growth, mixed_op, ops
    m, mo = cfg.model, cfg.mixed_op
    for op in m.ops:
        check(op in ops.OP_REGISTRY, "model.ops", " | ".join(ops.OP_REGISTRY), op)
    modes = mixed_op.MODES
    trainable = tuple(name for name, mode in modes.items() if mode.trainable)
    evaluable = tuple(name for name, mode in modes.items() if mode.draw is None)
    check(mo.mode in modes, "mixed_op.mode", " | ".join(modes), mo.mode)
    check(mo.eval_mode in evaluable, "mixed_op.eval_mode", " | ".join(evaluable), mo.eval_mode)
    check(mo.arch_mode in ("",) + trainable, "mixed_op.arch_mode", '"" (same as mode) | ' + " | ".join(trainable),
          mo.arch_mode)
    check(mo.arch_mode or modes[mo.mode].trainable, "mixed_op.arch_mode",
          f"{' | '.join(trainable)} (mixed_op.mode={mo.mode} gives alpha no gradient)", mo.arch_mode)
    check(modes[mo.mode].draw is None or cfg.data.batch_size >= len(m.ops), "data.batch_size",
          f">= {len(m.ops)}, the number of ops (mixed_op.mode={mo.mode} sends a share of every batch through each op)",
          cfg.data.batch_size)
    for kind in cfg.growth.kinds:
        check(kind in growth.GROWTHS, "growth.kinds", " | ".join(growth.GROWTHS), kind)
    return cfg


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
            old_hash = json.loads(cfg_path.read_text()).get("resume_hash")
        except (json.JSONDecodeError, OSError, AttributeError):
            old_hash = None
        if old_hash and old_hash != resume_hash(cfg):
            raise UsageError(f"workdir {workdir} holds a run with a different config; use a new --workdir or "
                             f"--set resume.allow_config_change=true")
    return created


def write_config(workdir: Path, cfg: Config) -> None:
    """``config.json``: the full config, its hash and the resume hash (atomically replaced)."""
    from asose_jax.checkpoint import resume_hash
    write_json(workdir / "config.json", {"config_hash": config_lib.config_hash(cfg), "resume_hash": resume_hash(cfg),
                                         "config": config_lib.to_dict(cfg)})


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


def run_cli(action: Callable[[], None], debug: bool, interrupted: str,
            on_bad_input: Callable[[], None] = lambda: None) -> int:
    """Run ``action`` and turn what a user can cause into one line on stderr and an exit code: bad input -> 2
    (after ``on_bad_input``), divergence -> 3, Ctrl-C -> 130 (with ``interrupted``), success -> 0. With
    ``debug`` the errors propagate, full traceback included."""
    try:
        action()
    except BadInput as e:
        on_bad_input()
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergenceError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def remove_if_empty(path: Path) -> None:
    """Remove ``path`` when it is an empty directory (a workdir a failed command made); else leave it."""
    try:
        path.rmdir()
    except OSError:
        pass
