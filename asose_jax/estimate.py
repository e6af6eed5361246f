"""How long the rest of a search takes on a machine without a GPU or TPU, from its first measured steps.

On a few CPU cores the default search runs at tens of images per second: hours in all. The search says so
once, early, with the quick path (``make smoke``), rather than leaving the user to find out.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

logger = logging.getLogger("asose_jax")
QUICK_PATH_AFTER_S = 600.0  # name the smoke run as the quick path when the estimate is longer than this


def steps_left(run) -> int:
    """Weight and arch steps from a :class:`~asose_jax.cycle.Run`'s cursor to the end of its plan."""
    epochs = [t for t in run.tasks[run.task_index:] if t.kind == "epoch"]
    total = sum(run.n_arch_steps if t.phase == "arch" else run.n_weight_steps for t in epochs)
    return total - run.step_in_epoch


def duration(seconds: float) -> str:
    """``42 s``, ``17 min`` or ``4.8 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class FirstStepsEstimate:
    """Called with the step counter (``state.step``) at each progress sync; logs one line, once, at the second
    call: the rate between the first two calls (compilation before the first is not counted) times the steps
    left. Evaluation passes are not counted, so the figure is a lower bound."""

    def __init__(self, steps_left: int, step_at_start: int, batch_size: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.steps_left, self.step_at_start, self.batch_size, self.clock = steps_left, step_at_start, batch_size, clock
        self.first: tuple[int, float] | None = None
        self.logged = False

    def __call__(self, step: int) -> None:
        if self.logged:
            return
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
            return
        step0, t0 = self.first
        if step <= step0 or now <= t0:
            return
        rate = (step - step0) / (now - t0)  # steps per second
        seconds = max(self.steps_left - (step - self.step_at_start), 0) / rate
        quick = "; `make smoke` is the quick check (under 2 minutes)" if seconds > QUICK_PATH_AFTER_S else ""
        logger.warning("no GPU or TPU found: the CPU runs %.0f img/s, so this search needs about %s more%s",
                       rate * self.batch_size, duration(seconds), quick)
        self.logged = True
