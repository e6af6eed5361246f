"""Bad input ends with ONE line ``error: ...`` on stderr, exit code 2, no traceback (unless ``--debug``),
and nothing half-written or lost; a diverging run exits 3 naming the step and keeps its last good
checkpoint (issue [C], item 4).

Most cases call ``asose_jax.search.main`` in-process (they fail before any compute); a few run the real
command in a subprocess to check what a user sees.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from asose_jax import search
from asose_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--no-progress"]


def run_main(capsys, argv, main=search.main) -> tuple[int, str]:
    """(exit code, stderr) of an in-process CLI call; usage errors exit through SystemExit."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def cli(argv, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "asose_jax.search", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("argv, needles", [
    (["--set", "no_such_key=1"], ["unknown config key 'no_such_key'"]),
    (["--set", "optim.no_such_key=1"], ["unknown config key 'optim.no_such_key'"]),
    (["--set", "optim.lr"], ["key=value"]),
    (["--set", "optim.lr=abc"], ["optim.lr", "expected a number", "'abc'"]),
    (["--set", "cycle.weight_epochs=1.5"], ["cycle.weight_epochs", "expected an integer"]),
    (["--set", "growth.enabled=maybe"], ["growth.enabled", "boolean"]),
    (["--set", "optim.lr=-0.1"], ["optim.lr=-0.1", "out of range"]),
    (["--set", "optim.lr=nan"], ["optim.lr", "out of range"]),
    (["--set", "arch.lr=0"], ["arch.lr", "out of range"]),
    (["--set", "mixed_op.k=6"], ["mixed_op.k=6", "the number of ops"]),  # the smoke op set has 5 ops
    (["--set", "mixed_op.k=0"], ["mixed_op.k=0"]),
    (["--set", "mixed_op.weight_threshold=1.0"], ["mixed_op.weight_threshold=1.0", "[0, 1)"]),
    (["--set", "mixed_op.weight_threshold=-0.1"], ["mixed_op.weight_threshold=-0.1", "[0, 1)"]),
    (["--set", "cycle.weight_epochs=0"], ["cycle.weight_epochs=0", "1..10000"]),
    (["--set", "cycle.max_cycles=0"], ["cycle.max_cycles=0"]),
    (["--set", "final.epochs=0"], ["final.epochs=0"]),
    (["--set", "mixed_op.mode=sometimes"], ["mixed_op.mode", "dense"]),
    (["--set", "model.ops=sep_conv_3x3,no_such_op"], ["model.ops", "no_such_op"]),
    (["--set", "growth.deepen_skip_prob=1.5"], ["growth.deepen_skip_prob=1.5", "out of range", "(0, 1)"]),
])
def test_bad_config_value(capsys, tmp_path, argv, needles):
    workdir = tmp_path / "run"
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(workdir), *argv])
    assert rc == 2
    assert_one_line_error(err, *needles)
    assert not workdir.exists()  # rejected before anything is created


def test_missing_config_file(capsys, tmp_path):
    rc, err = run_main(capsys, ["--config", "/nonexistent.py", "--workdir", str(tmp_path / "run")])
    assert rc == 2
    assert_one_line_error(err, "config file not found", "/nonexistent.py")


def test_broken_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    rc, err = run_main(capsys, ["--config", str(bad), "--workdir", str(tmp_path / "run")])
    assert rc == 2
    assert_one_line_error(err, str(bad), "SyntaxError")


def test_unknown_preset_and_usage_errors_are_one_line(capsys, tmp_path):
    rc, err = run_main(capsys, ["--preset", "no_such_preset", "--workdir", str(tmp_path / "run")])
    assert rc == 2
    assert_one_line_error(err, "unknown preset 'no_such_preset'", "smoke")
    rc, err = run_main(capsys, ["--preset", "smoke", "--config", "x.py"])  # argparse: mutually exclusive
    assert rc == 2
    assert_one_line_error(err, "--config", "--help")
    rc, err = run_main(capsys, ["--preset", "smoke", "--no-such-flag"])
    assert rc == 2
    assert_one_line_error(err, "--no-such-flag")


def test_bad_input_leaves_an_existing_workdir_untouched(capsys, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"sentinel": true}\n')
    (workdir / "metrics.jsonl").write_text('{"event": "epoch"}\n')
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(workdir), "--set", "no_such_key=1"])
    assert rc == 2
    assert_one_line_error(err)
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(ConfigError, match="no_such_key"):
        search.main([*SMOKE, "--workdir", str(tmp_path / "run"), "--set", "no_such_key=1", "--debug"])


def test_real_command_prints_one_line_and_no_traceback(tmp_path):
    proc = cli([*SMOKE, "--workdir", str(tmp_path / "run"), "--set", "no_such_key=1"])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "no_such_key")
    assert proc.stdout == ""
    proc = cli([*SMOKE, "--workdir", str(tmp_path / "run"), "--set", "no_such_key=1", "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ---------------------------------------------------------------------------------------------- workdir

def test_unwritable_workdir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(blocker / "run")])
    assert rc == 2
    assert_one_line_error(err, "not writable", str(blocker / "run"))
    assert blocker.read_text() == "not a directory\n"


# ---------------------------------------------------------------------------------------------- data

def test_missing_data_dir(capsys, tmp_path):
    workdir = tmp_path / "run"
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(workdir), "--set", "data.source=dir",
                                "--set", "data.dir=/nonexistent"])
    assert rc == 2
    assert_one_line_error(err, "data directory not found", "/nonexistent")
    assert not workdir.exists()  # the workdir this call made is removed again: nothing half-written


def test_data_source_dir_without_a_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("ASOSE_DATA_DIR", raising=False)
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(tmp_path / "run"), "--set", "data.source=dir"])
    assert rc == 2
    assert_one_line_error(err, "data.source=dir")


