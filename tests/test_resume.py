"""Fault tests of checkpoint/resume (issue [C]): a search killed at a checkpoint and re-run with the same
command ends with the same ``genotype.json`` (byte for byte), the same ``metrics.jsonl`` rows (to the last
bit, timing fields excepted) and the same ``result.json`` figures as an uninterrupted run.

The end-to-end runs are subprocesses of ``python -m asose_jax.search --preset smoke --set growth.every=1``
(growth in every cycle: deepen in cycle 1, widen in cycle 2, branch in cycle 3) on CPU, sharing one persistent XLA cache per
test session so that only the first run compiles. A few in-process tests at the end check the checkpoint
round trip itself (values, dtypes, optimizer NamedTuples, grown specs) and that a NaN state is never saved.

Checkpoint ids of that config (one save per task; ``every_steps=3`` adds saves inside epochs)::

    every_steps=0: 0 warmup | 1 c1 weight, 2 arch, 3 grow, 4 retrain, 5 end | 6 c2 weight, 7 arch, 8 grow, ...
    every_steps=3: 0,1 (warmup steps 3,6), 2 warmup end | ... 13 (c2 weight step 3) ... 16 (c2 arch step 3/4) ...

To kill "at" checkpoint N deterministically, a run is SIGKILLed as soon as ``checkpoints/N`` is finalised
(polling the filesystem), and any newer checkpoint it managed to finalise in between is deleted: the
workdir is then exactly what a kill right after N leaves behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--preset", "smoke", "--no-progress", "--set", "growth.every=1"]
RUN_TIMEOUT_S = 300
POLL_S = 0.05


# ---------------------------------------------------------------------------------------------- helpers

def _env(cache: Path) -> dict:
    return {**os.environ, "ASOSE_JAX_CACHE": str(cache), "ASOSE_JAX_CACHE_MIN_COMPILE_S": "0",
            "JAX_PLATFORMS": "cpu"}


def _cmd(workdir: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "asose_jax.search", *BASE, "--workdir", str(workdir), *extra]


def run_search(cache: Path, workdir: Path, extra=(), expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(workdir, extra), cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"exit {proc.returncode}, expected {expect_rc}:\n{proc.stderr[-4000:]}"
    return proc


def checkpoint_ids(workdir: Path) -> list[int]:
    """Finalised checkpoints (Orbax writes ``<id>.orbax-checkpoint-tmp-*`` and renames it when complete)."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def save_finished(workdir: Path, ckpt_id: int) -> bool:
    """Checkpoint ``ckpt_id`` is on disk and its save has ended: Orbax wrote its ``commit_success.txt``, or a
    later save began (Orbax waits for the previous save first). A kill sent earlier may land mid-save."""
    ids = checkpoint_ids(workdir)
    done = (workdir / "checkpoints" / str(ckpt_id) / "commit_success.txt").exists()
    return ckpt_id in ids and (done or max(ids) > ckpt_id)


def interrupt_at(cache: Path, workdir: Path, ckpt_id: int, extra=(), sig=signal.SIGKILL, trim: bool = True,
                 timeout_s: float = RUN_TIMEOUT_S) -> subprocess.Popen:
    """Start a run, send ``sig`` once checkpoint ``ckpt_id`` is finalised; with ``trim`` drop newer ones."""
    log = open(workdir.with_name(workdir.name + f".interrupted-{ckpt_id}.log"), "w+")
    proc = subprocess.Popen(_cmd(workdir, extra), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=log)
    deadline = time.monotonic() + timeout_s
    try:
        while not save_finished(workdir, ckpt_id):
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"run ended (exit {proc.returncode}) before checkpoint {ckpt_id}:\n{log.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"checkpoint {ckpt_id} not written within {timeout_s} s")
            time.sleep(POLL_S)  # waiting on the subprocess's filesystem, not pacing the test
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    proc.log = log.read()
    log.close()
    if trim:
        for i in checkpoint_ids(workdir):
            if i > ckpt_id:
                shutil.rmtree(workdir / "checkpoints" / str(i))
    return proc


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (k.endswith("_s") or k.endswith("_ms"))}


def metrics_rows(workdir: Path) -> list[dict]:
    return [_untimed(json.loads(line)) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]


