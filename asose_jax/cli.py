"""What the commands (``asose_jax.search``, ``asose_jax.final``) share: the parser, the config from
``--config``/``--preset``/``--set`` (and ``--show-config``), the workdir and its lock, logging, the compilation
cache, and the exit codes.

Exit codes: 0 done; 2 bad input (:class:`asose_jax.errors.BadInput`: config, data, workdir in use or not
writable, checkpoints, genotype, a full disk); 3 the loss or state became NaN/Inf (the message says which
checkpoint is kept, if any); 130 interrupted (Ctrl-C; queued checkpoints are finalised). A handled failure ends
with one line on stderr and nothing after it (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from asose_jax import config as config_lib
from asose_jax.config import Config, check
from asose_jax.errors import BadInput, DiskFullError, DivergenceError, UsageError, is_disk_full
from asose_jax.utils import CHECKPOINT_DIRS, holds_checkpoint, one_line, write_json

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``error: ...``) with exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(prog: str, description: str, epilog: str, workdir_help: str,
                 set_example: str = "--set optim.lr=0.05 --set mixed_op.mode=dense") -> argparse.ArgumentParser:
    """The flags every command takes: config source, overrides (``set_example`` shows them in ``--help``),
    workdir, data dir, ``--show-config``, output verbosity."""
    p = OneLineParser(prog=prog, description=description.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="PATH", help="config file defining get_config() (default: configs/default.py)")
    src.add_argument("--preset", metavar="NAME", help="a config from configs/ by name: default, original, smoke, cifar10_95")
    p.add_argument("--workdir", metavar="DIR", help=workdir_help)
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help=f"override a config value, e.g. {set_example} (repeatable)")
    p.add_argument("--data-dir", metavar="DIR", help="cifar-10-batches-py directory (same as --set data.dir=DIR)")
    p.add_argument("--show-config", action="store_true",
                   help="print every config key with its value and allowed range, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    return p


def progress(args) -> bool:
    """Whether to draw progress bars: not with ``--no-progress``, nor with ``-q``."""
    return not (args.no_progress or args.quiet)


def config_path(args) -> Path:
    """The config file that ``--config`` / ``--preset`` name (``configs/default.py`` when neither does)."""
    return Path(args.config) if args.config else config_lib.preset_path(args.preset or "default")


def resolve_config(args) -> tuple[Config, str]:
    """Config from --config/--preset plus overrides, validated; and a name for the default workdir."""
    path = config_path(args)
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


def registered_names() -> dict[str, str]:
    """The allowed values of the options that name registered ops, mixed-op modes and growth kinds."""
    from asose_jax import growth, mixed_op, ops
    modes = mixed_op.MODES
    trainable = " | ".join(name for name, mode in modes.items() if mode.trainable)
    return {"model.ops": f"distinct names, comma-separated, of: {' | '.join(ops.OP_REGISTRY)}",
            "mixed_op.mode": " | ".join(modes),
            "mixed_op.eval_mode": " | ".join(name for name, mode in modes.items() if mode.draw is None),
            "mixed_op.arch_mode": f'"" (same as mixed_op.mode) | {trainable}',
            "growth.kinds": f"comma-separated, of: {' | '.join(growth.GROWTHS)}"}


def show_config(cfg: Config) -> None:
    """Print every option of ``cfg`` as ``key=value`` (what ``--set`` takes) beside its allowed values."""
    def text(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return ",".join(value) if isinstance(value, tuple) else str(value)
    rows = [(f"{key}={text(value)}", allowed) for key, value, allowed in config_lib.describe(cfg, registered_names())]
    width = min(max(len(left) for left, _ in rows), 44)
    try:
        for left, allowed in rows:
            print(f"{left:<{width}}  allowed: {allowed}")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


LOCK_FILE = ".lock"


def lock_workdir(workdir: Path) -> int:
    """Take an exclusive ``fcntl.flock`` on ``workdir/.lock``, which then records our pid; returns its fd.

    The lock goes with the process, however it ends: a killed run leaves at most the file, never a held lock.
    Raises UsageError when the workdir is not writable, or naming the pid of the process that holds the lock.
    """
    path = workdir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"workdir {workdir} is not writable ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"workdir {workdir} in use by pid {holder}; wait for that run to end or use another "
                             f"--workdir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else its last holder unlinked the file between our open and our lock: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_workdir(workdir: Path, fd: int) -> None:
    """Remove the lock file (while still holding it, so that no other process locks the old file), then
    release the lock."""
    with contextlib.suppress(OSError):
        os.unlink(workdir / LOCK_FILE)
    os.close(fd)


@contextlib.contextmanager
def open_workdir(workdir: Path, cfg: Config, lock: bool = True) -> Iterator[None]:
    """The workdir of one command while it runs: created, locked (:func:`lock_workdir`), its config checked
    (:func:`check_config_change`).

    A handled failure (bad input, NaN/Inf) in a workdir that this call created, before any checkpoint, leaves
    nothing behind: the directory goes again, so the corrected command starts clean. The lock is released on
    the way out. Without ``lock`` (the processes other than 0 of a many-process run, which share process 0's
    workdir and lock) the workdir is only created and checked: the lock and the clean-up are process 0's.
    """
    if not lock:
        make_workdir(workdir)
        check_config_change(workdir, cfg)
        yield
        return
    created = not workdir.exists()
    make_workdir(workdir)
    try:
        fd = lock_workdir(workdir)
    except UsageError:
        if created:
            with contextlib.suppress(OSError):  # removed only when empty
                workdir.rmdir()
        raise
    try:
        check_config_change(workdir, cfg)
        yield
    except (BadInput, DivergenceError):
        if created and not any(holds_checkpoint(workdir / d) for d in CHECKPOINT_DIRS):
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        unlock_workdir(workdir, fd)


def make_workdir(workdir: Path, probe: bool = False) -> None:
    """Create ``workdir`` (and its parents); with ``probe``, also write and remove a file in it. UsageError
    when that fails."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if probe:
            (workdir / ".write_test").write_text("ok")
            (workdir / ".write_test").unlink()
    except OSError as e:
        raise UsageError(f"workdir {workdir} is not writable ({e.strerror or e})") from None


