"""Failures a user meets (issue 23): each ends in one line on stderr (at most 3 lines in all without ``--debug``,
the one line last), with its documented exit code (2 bad input or full disk, 3 NaN/Inf, 130 Ctrl-C), and leaves
a workdir that the corrected command can use.

In-process calls (``run_main``) where only the exit code and the message matter; subprocesses of the real
commands where stderr as a user sees it is the point (late tracebacks, a full disk, Ctrl-C during the exit).
They share the session's persistent XLA cache (conftest.xla_cache).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from asose_jax import cli, final, search
from asose_jax.config import Config, apply_overrides, describe, leaves, load_config_file, preset_path, ranges, validate
from asose_jax.errors import CheckpointError, ConfigError
from asose_jax.estimate import FirstStepsEstimate
from test_cli_errors import run_main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--no-progress"]
GENOTYPE = {"skeleton": "resnet", "stem_channels": 8, "num_classes": 10, "ops": ["sep_conv_3x3", "max_pool_3x3"],
            "op_set": ["none", "max_pool_3x3", "sep_conv_3x3"],
            "blocks": [{"c_in": 8, "c_out": 8, "stride": 1}, {"c_in": 8, "c_out": 16, "stride": 2}]}
DISK_FULL = ("RESOURCE_EXHAUSTED: Error writing local file \"state/_sharding\": Failed to write 16807 bytes to file 4: "
             "No space left on device [os_error_code='28']")


def env(cache: Path) -> dict:
    return {**os.environ, "ASOSE_JAX_CACHE": str(cache), "ASOSE_JAX_CACHE_MIN_COMPILE_S": "0", "JAX_PLATFORMS": "cpu"}


def command(cache: Path, module: str, *argv: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m asose_jax.<module> argv`` (or ``python <python> argv``), quiet, with the session's cache."""
    head = list(python) if python else ["-m", f"asose_jax.{module}"]
    return subprocess.run([sys.executable, *head, *argv, "-q"], cwd=ROOT, env=env(cache), capture_output=True,
                          text=True, timeout=600)