def assert_same_result(ref: Path, other: Path) -> None:
    assert (other / "genotype.json").read_bytes() == (ref / "genotype.json").read_bytes()
    ref_rows, rows = metrics_rows(ref), metrics_rows(other)
    assert len(rows) == len(ref_rows)
    for i, (a, b) in enumerate(zip(ref_rows, rows)):
        assert a == b, f"metrics.jsonl row {i} differs: {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}"
    res = [_untimed(json.loads((w / "result.json").read_text())) for w in (ref, other)]
    assert res[0] == res[1]


def resumed_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "resumed from checkpoint" in ln]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(xla_cache, tmp_path_factory) -> Path:
    """The uninterrupted run (no in-epoch saves)."""
    workdir = tmp_path_factory.mktemp("resume") / "reference"
    run_search(xla_cache, workdir)
    assert (workdir / "genotype.json").is_file()
    growths = [r for r in metrics_rows(workdir) if r.get("event") == "growth"]
    assert [g["cycle"] for g in growths] == [1, 2, 3], "the smoke preset with growth.every=1 must grow every cycle"
    assert [g["kind"] for g in growths] == ["deepen", "widen", "branch"]
    return workdir


@pytest.fixture(scope="module")
def killed_after_growths(xla_cache, reference, tmp_path_factory) -> Path:
    """A pristine workdir killed twice: right after the cycle-1 growth (checkpoint 3, a deepen), re-run,
    and killed again right after the cycle-2 growth (checkpoint 8, a widen of the restored, grown net)."""
    workdir = tmp_path_factory.mktemp("resume") / "killed"
    first = interrupt_at(xla_cache, workdir, 3)
    assert "resumed" not in first.log
    second = interrupt_at(xla_cache, workdir, 8)
    line = resumed_line(second.log)
    assert "resumed from checkpoint 3 " in line and "cycle 1 retrain epoch 1/1, step 0/8 of the epoch" in line, line
    assert "unreadable" not in second.log
    assert checkpoint_ids(workdir)[-1] == 8
    return workdir


# ---------------------------------------------------------------------------------------------- (a) kills

def test_killed_mid_epoch_then_interrupted_then_resumed(xla_cache, reference, tmp_path):
    """SIGKILL mid-warmup (step 6/8), re-run; Ctrl-C mid-epoch in cycle 2 (grown net, step 3/4 of the arch
    epoch, the widen still to come), re-run to the end: the result equals the uninterrupted run's."""
    workdir = tmp_path / "run"
    # max_to_keep: the Ctrl-C may land several saves after 16, and the default (3) would then delete 16
    extra = ("--set", "checkpoint.every_steps=3", "--set", "checkpoint.max_to_keep=100")
    first = interrupt_at(xla_cache, workdir, 1, extra)
    assert "resumed" not in first.log

    # Ctrl-C: exit 130 with a one-line hint, every queued save finalised (no temporary directories left)
    second = interrupt_at(xla_cache, workdir, 16, extra, sig=signal.SIGINT, trim=False)
    line = resumed_line(second.log)
    assert "resumed from checkpoint 1 " in line and "cycle 0 warmup epoch 1/1, step 6/8 of the epoch" in line, line
    assert second.returncode == 130, second.log[-4000:]
    assert second.log.strip().splitlines()[-1].startswith("interrupted: ")
    assert "Traceback" not in second.log
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
    assert not leftovers, leftovers
    assert 16 in checkpoint_ids(workdir), checkpoint_ids(workdir)
    for i in checkpoint_ids(workdir):  # resume from exactly 16 (the Ctrl-C may land a save or more later)
        if i > 16:
            shutil.rmtree(workdir / "checkpoints" / str(i))

    # checkpoint.* is not part of the run's identity: re-running with another save interval is a resume
    third = run_search(xla_cache, workdir, ("--set", "checkpoint.every_steps=5"))
    line = resumed_line(third.stderr)
    assert "resumed from checkpoint 16 " in line and "cycle 2 arch epoch 1/1, step 3/4 of the epoch" in line, line
    assert "unreadable" not in third.stderr
    assert_same_result(reference, workdir)


