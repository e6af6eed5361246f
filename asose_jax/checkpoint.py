"""Orbax checkpoints of a whole run: the TrainState, the current spec (it changes with growth), the
cursor (where in the schedule the run is), the metrics so far and the config hash.

Saves are asynchronous and atomically finalised by Orbax (written to a temporary directory, renamed to
``<id>`` when complete); the newest ``max_to_keep`` are kept. Restore reads the JSON metadata first,
rebuilds the abstract state tree from the *saved* spec, then restores the arrays into it (so dtypes,
NamedTuple optimizer states and grown shapes come back exactly). A checkpoint that fails to restore
(truncated, corrupted) is skipped with a warning, moved aside to ``<dir>.corrupt/`` and the previous one
is used; when none restores, :class:`CheckpointError` is raised and nothing is touched. A save that finds the
disk full raises :class:`DiskFullError` (one line); the checkpoints before it stay intact.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from asose_jax.config import Config, config_hash
from asose_jax.errors import CheckpointError, DiskFullError, is_disk_full
from asose_jax.model import NetSpec
from asose_jax.utils import one_line

logger = logging.getLogger(__name__)


def resume_hash(cfg: Config) -> str:
    """Hash of the config fields that determine a run's results: what must match to resume a workdir.

    Ignored: ``resume.*``, ``checkpoint.*`` (how often and how many to keep), ``data.dir`` (where the
    same data lives) and ``data.verify`` (whether its md5 is checked); changing those never changes the
    results, so re-running with them is a resume.
    """
    neutral = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir="", verify=True),
                                  checkpoint=type(cfg.checkpoint)())
    return config_hash(neutral)


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
    """True when every floating-point leaf of ``tree`` is finite (one fused device reduction)."""
    return bool(_all_finite(tree))


@contextlib.contextmanager
def _defer_sigint():
    """Hold a Ctrl-C until the block is done (main thread only), then raise it as usual.

    Used around the blocking part of a save, so an interrupt never leaves a half-started checkpoint behind:
    the KeyboardInterrupt comes right after the save is queued, and the caller's ``finally`` waits for it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


class _LateCallbackSafeLoop(asyncio.SelectorEventLoop):
    """An event loop that drops a callback another thread schedules after the loop has closed.

    Orbax runs a restore (and each background save) in a fresh loop and closes it as soon as one array fails;
    tensorstore's reads and writes of the other arrays finish later and call ``call_soon_threadsafe`` on the
    closed loop from tensorstore's threads, which print an "Event loop is closed" traceback per array. The
    tasks that awaited them went with their loop, so dropping the callback is what is meant.
    """

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


class _LateCallbackSafePolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _LateCallbackSafeLoop


def use_late_callback_safe_loops() -> None:
    """Make asyncio's new event loops :class:`_LateCallbackSafeLoop` (unless a custom policy is installed)."""
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(_LateCallbackSafePolicy())


@contextlib.contextmanager
def _disk_full_as_one_line(directory: Path):
    """Turn a full disk during a save (Orbax raises it on the next save or wait) into :class:`DiskFullError`."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(f"no space left on the device while saving a checkpoint in {directory}; the "
                            f"checkpoints before it are intact: free some space and re-run the same command to "
                            f"resume") from e


@dataclass
class Restored:
    state: Any
    spec: NetSpec
    meta: dict  # cursor, metrics, config_hash, ...
    ckpt_id: int


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for ``(state, meta)`` pairs."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True):
        use_late_callback_safe_loops()  # before Orbax makes its first loop
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._last_id = max(self.steps(), default=-1)

    def steps(self) -> list[int]:
        """Ids of the finalised checkpoints (interrupted saves never appear), oldest first."""
        return sorted(self.manager.all_steps())

    def next_id(self) -> int:
        return max(self._last_id, max(self.steps(), default=-1)) + 1

    def save(self, state: Any, spec: NetSpec, meta: dict) -> int:
        """Queue an async save of ``state`` and ``meta`` (+ the spec); returns the checkpoint id.

        Orbax first waits for the previous save, copies the arrays off the device before returning (so the
        caller may donate ``state`` right after), then writes and renames the directory in the background.
        """
        ckpt_id = self.next_id()
        meta = {**meta, "spec": spec.to_dict()}
        with _defer_sigint(), _disk_full_as_one_line(self.directory):
            self.manager.save(ckpt_id, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)))
            self._last_id = ckpt_id
        return ckpt_id

    def restore_meta(self, ckpt_id: int) -> dict:
        return self.manager.restore(ckpt_id, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def newest_meta(self) -> dict | None:
        """The meta of the newest checkpoint whose meta reads; None when none does. Changes nothing."""
        for ckpt_id in reversed(self.steps()):
            try:
                return self.restore_meta(ckpt_id)
            except Exception as e:  # an unreadable one: restore_latest sets it aside later
                logger.debug("meta of checkpoint %d unreadable: %s", ckpt_id, one_line(e))
        return None

    def restore_latest(self, abstract_state_fn: Callable[[NetSpec], Any],
                       check_meta: Callable[[dict], None] = lambda meta: None) -> Restored | None:
        """Newest checkpoint that restores cleanly; None when there is none at all.

        ``abstract_state_fn(spec)`` -> the abstract (``ShapeDtypeStruct``) state tree for that spec. Newer
        checkpoints that fail are moved to ``<dir>.corrupt/<id>`` once an older one has restored (they are
        kept for inspection, out of the way of ``max_to_keep``). Raises CheckpointError when checkpoints
        exist but none restores, or when ``check_meta(meta)`` raises it: a checkpoint of another run is the
        user's to move, not a corrupt one to set aside.
        """
        failed: list[tuple[int, str]] = []
        for ckpt_id in reversed(self.steps()):
            try:
                restored = self._restore(ckpt_id, abstract_state_fn, check_meta)
            except CheckpointError:
                raise
            except Exception as e:  # corrupted or truncated: fall back to the previous one
                why = f"{type(e).__name__}: {one_line(e)[:200]}"
                failed.append((ckpt_id, why))
                logger.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                               ckpt_id, self.directory, why)
                continue
            self._set_aside([i for i, _ in failed])
            return restored
        if failed:
            newest, why = failed[0]
            raise CheckpointError(f"none of the {len(failed)} checkpoints in {self.directory} can be restored "
                                  f"(newest, {newest}: {why}); move the directory away or use a new --workdir")
        return None

    def _restore(self, ckpt_id: int, abstract_state_fn: Callable[[NetSpec], Any],
                 check_meta: Callable[[dict], None]) -> Restored:
        meta = self.restore_meta(ckpt_id)
        check_meta(meta)
        spec = NetSpec.from_dict(meta["spec"])
        restored = self.manager.restore(ckpt_id, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state_fn(spec))))
        state = jax.block_until_ready(restored["state"])
        return Restored(state=state, spec=spec, meta=meta, ckpt_id=ckpt_id)

    def _set_aside(self, ids: list[int]) -> None:
        if not ids:
            return
        self.manager.wait_until_finished()
        aside = self.directory.with_name(self.directory.name + ".corrupt")
        aside.mkdir(exist_ok=True)
        for ckpt_id in ids:
            src, dst = self.directory / str(ckpt_id), aside / str(ckpt_id)
            if dst.exists():
                shutil.rmtree(dst)
            shutil.move(str(src), str(dst))
            logger.warning("moved unreadable checkpoint %d to %s", ckpt_id, dst)
        self.manager.reload()

    def wait(self) -> None:
        """Block until every queued save is written and finalised."""
        with _disk_full_as_one_line(self.directory):
            self.manager.wait_until_finished()
