"""End to end: ``python -m asose_jax.search`` as a subprocess, the way a user runs it.

* the `smoke` preset on synthetic data: exit 0 in < 120 s (wall, or CPU under load), and every output file
  (genotype.json, metrics.jsonl with the documented fields, summary.md, a PNG under plots/, config.json,
  result.json);
* ``--help`` documents every flag of the parser;
* when the shared CIFAR-10 pack exists: a mini run on a small real subset (``realdata``).

The runs share one compilation-cache directory of their own (so the first run is cold as on a fresh clone,
whatever ran before it): the real-data run has the same shapes as the smoke run and reuses its programs.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asose_jax.genotype import load_genotype
from asose_jax.search import build_parser

REPO = Path(__file__).resolve().parents[1]
SMOKE_LIMIT_S = 120.0
EPOCH_FIELDS = ("cycle", "phase", "epoch", "step", "loss", "acc", "split", "tau", "alpha_entropy", "img_per_s",
                "wall_s")


@pytest.fixture(scope="session")
def cold_xla_cache(tmp_path_factory) -> Path:
    """A cache of these runs alone (not conftest's session cache), so the smoke run compiles everything."""
    return tmp_path_factory.mktemp("cold_xla_cache")


def run_cli(args: list[str], cache: Path | None = None,
            timeout: float = 600) -> tuple[subprocess.CompletedProcess, float, float]:
    """The finished command, its wall seconds and its CPU seconds (user + system, its own threads summed)."""
    env = dict(os.environ)
    if cache is not None:
        env["ASOSE_JAX_CACHE"] = str(cache)
        env["ASOSE_JAX_CACHE_MIN_COMPILE_S"] = "0"
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "asose_jax.search", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, time.perf_counter() - t0, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}\n--- stdout (tail) ---\n{proc.stdout[-1000:]}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cold_xla_cache):
    workdir = tmp_path_factory.mktemp("smoke") / "run"  # a new directory, as a user would pass
    proc, wall, cpu = run_cli(["--preset", "smoke", "--workdir", str(workdir), "--no-progress"], cold_xla_cache)
    return workdir, proc, wall, cpu


@pytest.mark.slow
def test_smoke_run_succeeds_in_time(smoke_run):
    """Under the limit in wall time, or in CPU time where the wall time is not the run's own: beside the other
    xdist worker of ``make test`` (or any other load) the wall time can double, while the CPU seconds of the run
    bound its wall time alone (XLA compiles on one thread, steps run on up to all cores)."""
    workdir, proc, wall, cpu = smoke_run
    assert proc.returncode == 0, _tail(proc)
    assert min(wall, cpu) < SMOKE_LIMIT_S, f"smoke run took {wall:.1f} s, {cpu:.1f} CPU s (limit {SMOKE_LIMIT_S:.0f} s)"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smoke_outputs(smoke_run):
    workdir, proc, *_ = smoke_run
    assert proc.returncode == 0, _tail(proc)
    for name in ("genotype.json", "metrics.jsonl", "summary.md", "config.json", "result.json"):
        assert (workdir / name).is_file(), f"{name} missing; workdir has {sorted(p.name for p in workdir.iterdir())}"
    pngs = sorted((workdir / "plots").glob("*.png"))
    assert pngs, "no PNG under plots/"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (workdir / "summary.md").read_text().strip()

    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["config"]["data"]["source"] == "synthetic"
    genotype = load_genotype(workdir / "genotype.json")
    assert genotype["ops"] and len(genotype["ops"]) == len(genotype["blocks"])

    result = json.loads((workdir / "result.json").read_text())
    assert 0.0 <= result["test_acc"] <= 100.0 and 0.0 <= result["arch_val_acc"] <= 100.0


@pytest.mark.slow
def test_smoke_metrics_rows(smoke_run):
    workdir, proc, *_ = smoke_run
    assert proc.returncode == 0, _tail(proc)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert lines
    rows = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in rows)
    epochs = [r for r in rows if r.get("event", "epoch") == "epoch"]
    assert epochs
    for r in epochs:
        missing = [f for f in EPOCH_FIELDS if f not in r]
        assert not missing, (missing, r)
        assert r["split"] == ("arch_val" if r["phase"] == "arch" else "weights")
        assert r["loss"] > 0 and 0 <= r["acc"] <= 100 and r["img_per_s"] > 0 and r["tau"] > 0
        if r["phase"] == "arch":  # the weight gradient's norm is logged by the phases that train weights
            assert "grad_norm" not in r and "grad_norm_max" not in r
        else:
            assert 0 < r["grad_norm"] <= r["grad_norm_max"] * (1 + 1e-6) < float("inf"), r
    phases = {r["phase"] for r in epochs}
    assert {"weight", "arch", "retrain"} <= phases
    steps = [r["step"] for r in epochs]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    walls = [r["wall_s"] for r in rows if "wall_s" in r]
    assert walls == sorted(walls)
    # the architecture step trains on the held-out split and moves alpha (entropy changes)
    assert len({round(r["alpha_entropy"], 7) for r in epochs}) > 1
    assert any(r.get("event") == "cycle_end" for r in rows)


def test_help_documents_every_flag():
    proc, *_ = run_cli(["--help"])
    assert proc.returncode == 0, _tail(proc)
    text = proc.stdout
    flags = [opt for action in build_parser()._actions for opt in action.option_strings]
    assert {"--config", "--preset", "--workdir", "--set", "--data-dir", "--no-progress"} <= set(flags)
    for flag in flags:
        assert flag in text, f"{flag} not in --help"
    for action in build_parser()._actions:
        if action.option_strings and action.help != "==SUPPRESS==":
            assert action.help, f"{action.option_strings} has no help text"
    assert "smoke" in text  # the presets are named


@pytest.mark.slow
@pytest.mark.realdata
def test_real_cifar10_mini_run(cifar10_dir, tmp_path, cold_xla_cache):
    workdir = tmp_path / "real"
    proc, *_ = run_cli(["--preset", "smoke", "--workdir", str(workdir), "--no-progress",
                        "--set", "data.source=dir", "--set", f"data.dir={cifar10_dir}",
                        "--set", "data.train_subset=512", "--set", "data.test_subset=256",
                        "--set", "data.arch_val_size=256"], cold_xla_cache)
    assert proc.returncode == 0, _tail(proc)
    assert (workdir / "genotype.json").is_file()
    cfg = json.loads((workdir / "config.json").read_text())["config"]
    assert cfg["data"]["source"] == "dir"
    load_genotype(workdir / "genotype.json")