def test_killed_right_after_growths_then_resumed(xla_cache, reference, killed_after_growths, tmp_path):
    workdir = copy_workdir(killed_after_growths, tmp_path / "run")
    spec = json.loads((workdir / "checkpoints" / "8" / "meta" / "metadata").read_text())["spec"]
    assert len(spec["blocks"]) == 4  # 3 + the cycle-1 deepen: the checkpoint holds the grown spec
    proc = run_search(xla_cache, workdir)
    line = resumed_line(proc.stderr)
    assert "resumed from checkpoint 8 " in line and "cycle 2 retrain epoch 1/1, step 0/8 of the epoch" in line, line
    assert "unreadable" not in proc.stderr
    assert_same_result(reference, workdir)


# Two cycles without retraining (checkpoint 10 is cycle 2's weight step 3): the kill lands in cycle 2, and a third
# cycle or a retrain after the cycle-2 widen would only add compiles of routed weight steps of other nets.
ROUTED = ("--set", "mixed_op.mode=routed", "--set", "mixed_op.arch_mode=dense", "--set", "cycle.max_cycles=2",
          "--set", "cycle.retrain_epochs=0")


def test_a_routed_search_killed_mid_epoch_after_a_growth_resumes_bit_exact(xla_cache, tmp_path):
    """Routed weight steps draw their permutations from the step's key: SIGKILL at cycle 2's weight step 3 (the
    deepened net), re-run: the result (the cycle-2 widen included) equals the uninterrupted routed run's."""
    reference = tmp_path / "reference"
    run_search(xla_cache, reference, ROUTED)
    workdir = tmp_path / "run"
    extra = ROUTED + ("--set", "checkpoint.every_steps=3")
    interrupt_at(xla_cache, workdir, 10, extra)
    line = resumed_line(run_search(xla_cache, workdir, extra).stderr)
    assert "resumed from checkpoint 10 " in line and "cycle 2 weight epoch 1/1, step 3/8 of the epoch" in line, line
    assert_same_result(reference, workdir)


# ---------------------------------------------------------------------------------------------- (b) corruption