def check_workdir(workdir: Path, cfg: Config) -> None:
    """Create the workdir, check it is writable, and refuse a changed config (:func:`check_config_change`).

    Writes nothing else (see :func:`write_config`). Takes no lock: the commands use :func:`open_workdir`.
    """
    make_workdir(workdir, probe=True)
    check_config_change(workdir, cfg)


def check_config_change(workdir: Path, cfg: Config) -> None:
    """Refuse (UsageError) a config that changes the results of the run whose ``config.json`` is in ``workdir``.

    Only the fields that change results count as a change (``checkpoint.*``, ``data.dir`` and ``resume.*``
    may differ on a resume; see :func:`asose_jax.checkpoint.resume_hash`).
    """
    from asose_jax.checkpoint import resume_hash
    cfg_path = workdir / "config.json"
    if cfg_path.exists() and not cfg.resume.allow_config_change:
        try:
            old_hash = json.loads(cfg_path.read_text()).get("resume_hash")
        except (json.JSONDecodeError, OSError, AttributeError):
            old_hash = None
        if old_hash and old_hash != resume_hash(cfg):
            raise UsageError(f"workdir {workdir} holds a run with a different config; use a new --workdir or "
                             f"--set resume.allow_config_change=true")


def write_config(workdir: Path, cfg: Config) -> None:
    """``config.json``: the full config, its hash and the resume hash (atomically replaced)."""
    from asose_jax.checkpoint import resume_hash
    write_json(workdir / "config.json", {"config_hash": config_lib.config_hash(cfg), "resume_hash": resume_hash(cfg),
                                         "config": config_lib.to_dict(cfg)})


def setup_logging(quiet: bool, debug: bool = False) -> None:
    """Timestamped INFO lines (WARNING with ``quiet``). Orbax logs through ``absl``: without ``debug`` its
    errors and asyncio's are not shown, since each failure they report reaches the command as an exception
    that ends in one line (:func:`run_cli`).

    Importing Orbax runs absl's bare ``logging.basicConfig()``, which would turn ours into a no-op (and leave
    the INFO lines unshown): that default handler is removed first.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        bare = type(handler) is logging.StreamHandler and getattr(handler.formatter, "_fmt", "") == logging.BASIC_FORMAT
        if bare:
            root.removeHandler(handler)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        for reported in ("absl", "asyncio"):
            logging.getLogger(reported).setLevel(logging.CRITICAL)


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


def run_cli(action: Callable[[], None], debug: bool, interrupted: str) -> int:
    """Run ``action`` and turn what a user can cause into one line on stderr and an exit code: bad input or a
    full disk -> 2, divergence -> 3, Ctrl-C -> 130 (with ``interrupted``), success -> 0. With ``debug`` the
    errors propagate, full traceback included. After a handled failure nothing more is printed
    (:func:`_quiet_exit`)."""
    try:
        action()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # another Ctrl-C would break the exit into a traceback
        print(f"interrupted: {interrupted}", file=sys.stderr)
        _quiet_exit()
        return EXIT_INTERRUPTED
    except (BadInput, DivergenceError) as e:
        if debug:
            raise
        return _report(e, EXIT_BAD_INPUT if isinstance(e, BadInput) else EXIT_DIVERGED)
    except Exception as e:  # a full disk while writing an output other than a checkpoint (see Checkpointer)
        if debug or not is_disk_full(e):
            raise
        return _report(DiskFullError(f"no space left on the device ({one_line(e)}); free some space and re-run "
                                     f"the same command to resume from its last checkpoint"), EXIT_BAD_INPUT)
    return 0


def _report(e: Exception, code: int) -> int:
    print(f"error: {one_line(e)}", file=sys.stderr)
    _quiet_exit()
    return code


def _quiet_exit() -> None:
    """At exit after a handled failure, drop what abandoned background work prints while the interpreter shuts
    down (the coroutines of a failed Orbax save, log lines of its threads): the failure's line stays the last."""
    def silence() -> None:
        sys.unraisablehook = lambda unraisable: None
        logging.disable(logging.CRITICAL)
    atexit.register(silence)
