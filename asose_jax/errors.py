"""Every error a user can cause, in one place, so that any layer may raise one without importing the CLI.

Each message is one line for the user. The CLI (:func:`asose_jax.cli.run_cli`) prints ``error: <message>`` and
exits 2 for a :class:`BadInput`, 3 for a :class:`DivergenceError`.
"""
from __future__ import annotations

import errno


class BadInput(Exception):
    """Input the user can fix: the CLI exits 2 with the message."""


class ConfigError(BadInput, ValueError):
    """A bad config value, override or config file."""


class DataError(BadInput, RuntimeError):
    """Missing, corrupted or unreadable CIFAR-10 data."""


class GenotypeError(BadInput, ValueError):
    """A genotype file that does not describe a buildable network of known ops."""


class CheckpointError(BadInput, RuntimeError):
    """No checkpoint restores, or the checkpoints come from another config or network."""


class UsageError(BadInput, RuntimeError):
    """Bad input found by the CLI itself: an unwritable or busy workdir, a changed config on a resume."""


class DiskFullError(BadInput, RuntimeError):
    """The disk filled up while the run wrote its workdir. What was written before is intact (a checkpoint
    becomes one only once it is complete), so the same command resumes once there is space again."""


class DivergenceError(RuntimeError):
    """The training loss or state became NaN/Inf; nothing was saved past the last good checkpoint."""


DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_disk_full(e: BaseException | None) -> bool:
    """True when ``e``, or an exception it was raised from, says that the device is full: an ``OSError`` with
    ``ENOSPC`` / ``EDQUOT``, or a tensorstore error from an Orbax save, which carries the OS error in its text."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in DISK_FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False