def assert_failure(err: str, *needles: str) -> str:
    """At most 3 lines on stderr, the last one ``error: ...`` holding every needle, and no traceback."""
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3, f"expected at most 3 lines on stderr, got {len(lines)}:\n{err[-3000:]}"
    assert lines[-1].startswith("error: "), err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def damage(ckpt: Path) -> None:
    """Truncate every OCDBT file of a checkpoint's arrays (the data files and the manifests)."""
    for f in (ckpt / "state").rglob("*"):
        if f.is_file() and (f.parent.name == "d" or f.name == "manifest.ocdbt"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def ckpt_ids(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


# ---------------------------------------------------------------------------------------------- final checkpoints

@pytest.fixture(scope="module")
def genotype_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("genotype") / "genotype.json"
    path.write_text(json.dumps(GENOTYPE))
    return path


@pytest.fixture(scope="module")
def trained_final(xla_cache, genotype_file, tmp_path_factory) -> Path:
    """A finished final training of the smoke preset (2 epochs: final checkpoints 0 and 1)."""
    workdir = tmp_path_factory.mktemp("final") / "run"
    proc = command(xla_cache, "final", "--genotype", str(genotype_file), *SMOKE, "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt_ids(workdir / "final_checkpoints") == [0, 1]
    return workdir


def test_corrupt_final_checkpoint_falls_back_to_the_previous_one(xla_cache, genotype_file, trained_final, tmp_path):
    """Item 1 (and 6): the newest final checkpoint is damaged; the re-run warns, sets it aside, resumes from the
    one before and ends with the same test accuracy, with no asyncio tracebacks on stderr."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_final, workdir)
    damage(workdir / "final_checkpoints" / "1")
    (workdir / "final.json").unlink()
    proc = command(xla_cache, "final", "--genotype", str(genotype_file), *SMOKE, "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any("checkpoint 1" in ln and "unreadable" in ln for ln in lines), proc.stderr
    assert (workdir / "final_checkpoints.corrupt" / "1").is_dir()
    before, after = (json.loads((d / "final.json").read_text()) for d in (trained_final, workdir))
    assert (after["test_acc"], after["test_acc_tta"]) == (before["test_acc"], before["test_acc_tta"])


def test_no_restorable_final_checkpoint_exits_2_in_one_line(xla_cache, genotype_file, trained_final, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_final, workdir)
    for i in (0, 1):
        damage(workdir / "final_checkpoints" / str(i))
    proc = command(xla_cache, "final", "--genotype", str(genotype_file), *SMOKE, "--workdir", str(workdir))
    assert proc.returncode == 2
    assert_failure(proc.stderr, "none of the 2 checkpoints", "can be restored")
    assert ckpt_ids(workdir / "final_checkpoints") == [0, 1]


def test_allow_config_change_with_a_changed_final_recipe_is_refused_before_writing(capsys, genotype_file,
                                                                                  trained_final, tmp_path):
    """Item 4: final checkpoints present, a changed final.* value and resume.allow_config_change=true: one line,
    exit 2, and config.json as it was (so the original command still resumes)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_final, workdir)
    config_before = (workdir / "config.json").read_bytes()
    rc, err = run_main(capsys, ["--genotype", str(genotype_file), *SMOKE, "--workdir", str(workdir),
                                "--set", "final.lr=0.2", "--set", "resume.allow_config_change=true"], main=final.main)
    assert rc == 2
    assert_failure(err, "final_checkpoints", "another network or recipe", "resume.allow_config_change")
    assert (workdir / "config.json").read_bytes() == config_before
    assert ckpt_ids(workdir / "final_checkpoints") == [0, 1]


def test_search_that_would_run_further_refuses_final_checkpoints_of_the_finished_one(tmp_path):
    (tmp_path / "final_checkpoints" / "0").mkdir(parents=True)
    unfinished = SimpleNamespace(task_index=3, tasks=[None] * 5)
    with pytest.raises(CheckpointError, match="runs the search further"):
        search.check_final_resume(Config(), unfinished, None, tmp_path)


# ---------------------------------------------------------------------------------------------- full disk

DISK_FULL_AT_SAVE = """
import sys
import orbax.checkpoint as ocp
from asose_jax import search
save, calls = ocp.CheckpointManager.save, []
def full_disk_save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == int(sys.argv[1]):
        raise ValueError(sys.argv[2])
    return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = full_disk_save
sys.exit(search.main(sys.argv[3:]))
"""


def test_full_disk_during_a_save_is_one_line_and_the_run_resumes(xla_cache, tmp_path):
    """Item 2: the 4th save meets a full disk (the error Orbax raises, simulated): exit 2, one line, the three
    checkpoints before it intact; once there is space the same command resumes from the last of them."""
    workdir = tmp_path / "run"
    argv = [*SMOKE, "--workdir", str(workdir), "--set", "checkpoint.max_to_keep=100"]
    proc = command(xla_cache, "", "4", DISK_FULL, *argv, python=("-c", DISK_FULL_AT_SAVE))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_failure(proc.stderr, "no space left on the device", str(workdir / "checkpoints"), "re-run the same command")
    assert ckpt_ids(workdir / "checkpoints") == [0, 1, 2]
    proc = subprocess.run([sys.executable, "-m", "asose_jax.search", *argv], cwd=ROOT, env=env(xla_cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint 2 " in proc.stderr and (workdir / "genotype.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_full_disk_on_a_real_small_filesystem(xla_cache, tmp_path):
    """Item 2 on a real 3 MB tmpfs: Orbax's background threads fail, yet stderr is the one line."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        proc = command(xla_cache, "search", *SMOKE, "--workdir", str(mnt / "run"),
                       "--set", "checkpoint.max_to_keep=100")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert_failure(proc.stderr, "no space left on the device")
        assert ckpt_ids(mnt / "run" / "checkpoints")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_run_cli_turns_a_full_disk_anywhere_into_one_line(capsys):
    def write_outputs():
        raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl.tmp")
    assert cli.run_cli(write_outputs, debug=False, interrupted="") == 2
    assert_failure(capsys.readouterr().err, "no space left on the device", "metrics.jsonl.tmp")
    with pytest.raises(OSError):
        cli.run_cli(write_outputs, debug=True, interrupted="")


# ---------------------------------------------------------------------------------------------- rejected runs

def test_rejected_final_run_leaves_no_workdir(capsys, genotype_file, tmp_path):
    """Item 3: a data directory that does not exist is found before anything is written."""
    workdir = tmp_path / "new"
    rc, err = run_main(capsys, ["--genotype", str(genotype_file), *SMOKE, "--set", "data.source=dir",
                                "--data-dir", "/nonexistent", "--workdir", str(workdir)], main=final.main)
    assert rc == 2
    assert_failure(err, "data directory not found", "/nonexistent")
    assert not workdir.exists()


@pytest.mark.parametrize("batch, needle", [(100000, "1..50000"), (1000, "the weights split has 512 images")])
def test_batch_larger_than_the_data_is_refused_before_writing(capsys, tmp_path, batch, needle):
    workdir = tmp_path / "new"
    rc, err = run_main(capsys, [*SMOKE, "--set", f"data.batch_size={batch}", "--workdir", str(workdir)])
    assert rc == 2
    assert_failure(err, f"data.batch_size={batch}", needle)
    assert not workdir.exists()


def test_data_dir_that_the_source_ignores_is_refused(capsys, tmp_path):
    """Item 5: --data-dir with the synthetic source of the smoke preset names the conflict in one line."""
    workdir = tmp_path / "new"
    rc, err = run_main(capsys, [*SMOKE, "--data-dir", "/nonexistent", "--workdir", str(workdir)])
    assert rc == 2
    assert_failure(err, "/nonexistent", "conflicts with data.source=synthetic", "data.source=dir")
    assert not workdir.exists()
    for source in ("tfds", "download"):
        with pytest.raises(ConfigError, match=f"data.source={source}"):
            validate(apply_overrides(Config(), [f"data.source={source}", "data.dir=/data"]))
    assert validate(apply_overrides(Config(), ["data.dir=/data"])).data.dir == "/data"  # auto reads it


# ---------------------------------------------------------------------------------------------- numeric ranges

def test_every_numeric_option_has_a_finite_range():
    """Item 7: an int or float option without a range would take inf or 1e12 and crash later."""
    numeric = {key for key, value in leaves(Config()) if type(value) in (int, float)}
    bounds = ranges(Config())
    assert set(bounds) == numeric
    for key, r in bounds.items():
        assert r.holds(dict(leaves(Config()))[key]), key  # the defaults lie inside
        assert not r.holds(float("inf")) and not r.holds(float("nan")) and not r.holds(r.hi * 2 + 1), key


@pytest.mark.parametrize("key", sorted(ranges(Config())))
def test_a_value_past_the_range_is_refused_in_one_line(key):
    value = ranges(Config())[key].hi + 1
    isint = isinstance(dict(leaves(Config()))[key], int)
    for raw in ([str(int(value))] if isint else [repr(float(value)), "inf"]):
        with pytest.raises(ConfigError, match=f"^{key}=.* is out of range: allowed ") as info:
            validate(apply_overrides(Config(), [f"{key}={raw}"]))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["inf", "1e12"])
def test_widen_factor_inf_or_huge_is_refused_at_config_time(capsys, tmp_path, value):
    rc, err = run_main(capsys, [*SMOKE, "--set", f"growth.widen_factor={value}", "--workdir", str(tmp_path / "w")])
    assert rc == 2
    assert_failure(err, "growth.widen_factor=", "(1, 4]")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------- the lock

def test_second_run_on_a_locked_workdir_exits_2_and_a_killed_holder_leaves_nothing_stuck(capsys, tmp_path):
    """Item 8: another process holds the workdir: one line naming its pid, nothing touched. Once it is killed
    with SIGKILL, the lock is free again."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from asose_jax.cli import lock_workdir; lock_workdir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)", str(workdir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in workdir.iterdir())
        rc, err = run_main(capsys, [*SMOKE, "--workdir", str(workdir)])
        assert rc == 2
        assert_failure(err, f"in use by pid {holder.pid}")
        assert sorted(p.name for p in workdir.iterdir()) == before == [cli.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    fd = cli.lock_workdir(workdir)  # the kill -9 left the file, not the lock
    assert (workdir / cli.LOCK_FILE).read_text().strip() == str(os.getpid())
    cli.unlock_workdir(workdir, fd)
    assert not (workdir / cli.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_prints_one_line_and_more_ctrl_c_during_the_exit_print_nothing(xla_cache, genotype_file, tmp_path):
    """Item 6: Ctrl-C stops a final training at a step boundary with one line and exit 130; Ctrl-C pressed again
    while the process exits (Orbax and JAX tear down) neither kills it nor prints a traceback."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "asose_jax.final", "--genotype", str(genotype_file), *SMOKE,
                             "--workdir", str(workdir), "--set", "final.epochs=1000", "-q"],
                            cwd=ROOT, env=env(xla_cache), stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not ckpt_ids(workdir / "final_checkpoints") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    while not any(ln.startswith("interrupted:") for ln in lines) and proc.poll() is None:
        time.sleep(0.005)
    while proc.poll() is None:  # the exit: keep pressing
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert len(lines) <= 3 and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert lines[-1].startswith("interrupted: ")


# ---------------------------------------------------------------------------------------------- README and CLI slips

def test_show_config_prints_every_key_with_its_value_and_range(capsys):
    rc = search.main(["--preset", "smoke", "--set", "optim.lr=0.05", "--show-config"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    cfg = load_config_file(preset_path("smoke"))
    for key, value, allowed in describe(cfg, cli.registered_names()):
        line = next(ln for ln in out if ln.startswith(f"{key}="))
        assert "allowed: " in line and allowed in line, line
    assert any(ln.startswith("optim.lr=0.05 ") for ln in out)
    assert final.main(["--preset", "smoke", "--show-config"]) == 0  # no --genotype needed for that


def test_final_help_shows_final_keys(capsys):
    with pytest.raises(SystemExit) as info:
        final.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--set final.lr=" in out and "optim.lr" not in out


def test_quiet_draws_no_progress_bars():
    parse = search.build_parser().parse_args
    assert cli.progress(parse([])) and not cli.progress(parse(["-q"])) and not cli.progress(parse(["--no-progress"]))


def test_readme_says_what_the_code_does():
    readme = (ROOT / "README.md").read_text()
    smoke_doc = (ROOT / "configs" / "smoke.py").read_text()
    assert "3 short cycles" in readme and "2 short cycles" not in readme and "max_cycles=3" in smoke_doc
    assert ".venv/bin/python ../shared/data/cifar10/restore.py" in readme
    assert " python ../shared" not in readme.replace(".venv/bin/python ../shared", "")
    main_text = readme.split("## Resuming and failures")[0]
    assert "ASOSE_JAX_CACHE" in main_text and "~/.cache/asose_jax/xla" in main_text
    failures = readme.split("## Resuming and failures")[1].split("\n## ")[0]
    for needle in ("| 0 |", "| 2 |", "| 3 |", "| 130 |", "in use by pid", "data.verify", "stamp", "no space left"):
        assert needle in failures, needle


def test_nan_message_does_not_claim_a_checkpoint_that_does_not_exist():
    from asose_jax.cycle import Run
    def kept(next_id):
        return Run.kept_checkpoint(SimpleNamespace(ckpt=SimpleNamespace(next_id=lambda: next_id)))
    assert Run.kept_checkpoint(SimpleNamespace(ckpt=None)) == kept(0) == "no checkpoint was saved"
    assert kept(5) == "checkpoint 4, the last good one, is kept"


def test_search_logs_the_data_line_once_and_the_cpu_estimate_once(caplog, tmp_path):
    """Items 12 and 13, in one short search on the CPU."""
    with caplog.at_level(logging.INFO):
        assert search.main([*SMOKE, "--set", "cycle.max_cycles=1", "--workdir", str(tmp_path / "run")]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("data")]) == 1, messages
    estimates = [r for r in caplog.records if r.getMessage().startswith("no GPU or TPU found")]
    assert len(estimates) == 1 and estimates[0].levelno == logging.WARNING, messages
    assert "img/s" in estimates[0].getMessage() and "more" in estimates[0].getMessage()


# ---------------------------------------------------------------------------------------------- the CPU estimate

def test_first_steps_estimate_logs_once_from_the_second_sync(caplog):
    clock = iter([100.0, 110.0, 120.0])  # 10 s between the first two syncs: 50 steps -> 5 steps/s
    estimate = FirstStepsEstimate(steps_left=10_050, step_at_start=0, batch_size=128, clock=lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="asose_jax"):
        estimate(50)  # compile included: not measured
        assert not caplog.records
        estimate(100)
        estimate(150)
    (record,) = caplog.records
    assert "640 img/s" in record.getMessage() and "about 33 min more" in record.getMessage()
    assert "make smoke" in record.getMessage()


def test_first_steps_estimate_of_a_short_run_names_no_quick_path(caplog):
    clock = iter([0.0, 1.0])
    estimate = FirstStepsEstimate(steps_left=100, step_at_start=20, batch_size=64, clock=lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="asose_jax"):
        estimate(30)
        estimate(40)
    (record,) = caplog.records
    assert "about 8 s more" in record.getMessage() and "make smoke" not in record.getMessage()


def test_checkpointer_loops_drop_callbacks_that_arrive_after_they_closed(capfd, tmp_path):
    """Item 6: tensorstore completing a read after Orbax closed the restore's loop printed a traceback."""
    import asyncio

    import tensorstore as ts

    from asose_jax.checkpoint import Checkpointer
    Checkpointer(tmp_path / "ckpts")
    promise, future = ts.Promise.new()

    async def wait():
        await future
    loop = asyncio.new_event_loop()
    task = loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    promise.set_result(1)
    del task
    assert "Event loop is closed" not in capfd.readouterr().err
