"""Orbax checkpoints of a whole run: the TrainState, the current spec (it changes with growth), the
cursor (where in the schedule the run is), the metrics so far and the config hash.

Saves are asynchronous and atomically finalised by Orbax; ``max_to_keep`` old ones are kept. Restore
reads the JSON metadata first, rebuilds the abstract state tree from the *saved* spec, then restores
the arrays into it. A checkpoint that fails to restore (truncated, corrupted) is skipped with a warning
and the previous one is used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from asose_jax.model import NetSpec

logger = logging.getLogger(__name__)


@dataclass
class Restored:
    state: Any
    spec: NetSpec
    meta: dict  # cursor, metrics, config_hash, ...
    ckpt_id: int


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for ``(state, meta)`` pairs."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def next_id(self) -> int:
        steps = self.steps()
        return steps[-1] + 1 if steps else 0

    def save(self, state: Any, spec: NetSpec, meta: dict) -> int:
        """Queue an async save of ``state`` and ``meta`` (+ the spec); returns the checkpoint id."""
        ckpt_id = self.next_id()
        meta = {**meta, "spec": spec.to_dict()}
        self.manager.save(ckpt_id, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))
        return ckpt_id

    def restore_latest(self, abstract_state_fn: Callable[[NetSpec], Any]) -> Restored | None:
        """Newest checkpoint that restores cleanly, or None. ``abstract_state_fn(spec)`` -> abstract tree."""
        for ckpt_id in reversed(self.steps()):
            try:
                meta = self.manager.restore(ckpt_id, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                spec = NetSpec.from_dict(meta["spec"])
                abstract = abstract_state_fn(spec)
                restored = self.manager.restore(ckpt_id, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
                state = restored["state"]
                jax.block_until_ready(state)
                return Restored(state=state, spec=spec, meta=meta, ckpt_id=ckpt_id)
            except Exception as e:  # corrupted or truncated: fall back to the previous one
                logger.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                               ckpt_id, self.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
