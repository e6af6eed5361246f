"""The Makefile installs into .venv only when pyproject.toml changed, so re-runs need no network.

Each test runs the real Makefile against a private VENV whose ``bin/python`` is a stub that logs its
arguments instead of running pip or the search.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMPS = (".installed", ".installed-test", ".installed-torch-2.13.0")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def venv(tmp_path):
    """A VENV dir whose python is a logging stub; returns (venv path, log file)."""
    log = tmp_path / "calls.log"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    python.chmod(0o755)
    return tmp_path / "venv", log


def _make(venv_dir: Path, *args: str) -> str:
    """Run make in the repo with VENV=venv_dir (free of an outer make's flags); return its stdout."""
    outer = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS", "PYTEST_ARGS", "PY", "VENV", "TORCH_VERSION")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    proc = subprocess.run(["make", "-C", str(REPO), f"VENV={venv_dir}", "TORCH_VERSION=2.13.0", *args],
                          capture_output=True, text=True, env=env, timeout=60, check=True)
    return proc.stdout


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _set_mtime(path: Path, seconds_after_pyproject: int) -> None:
    mtime_ns = (REPO / "pyproject.toml").stat().st_mtime_ns + seconds_after_pyproject * 10**9
    path.touch()
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_dry_run_with_up_to_date_stamps_plans_no_pip_install(venv):
    venv_dir, _ = venv
    for stamp in STAMPS:
        _set_mtime(venv_dir / stamp, 60)
    for _ in range(2):
        for target in ("smoke", "search", "test"):
            plan = _make(venv_dir, "-n", target)
            assert "pip install" not in plan, plan
            assert "-m asose_jax" in plan or "-m pytest" in plan, plan


def test_a_stamp_older_than_pyproject_plans_a_reinstall(venv):
    venv_dir, _ = venv
    _set_mtime(venv_dir / ".installed", -60)
    assert "pip install -e ." in _make(venv_dir, "-n", "smoke")


def test_smoke_installs_once_then_only_runs(venv):
    venv_dir, log = venv
    _make(venv_dir, "smoke")
    _make(venv_dir, "smoke")
    calls = _calls(log)
    assert calls.count("-m pip install -e .") == 1
    assert sum(c.startswith("-m asose_jax.search --preset smoke") for c in calls) == 2


def test_test_installs_the_extra_and_torch_once_and_covers_search(venv):
    venv_dir, log = venv
    _make(venv_dir, "test")
    _make(venv_dir, "test")
    _make(venv_dir, "search")
    calls = _calls(log)
    assert calls.count("-m pip install -e .[test]") == 1
    assert calls.count("-m pip install torch==2.13.0") == 1
    assert sum(c.startswith("-m pytest -n 2 ") for c in calls) == 2  # two xdist workers
    assert not any(c == "-m pip install -e ." for c in calls)  # the test extra's install stamped the package
    assert calls[-1] == "-m asose_jax.search"
