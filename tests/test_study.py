"""Tests for asose_jax.study: the plan and the baseline genotypes, bad input (exit 2, one line), and a whole
study on synthetic data (``configs/study_smoke.py``, seeds 0 and 1, baselines random:1 and uniform:conv_3x3)
end to end, then once more killed with SIGKILL in the middle of a final training and re-run: its study.json
equals the uninterrupted one's, timing fields aside; and a sweep of the cost weight (two lambdas, one seed).

The end-to-end runs are subprocesses sharing one persistent XLA cache, so the second one compiles little."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from asose_jax import study
from asose_jax.config import ArchConfig
from asose_jax.errors import UsageError
from asose_jax.ops import OP_REGISTRY

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["--config", "configs/study_smoke.py", "--seeds", "0,1", "--baselines", "random:1,uniform:conv_3x3",
         "--no-progress"]
RUN_TIMEOUT_S = 300
NAMES = ["searched_s0", "searched_s1", "random_d0_s0", "uniform_conv_3x3_s0", "uniform_conv_3x3_s1"]
SEARCHED = {"skeleton": "resnet", "stem_channels": 4, "num_classes": 10, "op_set": ["skip_connect", "sep_conv_3x3"],
            "ops": ["skip_connect", ["sep_conv_3x3", "skip_connect"], "sep_conv_3x3"],
            "blocks": [{"c_in": 4, "c_out": 8, "stride": 2}, {"c_in": 8, "c_out": 8, "stride": 1},
                       {"c_in": 8, "c_out": 16, "stride": 2}]}


# ---------------------------------------------------------------------------------------------- the plan

def test_plan_lists_searched_networks_then_baselines_in_order():
    nets = study.plan_networks((3, 5), study.parse_baselines("uniform:conv_3x3,random:3"))
    assert [n.name for n in nets] == ["searched_s3", "searched_s5", "uniform_conv_3x3_s3", "uniform_conv_3x3_s5",
                                      "random_d0_s3", "random_d1_s5", "random_d2_s3"]


@pytest.mark.parametrize("text, message", [
    ("random:0", "unknown baseline 'random:0'"), ("best:2", "unknown baseline 'best:2'"),
    ("uniform:sep_conv_9x9", "unknown op 'sep_conv_9x9'"), ("random:1,random:2", "'random:2' is given twice"),
    ("uniform:conv_3x3,uniform:conv_3x3", "given twice")])
def test_bad_baselines_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        study.parse_baselines(text)


@pytest.mark.parametrize("text, message", [("", "empty"), (" , ", "empty"), ("0,a", "non-negative integers"),
                                           ("1,1", "repeats")])
def test_bad_seeds_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        study.parse_seeds(text)


def test_uniform_baseline_keeps_the_searched_blocks_and_paths():
    g = study.network_genotype(study.Network("uniform", 0, op="conv_3x3"), SEARCHED, None)
    assert g["ops"] == ["conv_3x3", ["conv_3x3", "conv_3x3"], "conv_3x3"]
    assert g["blocks"] == SEARCHED["blocks"] and g["stem_channels"] == 4


def test_random_ops_draw_what_a_genotype_may_hold_and_respect_the_cap():
    ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
    drawn = study.random_ops(ops, ArchConfig(), 400, draw=0)
    assert set(drawn) == set(ops) - {"none"}
    assert study.random_ops(ops, ArchConfig(), 400, draw=0) == drawn
    assert study.random_ops(ops, ArchConfig(), 400, draw=1) != drawn
    capped = study.random_ops(ops, replace(ArchConfig(), max_parameter_free=2), 400, draw=0)
    assert sum(OP_REGISTRY[op].parameter_free for op in capped) == 2
    assert set(study.random_ops(ops, replace(ArchConfig(), max_parameter_free=0), 50, draw=3)) == {
        "sep_conv_3x3", "dil_conv_3x3"}


def test_a_cost_weight_sweep_plans_the_searched_networks_once_per_lambda():
    overrides, weights = study.parse_cost_weights(["final.lr=0.2", "arch.cost_weight=0, 0.1,0.3"])
    assert overrides == ["final.lr=0.2"] and weights == (0.0, 0.1, 0.3)
    assert study.parse_cost_weights(["arch.cost_weight=0.1"]) == (["arch.cost_weight=0.1"], None)  # one value
    nets = study.plan_networks((0, 1), study.parse_baselines("uniform:conv_3x3"), (0.0, 0.1))
    assert [n.name for n in nets] == ["searched_l0_s0", "searched_l0_s1", "searched_l0.1_s0", "searched_l0.1_s1",
                                      "uniform_conv_3x3_s0", "uniform_conv_3x3_s1"]
    assert [n.group for n in nets[1:3]] == ["searched λ=0", "searched λ=0.1"]
    assert study.search_dir_name(0.1, 1) == "search_l0.1_s1" and study.search_dir_name(None, 1) == "search_s1"


@pytest.mark.parametrize("text, message", [("0,a", "expected numbers"), ("0,0", "distinct"), (",", "distinct")])
def test_bad_cost_weight_sweeps_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        study.parse_cost_weights([f"arch.cost_weight={text}"])


def test_difference_and_its_standard_error():
    diff, se = study.difference([2.0, 4.0], [1.0, 2.0, 3.0])
    assert diff == pytest.approx(1.0)
    assert se == pytest.approx((2.0 / 2 + 1.0 / 3) ** 0.5)
    assert study.difference([2.0], [1.0, 2.0]) == (pytest.approx(0.5), None)


# ---------------------------------------------------------------------------------------------- bad input

def _no_final_config(tmp_path: Path) -> Path:
    path = tmp_path / "no_final.py"
    path.write_text("from dataclasses import replace\nfrom asose_jax.config import Config\n\n\n"
                    "def get_config():\n    return replace(Config(), final=None)\n")
    return path


@pytest.mark.parametrize("args, message", [
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", "0", "--baselines", "random:3,best:1"], "unknown baseline 'best:1'"),
    (["--seeds", "0", "--baselines", "uniform:nope"], "unknown op 'nope'"),
    (["--seeds", "0", "--set", "model.ops=sep_conv_3x3,nope"], "model.ops"),
    (["--seeds", "0", "--set", "arch.cost_weight=0,x"], "expected numbers"),
    (["--seeds", "0", "--set", "arch.cost_weight=0.1,-1"], "arch.cost_weight=-1.0 is out of range"),
    (["--seeds", "0", "--set", "final.val_size=300"], "final.val_size=300 is out of range"),
    (["--seeds", "0", "--config", "NO_FINAL"], "has no final section")])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    args = [str(_no_final_config(tmp_path)) if a == "NO_FINAL" else a for a in args]
    if "--config" not in args:
        args += ["--config", "configs/study_smoke.py"]
    rc = study.main([*args, "--workdir", str(tmp_path / "study"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "study").exists()


def test_show_config_prints_every_key_and_exits_0_without_a_workdir(tmp_path, capsys):
    rc = study.main(["--seeds", "0", "--config", "configs/study_smoke.py", "--show-config",
                     "--workdir", str(tmp_path / "study")])
    out = capsys.readouterr().out
    assert rc == 0 and "final.val_size" in out and "arch.cost_weight" in out
    assert not (tmp_path / "study").exists()


def test_a_study_workdir_in_use_is_refused_in_one_line(tmp_path, capsys):
    from asose_jax import cli
    workdir = tmp_path / "study"
    workdir.mkdir()
    fd = cli.lock_workdir(workdir)
    try:
        rc = study.main(["--seeds", "0", "--config", "configs/study_smoke.py", "--workdir", str(workdir), "-q"])
    finally:
        cli.unlock_workdir(workdir, fd)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "in use by pid" in err and "\n" not in err, err


# ---------------------------------------------------------------------------------------------- end to end

def _env(cache: Path) -> dict:
    return {**os.environ, "ASOSE_JAX_CACHE": str(cache), "ASOSE_JAX_CACHE_MIN_COMPILE_S": "0", "JAX_PLATFORMS": "cpu"}


def _study_cmd(workdir: Path, args: list[str] = STUDY) -> list[str]:
    return [sys.executable, "-m", "asose_jax.study", *args, "--workdir", str(workdir)]


def run_study(cache: Path, workdir: Path, args: list[str] = STUDY) -> subprocess.CompletedProcess:
    proc = subprocess.run(_study_cmd(workdir, args), cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def kill_at(cache: Path, workdir: Path, marker: str, after: str) -> str:
    """Start the study and SIGKILL it at the first log line containing ``after`` that follows one containing
    ``marker``; returns its log. A watchdog kills a run that hangs."""
    proc = subprocess.Popen(_study_cmd(workdir), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(RUN_TIMEOUT_S, proc.kill)
    watchdog.start()
    log, seen_marker = [], False
    try:
        for line in proc.stderr:
            log.append(line)
            seen_marker = seen_marker or marker in line
            if seen_marker and after in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(log)[-4000:]
    return "".join(log)


def _untimed(doc: dict) -> dict:
    """study.json without its timing fields and the commit (other work may commit between two runs)."""
    drop = ("search_wall_s", "final_wall_s", "img_per_s", "commit")
    return {**doc, "records": [{k: v for k, v in r.items() if k not in drop} for r in doc["records"]]}


@pytest.fixture(scope="module")
def reference(xla_cache, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("study") / "reference"
    run_study(xla_cache, workdir)
    return workdir


def test_study_trains_every_network_and_reports(reference):
    doc = json.loads((reference / "study.json").read_text())
    records = {r["name"]: r for r in doc["records"]}
    assert list(records) == NAMES and doc["seeds"] == [0, 1]
    for r in records.values():
        assert 0 <= r["test_acc"] <= 100 and r["params"] > 0 and r["flops_per_image"] > 0 and r["img_per_s"] > 0
        assert 0 <= r["val_acc"] <= 100 and r["val_size"] == 64 and r["epochs"] == 2 and r["device"].startswith("cpu")
        assert r["cost_weight"] == (0.0 if r["kind"] == "searched" else None)
        assert (r["search_wall_s"] is not None) == (r["kind"] == "searched")
    searched = json.loads((reference / "search_s0" / "genotype.json").read_text())
    assert records["searched_s0"]["genotype"] == searched
    assert records["random_d0_s0"]["genotype"]["blocks"] == searched["blocks"]
    assert set(records["uniform_conv_3x3_s1"]["genotype"]["ops"]) == {"conv_3x3"}
    md = (reference / "study.md").read_text()
    for heading in ("## Per kind", "## Against `searched`", "## Networks", "![val accuracy"):
        assert heading in md
    assert "| uniform:conv_3x3 | 2 |" in md and (reference / "study.png").stat().st_size > 10_000


def test_killed_study_resumes_to_the_same_study_json(xla_cache, reference, tmp_path):
    workdir = tmp_path / "killed"
    kill_at(xla_cache, workdir, "network 3/5, random_d0_s0", "final epoch 1/2")
    assert not (workdir / "nets" / "random_d0_s0" / "record.json").exists()
    resumed = run_study(xla_cache, workdir).stderr
    assert "network 1/5" not in resumed and "network 2/5" not in resumed and "study: search of seed" not in resumed
    assert "network 3/5, random_d0_s0" in resumed
    expected = _untimed(json.loads((reference / "study.json").read_text()))
    assert _untimed(json.loads((workdir / "study.json").read_text())) == expected


def test_a_changed_config_is_refused_in_the_same_workdir(reference, capsys):
    rc = study.main([*STUDY, "--set", "final.lr=0.2", "--workdir", str(reference), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds a run with a different config" in err and "\n" not in err


def test_cost_weight_sweep_runs_the_searched_networks_once_per_lambda(xla_cache, tmp_path):
    workdir = tmp_path / "sweep"
    run_study(xla_cache, workdir, ["--config", "configs/study_smoke.py", "--seeds", "0", "--baselines",
                                   "uniform:conv_3x3", "--set", "arch.cost_weight=0,1", "--no-progress"])
    doc = json.loads((workdir / "study.json").read_text())
    assert doc["cost_weights"] == [0.0, 1.0]
    records = {r["name"]: r for r in doc["records"]}
    assert list(records) == ["searched_l0_s0", "searched_l1_s0", "uniform_conv_3x3_s0"]
    assert [r["cost_weight"] for r in records.values()] == [0.0, 1.0, None]
    for w in (0, 1):
        search_cfg = json.loads((workdir / f"search_l{w}_s0" / "config.json").read_text())["config"]
        assert search_cfg["arch"]["cost_weight"] == w
        assert records[f"searched_l{w}_s0"]["genotype"] == json.loads(
            (workdir / f"search_l{w}_s0" / "genotype.json").read_text())
    assert records["uniform_conv_3x3_s0"]["genotype"]["blocks"] == records["searched_l0_s0"]["genotype"]["blocks"]
    md = (workdir / "study.md").read_text()
    assert "## Against `searched λ=0`" in md and "| searched λ=1 | " in md and "| uniform:conv_3x3 | " in md
    assert (workdir / "study.png").stat().st_size > 10_000