def _write_batch(path: Path, n: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
    path.write_bytes(pickle.dumps(batch))


def _fake_cifar(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        _write_batch(d / name, seed=i)
    return d


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "corrupted CIFAR-10 batch file"),
    ("garbage", "corrupted CIFAR-10 batch file"),
    ("wrong_shape", "bad CIFAR-10 batch file"),
    ("missing", "missing CIFAR-10 batch file"),
])
def test_damaged_cifar_batch_file(capsys, tmp_path, damage, needle):
    d = _fake_cifar(tmp_path / "data")
    victim = d / "data_batch_3"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "garbage":
        victim.write_bytes(b"this is not a pickle\x00\xff" * 10)
    elif damage == "wrong_shape":
        victim.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}))
    else:
        victim.unlink()
    workdir = tmp_path / "run"
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(workdir), "--set", "data.source=dir",
                                "--data-dir", str(d)])
    assert rc == 2
    assert_one_line_error(err, needle, "data_batch_3")
    assert not workdir.exists()


def test_download_md5_mismatch(capsys, tmp_path, monkeypatch):
    import asose_jax.data as data_mod
    src = _fake_cifar(tmp_path / "src")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    cache = tmp_path / "cache"
    monkeypatch.setattr(data_mod, "CIFAR10_URL", tarball.as_uri())
    monkeypatch.setattr(data_mod, "CIFAR10_MD5", "0" * 32)
    monkeypatch.setenv("ASOSE_CACHE_DIR", str(cache))
    workdir = tmp_path / "run"
    rc, err = run_main(capsys, [*SMOKE, "--workdir", str(workdir), "--set", "data.source=download"])
    assert rc == 2
    assert_one_line_error(err, "md5 mismatch", "0" * 32)
    assert sorted(p.name for p in cache.iterdir()) == []  # partial download deleted, nothing extracted
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------- genotype

def _genotype(ops) -> dict:
    return {"skeleton": "resnet", "ops": ops, "op_set": ["none", "skip_connect", "sep_conv_3x3"],
            "blocks": [{"c_in": 8, "c_out": 8, "stride": 1}, {"c_in": 8, "c_out": 16, "stride": 2}],
            "stem_channels": 8, "num_classes": 10}


@pytest.mark.parametrize("content, needle", [
    (json.dumps(_genotype(["sep_conv_3x3", "no_such_op"])), "unknown op 'no_such_op'"),
    (json.dumps(_genotype([])), "no 'ops' list"),
    ("{not json", "not valid JSON"),
])
def test_genotype_that_does_not_match_the_op_set(tmp_path, content, needle):
    from asose_jax.errors import GenotypeError
    from asose_jax.genotype import load_genotype
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GenotypeError) as info:
        load_genotype(path)
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


def test_final_cli_rejects_a_bad_genotype(capsys, tmp_path):
    from asose_jax import final
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_genotype(["sep_conv_3x3", "no_such_op"])))
    workdir = tmp_path / "final"
    rc, err = run_main(capsys, [*SMOKE, "--genotype", str(path), "--workdir", str(workdir)], main=final.main)
    assert rc == 2
    assert_one_line_error(err, "no_such_op")
    assert not workdir.exists()
    rc, err = run_main(capsys, [*SMOKE, "--genotype", str(tmp_path / "missing.json")], main=final.main)
    assert rc == 2
    assert_one_line_error(err, "not found")


# ---------------------------------------------------------------------------------------------- divergence

DIVERGE = ["--set", "optim.lr=10", "--set", "optim.clip_norm=1000", "--set", "optim.momentum=0.99",
           "--set", "optim.weight_decay=1"]  # in range, and NaN/Inf within the warm-up epoch of the smoke preset


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(xla_cache, tmp_path):
    """With a save after every step, the run exits 3 naming the step and the checkpoint it keeps, writes no
    genotype, and that checkpoint (the newest) is finite."""
    import orbax.checkpoint as ocp
    workdir = tmp_path / "run"
    proc = cli([*SMOKE, "--workdir", str(workdir), *DIVERGE, "--set", "checkpoint.every_steps=1"],
               env_extra={"ASOSE_JAX_CACHE": str(xla_cache), "ASOSE_JAX_CACHE_MIN_COMPILE_S": "0"})
    assert proc.returncode == 3, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-4000:]
    match = re.search(r"NaN/Inf .*step (\d+).*: checkpoint (\d+), the last good one, is kept", errors[0])
    assert match, errors[0]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "genotype.json").exists()
    ckpts = workdir / "checkpoints"
    ids = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert ids[-1] == int(match.group(2))  # nothing after the divergence
    assert not [p for p in ckpts.iterdir() if not p.name.isdigit()]  # no half-written save either
    manager = ocp.CheckpointManager(ckpts.resolve())
    restored = manager.restore(ids[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                meta=ocp.args.JsonRestore()))
    assert restored["meta"]["task_index"] == 0 and restored["meta"]["step_in_epoch"] < int(match.group(1))
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored["state"])]
    assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
    manager.close()


def test_nan_before_the_first_checkpoint_says_so_and_leaves_no_workdir(xla_cache, tmp_path):
    workdir = tmp_path / "run"
    proc = cli([*SMOKE, "--workdir", str(workdir), *DIVERGE],
               env_extra={"ASOSE_JAX_CACHE": str(xla_cache), "ASOSE_JAX_CACHE_MIN_COMPILE_S": "0"})
    assert proc.returncode == 3, proc.stderr[-4000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "NaN/Inf" in error and "no checkpoint was saved" in error, error
    assert "last good" not in error and "Traceback" not in proc.stderr
    assert not workdir.exists()  # the corrected command starts clean
