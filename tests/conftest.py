"""Shared pytest fixtures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
# The longest test files (end-to-end searches and big compiles), collected first: `make test` hands whole files to
# its two xdist workers in collection order, so the short files fill in behind these and both finish about together.
LONGEST_FIRST = ("test_resume.py", "test_routed.py", "test_study.py", "test_parallel.py", "test_cost.py",
                 "test_failures.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the files of :data:`LONGEST_FIRST` first, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> Path:
    """The session's persistent XLA compilation cache, empty at the start as on a fresh clone. One per pytest-xdist
    worker (``getbasetemp`` is per worker): JAX writes an entry in place, so two processes filling one directory at
    once could read a half-written entry and warn on stderr, which the one-line-error tests would see."""
    path = tmp_path_factory.getbasetemp() / "xla_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _session_xla_cache(xla_cache):
    """Every CLI run of the session, in-process or a subprocess, caches every program it compiles in
    :func:`xla_cache` (never ``~/.cache``), so a later run of the same shapes loads it instead of compiling."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ASOSE_JAX_CACHE", str(xla_cache))
    patch.setenv("ASOSE_JAX_CACHE_MIN_COMPILE_S", "0")
    yield
    patch.undo()


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """The real CIFAR-10 as a ``cifar-10-batches-py`` dir, restored once per session from the shared pack."""
    if not (SHARED_CIFAR10 / "restore.py").is_file():
        pytest.skip(f"shared CIFAR-10 pack not found at {SHARED_CIFAR10}")
    target = tmp_path_factory.mktemp("cifar10")
    proc = subprocess.run([sys.executable, str(SHARED_CIFAR10 / "restore.py"), str(target)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"restore.py failed ({proc.returncode}): {proc.stderr.strip()}")
    return target / "cifar-10-batches-py"
