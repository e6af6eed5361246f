"""Shared pytest fixtures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


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
