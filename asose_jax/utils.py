"""Small helpers shared by the commands and the training loops: one-line error text, the device name,
atomic JSON writes, Ctrl-C at step boundaries and the loop constants. Imports no jax at module level."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

LOG_EVERY = 50  # steps between progress-bar refreshes (each one is a host sync)
EVAL_BATCH = 1000  # images per evaluation batch (one compiled shape)
SEARCH_CHECKPOINTS, FINAL_CHECKPOINTS = "checkpoints", "final_checkpoints"  # their folders in a workdir
CHECKPOINT_DIRS = (SEARCH_CHECKPOINTS, FINAL_CHECKPOINTS)


def holds_checkpoint(directory: Path) -> bool:
    """True when ``directory`` holds a finalised checkpoint (Orbax names it by its id; a save in progress has
    another name)."""
    return any(p.name.isdigit() for p in Path(directory).glob("*"))


def one_line(e: BaseException) -> str:
    """The message of ``e`` with its whitespace collapsed to single spaces, or its type name when it has none."""
    return " ".join(str(e).split()) or type(e).__name__


def device_name() -> str:
    """``platform:device kind`` of the first device, e.g. ``gpu:NVIDIA H100 80GB HBM3``."""
    import jax
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` next to ``path`` and rename it over ``path``: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON with sorted keys (deterministic bytes), atomically replaced."""
    _replace_text(Path(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line, keys sorted, atomically replaced."""
    _replace_text(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


@contextlib.contextmanager
def ctrl_c_flag():
    """While active, a first Ctrl-C only sets the yielded event (the training loop stops at the next step
    boundary with KeyboardInterrupt, raised from Python code, so no C++ call or garbage-collector callback can
    swallow it); a second one interrupts at once. Yields None off the main thread (no signal handler there)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield None
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
