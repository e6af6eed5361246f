"""Every error a user can cause, in one place, so that any layer may raise one without importing the CLI.

Each message is one line for the user. The CLI (:func:`asose_jax.cli.run_cli`) prints ``error: <message>`` and
exits 2 for a :class:`BadInput`, 3 for a :class:`DivergenceError`.
"""
from __future__ import annotations


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
    """Bad input found by the CLI itself: an unwritable workdir, a changed config on a resume."""


class DivergenceError(RuntimeError):
    """The training loss or state became NaN/Inf; nothing was saved past the last good checkpoint."""