def _array_files(ckpt: Path) -> list[Path]:
    """The array data files of a checkpoint (OCDBT keeps them in ``d/`` folders; which one holds which
    array varies, so a test that must break the restore damages all of them)."""
    return [p for p in (ckpt / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def test_corrupt_latest_checkpoint_falls_back(xla_cache, reference, killed_after_growths, tmp_path):
    workdir = copy_workdir(killed_after_growths, tmp_path / "run")
    for victim in _array_files(workdir / "checkpoints" / "8"):
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncate
    proc = run_search(xla_cache, workdir)
    warnings = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln and "checkpoint 8" in ln]
    assert any("unreadable" in ln and "trying the previous one" in ln for ln in warnings), proc.stderr[-4000:]
    assert "resumed from checkpoint 7 " in resumed_line(proc.stderr)
    assert (workdir / "checkpoints.corrupt" / "8").is_dir()  # set aside, not deleted
    assert_same_result(reference, workdir)


def test_no_restorable_checkpoint_exits_2(xla_cache, killed_after_growths, tmp_path):
    workdir = copy_workdir(killed_after_growths, tmp_path / "run")
    ids = checkpoint_ids(workdir)
    for i in ids:  # (an old one may be half-deleted already: the kill can land while max_to_keep prunes it)
        meta = workdir / "checkpoints" / str(i) / "meta"
        if meta.is_dir():
            (meta / "metadata").write_text("{not json")
    before = {name: (workdir / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    proc = run_search(xla_cache, workdir, expect_rc=2)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "can be restored" in errors[0], proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in proc.stderr
    assert checkpoint_ids(workdir) == ids  # nothing moved or deleted
    assert {name: (workdir / name).read_bytes() for name in before} == before


# ---------------------------------------------------------------------------------------------- (c) config changes

def test_config_change_is_refused_unless_allowed(xla_cache, reference, tmp_path):
    workdir = copy_workdir(reference, tmp_path / "run")
    saved = {name: (workdir / name).read_bytes() for name in ("config.json", "metrics.jsonl", "genotype.json")}
    ids = checkpoint_ids(workdir)

    proc = run_search(xla_cache, workdir, ("--set", "seed=1"), expect_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "different config" in lines[0], proc.stderr
    assert "resume.allow_config_change=true" in lines[0]
    assert {name: (workdir / name).read_bytes() for name in saved} == saved  # nothing written or lost
    assert checkpoint_ids(workdir) == ids

    # without config.json the checkpoints' own config hash still guards the run
    (workdir / "config.json").unlink()
    proc = run_search(xla_cache, workdir, ("--set", "seed=1"), expect_rc=2)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "different config" in errors[0], proc.stderr[-4000:]
    assert not (workdir / "config.json").exists() and checkpoint_ids(workdir) == ids

    proc = run_search(xla_cache, workdir, ("--set", "seed=1", "--set", "resume.allow_config_change=true"))
    assert "all tasks done" in resumed_line(proc.stderr)
    assert json.loads((workdir / "config.json").read_text())["config"]["seed"] == 1


def test_config_change_in_a_new_workdir_starts_a_new_run(xla_cache, reference, tmp_path):
    workdir = tmp_path / "run"
    proc = interrupt_at(xla_cache, workdir, 0, ("--set", "seed=1"))
    assert "new run in" in proc.log and "resumed" not in proc.log
    assert json.loads((workdir / "config.json").read_text())["config"]["seed"] == 1


# ---------------------------------------------------------------------------------------------- in-process

@pytest.fixture
def smoke_run(xla_cache, monkeypatch):
    """``make(workdir)`` -> a smoke-preset Run in this process (its compiles come from the session cache
    when this process has not set up its compilation cache otherwise)."""
    from asose_jax import cli
    from asose_jax.config import load_config_file, preset_path
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset
    monkeypatch.setenv("ASOSE_JAX_CACHE", str(xla_cache))
    cli.enable_compilation_cache()
    cfg = load_config_file(preset_path("smoke"))
    data = load_dataset(cfg.data, cfg.seed)
    return lambda workdir: Run(cfg, data, workdir, progress=False)


def test_checkpoint_round_trip_is_exact(smoke_run, tmp_path):
    """Every leaf comes back with its value, dtype (int32 counters, uint32 key) and container type
    (optax NamedTuple states), and the cursor/metrics come back from the JSON metadata exactly."""
    import jax
    import numpy as np
    run = smoke_run(tmp_path)
    run.init_state()
    run.task_index, run.step_in_epoch = 3, 5
    run.metrics = [{"event": "epoch", "loss": 0.1 + 0.2, "acc": 1 / 3, "wall_s": 1.5}]
    run.save()
    run.ckpt.wait()
    again = smoke_run(tmp_path)
    assert again.try_resume()
    assert (again.task_index, again.step_in_epoch, again.metrics) == (3, 5, run.metrics)
    assert again.spec == run.spec
    assert jax.tree.structure(again.state) == jax.tree.structure(run.state)
    assert type(again.state.w_opt) is type(run.state.w_opt) and type(again.state.a_opt) is type(run.state.a_opt)
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(run.state)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert again.state.step.dtype == np.int32 and again.state.sums["count"].dtype == np.int32


def test_save_refuses_a_non_finite_state(smoke_run, tmp_path):
    import jax
    import jax.numpy as jnp
    from asose_jax.errors import DivergenceError
    run = smoke_run(tmp_path)
    run.init_state()
    run.save()  # a good one first
    run.state = run.state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), run.state.params))
    with pytest.raises(DivergenceError, match="NaN/Inf by step 0"):
        run.save()
    run.ckpt.wait()
    assert checkpoint_ids(tmp_path) == [0]


@pytest.mark.parametrize("kinds", [("branch",), ("widen", "branch", "deepen")])
def test_grown_state_round_trips(smoke_run, tmp_path, kinds):
    """A checkpoint of a grown net restores into the tree rebuilt from its saved spec (every growth kind,
    stacked; the e2e tests cover deepen and widen on the real schedule)."""
    import jax
    import numpy as np
    from asose_jax import growth
    run = smoke_run(tmp_path)
    run.init_state()
    for i, kind in enumerate(kinds):
        run.spec, run.state, _ = growth.grow(kind, run.spec, run.state, jax.random.PRNGKey(i), run.cfg.growth)
    run.save()
    run.ckpt.wait()
    again = smoke_run(tmp_path)
    assert again.try_resume()
    assert again.spec == run.spec
    assert jax.tree.structure(again.state) == jax.tree.structure(run.state)
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(run.state)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
