"""Data-parallel search (issue 18) on simulated CPU devices: the same genotype on 1, 2 and 8 devices and on two
processes of two devices each, checkpoints that move between device counts, and one-line refusals.

The searches are subprocesses of ``python -m asose_jax.search`` with ``--xla_force_host_platform_device_count``
(this test process has one device), on the smoke preset shrunk to one cycle of a one-block network (``TINY``)
with growth (widen) and the one-program ``switch`` engine. They share one persistent XLA cache, and compile with
XLA's CPU optimisations off (every run alike, so the comparisons hold): a run compiles in seconds.

Tolerance: the runs differ only in the order of the float reductions (BatchNorm moments, the loss mean and the
gradient all-reduce are split over devices), about 1e-7 relative per step; over this run's 19 steps the logged
losses and gradient norms agree to better than ``REL_TOL`` (measured: under 3e-7), and the genotype and
every count and accuracy are equal. docs/scaling.md says why a longer run drifts further.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from asose_jax import parallel, search, steps
from asose_jax.config import Config, ParallelConfig, apply_overrides, config_hash, load_config_file, preset_path, validate
from asose_jax.errors import ConfigError, UsageError
from test_resume import checkpoint_ids

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "smoke", "--no-progress", "--set", "mixed_op.dispatch=switch", "--set", "model.num_layers=1",
        "--set", "model.init_channels=4", "--set", "model.ops=skip_connect,max_pool_3x3,conv_3x3",
        "--set", "data.synthetic_train=352", "--set", "data.arch_val_size=96", "--set", "data.synthetic_test=64",
        "--set", "data.batch_size=32", "--set", "cycle.max_cycles=1", "--set", "cycle.warmup_epochs=0",
        "--set", "growth.every=1", "--set", "growth.kinds=widen",
        "--set", "checkpoint.every_steps=4", "--set", "checkpoint.max_to_keep=100"]
# checkpoints of TINY: 0 weight step 4/8, 1 weight end, 2 arch end, 3 growth, 4 retrain step 4/8, 5 retrain end, 6 end
NO_GROWTH = ["--set", "growth.enabled=false"]  # the many-process test: half the programs to compile
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
REL_TOL = 1e-5
RUN_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------- helpers

def env(cache: Path, devices: int) -> dict:
    """A subprocess on ``devices`` simulated CPU devices, caching into the session's ``xla_cache`` (conftest)."""
    return {**os.environ, "ASOSE_JAX_CACHE": str(cache), "ASOSE_JAX_CACHE_MIN_COMPILE_S": "0", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"}


def command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asose_jax.search", *TINY, "--workdir", str(workdir), *extra]


def search_on(cache: Path, devices: int, workdir: Path, *extra: str, rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(cache, devices), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def searched(xla_cache, tmp_path_factory):
    """``searched(n, *extra)``: the workdir of TINY (plus ``extra``) searched on one process of ``n`` devices (run
    once per module)."""
    runs: dict[tuple, Path] = {}

    def run(devices: int, *extra: str) -> Path:
        if (devices, *extra) not in runs:
            workdir = tmp_path_factory.mktemp(f"devices{devices}") / "run"
            search_on(xla_cache, devices, workdir, *extra)
            runs[(devices, *extra)] = workdir
        return runs[(devices, *extra)]
    return run


def rows(workdir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def close(a, b) -> bool:
    """Floats within REL_TOL (relative; absolute for values under 1e-3, such as a growth's logit difference),
    lists element by element, anything else equal."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-3 * REL_TOL if max(abs(a), abs(b)) > 1e-3 else REL_TOL)
    return a == b


def assert_same_search(ref: Path, other: Path) -> None:
    """The same genotype (bytes), and the same metrics rows within REL_TOL."""
    assert (other / "genotype.json").read_bytes() == (ref / "genotype.json").read_bytes()
    ref_rows, other_rows = rows(ref), rows(other)
    assert len(ref_rows) == len(other_rows)
    for i, (a, b) in enumerate(zip(ref_rows, other_rows)):
        differ = sorted(k for k in a.keys() | b.keys() if not close(a.get(k), b.get(k)))
        assert not differ, f"metrics.jsonl row {i} differs in {differ}: {[(a.get(k), b.get(k)) for k in differ]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = search.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if not line.startswith("[Gloo]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("devices", [2, 8])
def test_a_search_on_more_devices_finds_the_one_device_genotype(searched, devices):
    assert_same_search(searched(1), searched(devices))


def test_two_processes_of_two_devices_find_the_genotype_of_one_process_of_four(xla_cache, searched, tmp_path):
    """Without growth, to compile half as much (a many-process growth ran by hand: docs/scaling.md)."""
    workdir, port = tmp_path / "two_processes", free_port()
    procs = [subprocess.Popen(command(workdir, *NO_GROWTH, "--set", f"parallel.coordinator=127.0.0.1:{port}",
                                      "--set", "parallel.num_processes=2", "--set", f"parallel.process_id={pid}",
                                      "--set", "parallel.timeout_s=120"),
                              cwd=ROOT, env=env(xla_cache, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for pid in (0, 1)]
    try:
        errs = [p.communicate(timeout=RUN_TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    assert "done in" in errs[0] and "done in" not in errs[1]  # process 0 logs the run, process 1 only warns
    assert_same_search(searched(4, *NO_GROWTH), workdir)


@pytest.mark.parametrize("saved_on, resumed_on", [(8, 1), (1, 8)])
def test_a_checkpoint_resumes_on_another_device_count(xla_cache, searched, tmp_path, saved_on, resumed_on):
    """The workdir of a run on ``saved_on`` devices, cut back to its first checkpoint (mid weight epoch), as a
    kill there leaves it; the same command on ``resumed_on`` devices finishes the uninterrupted run's search."""
    workdir = tmp_path / "run"
    shutil.copytree(searched(saved_on), workdir)
    for ckpt in checkpoint_ids(workdir)[1:]:
        shutil.rmtree(workdir / "checkpoints" / str(ckpt))
    for name in ("genotype.json", "result.json"):
        (workdir / name).unlink()
    proc = search_on(xla_cache, resumed_on, workdir)
    assert "resumed from checkpoint 0 at step 4" in proc.stderr
    assert_same_search(searched(resumed_on), workdir)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("devices, extra, needles", [
    (8, ["--set", "data.batch_size=36"], ["data.batch_size=36", "a multiple of 8"]),
    (2, ["--set", "mixed_op.dispatch=host"], ["mixed_op.dispatch=host runs on one device", "parallel.devices=1"]),
])
def test_a_config_that_cannot_split_over_the_devices_is_one_line_before_any_compile(xla_cache, tmp_path, devices,
                                                                                   extra, needles):
    proc = search_on(xla_cache, devices, tmp_path / "run", "-q", *extra, rc=2)
    assert_one_line(proc.stderr, *needles)
    assert not (tmp_path / "run").exists()


def test_an_unreachable_coordinator_is_one_line_after_the_timeout(capsys, tmp_path):
    rc, err = run_main(capsys, [*TINY, "--workdir", str(tmp_path / "run"), "--set",
                                f"parallel.coordinator=127.0.0.1:{free_port()}", "--set", "parallel.num_processes=2",
                                "--set", "parallel.process_id=1", "--set", "parallel.timeout_s=1"])
    assert rc == 2
    assert_one_line(err, "unreachable for 1 s", "start process 0 first")


@pytest.mark.parametrize("sets, needle", [
    (["parallel.num_processes=2", "parallel.process_id=2"], "parallel.process_id=2 is out of range: allowed 0..1"),
    (["parallel.num_processes=2", "parallel.process_id=-1"], "parallel.process_id=-1 is out of range: allowed 0..1"),
    (["parallel.process_id=0"], "parallel.num_processes=0 is out of range"),
])
def test_inconsistent_process_ids_are_one_line(capsys, tmp_path, sets, needle):
    argv = [*TINY, "--workdir", str(tmp_path / "run"), "--set", "parallel.coordinator=127.0.0.1:1234"]
    rc, err = run_main(capsys, argv + [a for s in sets for a in ("--set", s)])
    assert rc == 2
    assert_one_line(err, needle)


def test_processes_without_a_coordinator_are_one_line(capsys, tmp_path):
    rc, err = run_main(capsys, [*TINY, "--workdir", str(tmp_path / "run"), "--set", "parallel.num_processes=2"])
    assert rc == 2
    assert_one_line(err, "need the coordinator")


# ---------------------------------------------------------------------------------------------- units

def test_the_cluster_comes_from_the_config_then_the_environment():
    env_vars = {parallel.ENV_COORDINATOR: "10.0.0.1:9000", parallel.ENV_NUM_PROCESSES: "4",
                parallel.ENV_PROCESS_ID: "3"}
    assert parallel.explicit_cluster(ParallelConfig(), {}) is None
    assert parallel.explicit_cluster(ParallelConfig(), env_vars) == parallel.Cluster("10.0.0.1:9000", 4, 3)
    cfg = ParallelConfig(coordinator="h:1", num_processes=2, process_id=0)
    assert parallel.explicit_cluster(cfg, env_vars) == parallel.Cluster("h:1", 2, 0)
    with pytest.raises(ConfigError, match="ASOSE_JAX_NUM_PROCESSES='x': expected an integer"):
        parallel.explicit_cluster(ParallelConfig(), {**env_vars, parallel.ENV_NUM_PROCESSES: "x"})
    with pytest.raises(ConfigError, match="parallel.coordinator='nohost' is out of range"):
        parallel.explicit_cluster(ParallelConfig(coordinator="nohost", num_processes=1, process_id=0), {})


def test_slurm_and_open_mpi_jobs_of_several_tasks_are_detected():
    assert not parallel.detected_cluster({})
    assert not parallel.detected_cluster({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert parallel.detected_cluster({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"})
    assert not parallel.detected_cluster({"SLURM_NTASKS": "4"})  # the batch script itself, not an srun task
    assert parallel.detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"})


def test_one_process_is_not_distributed():
    assert parallel.initialize_distributed(ParallelConfig(), {}) == 0


def test_the_coordinator_wait_gives_up_in_one_line():
    with pytest.raises(UsageError, match=r"coordinator 127.0.0.1:\d+ unreachable for 0.2 s"):
        parallel.wait_for_coordinator(f"127.0.0.1:{free_port()}", 0.2)


def test_the_mesh_of_one_device_and_its_shardings():
    placement = parallel.make_placement(ParallelConfig())
    assert placement.size == len(jax.devices()) == 1 and placement.mesh.axis_names == ("data",)
    assert placement.batch.spec == jax.sharding.PartitionSpec("data") and placement.replicated.spec == jax.sharding.PartitionSpec()
    x = parallel.place_dataset(np.arange(12, dtype=np.int32).reshape(6, 2), placement)
    assert x.sharding.is_fully_replicated and np.array_equal(np.asarray(x), np.arange(12).reshape(6, 2))
    with pytest.raises(ConfigError, match=r"parallel.devices='2' is out of range: allowed auto \| 1..1"):
        parallel.make_placement(ParallelConfig(devices="2"))


def test_a_batch_splits_over_a_mesh_of_eight(xla_cache):
    """Mesh sizes and the batch's shards, in a process of 8 simulated devices; ``spread`` splits a routed group
    (a slice of the replicated batch) under the step's mesh context, and leaves it whole without one."""
    code = ("import jax, numpy as np; from asose_jax import parallel; from asose_jax.config import ParallelConfig\n"
            "for n in ('auto', '2', '8'):\n"
            "    p = parallel.make_placement(ParallelConfig(devices=n))\n"
            "    x = jax.jit(lambda a: parallel.constrain(a * 1, p.batch))(parallel.place_dataset(np.zeros((16, 3)), p))\n"
            "    print(p.size, x.sharding.shard_shape(x.shape), len(x.addressable_shards))\n"
            "def group(a, batch):\n"
            "    with parallel.mesh_context(batch):\n"
            "        return parallel.spread(a[2:10] * 1)\n"
            "for batch in (p.batch, None):\n"
            "    g = jax.jit(group, static_argnums=1)(parallel.place_dataset(np.zeros((16, 3)), p), batch)\n"
            "    print(g.sharding.shard_shape(g.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(xla_cache, 8), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == ["8 (2, 3) 8", "2 (8, 3) 2", "8 (2, 3) 8", "(1, 3)", "(8, 3)"]


def test_check_devices_refuses_an_uneven_batch_and_the_host_engine():
    cfg = load_config_file(preset_path("smoke"))  # batch 64, single-path on the host engine
    steps.check_devices(cfg, 1)
    with pytest.raises(ConfigError, match="mixed_op.dispatch=host runs on one device, and the mesh has 2"):
        steps.check_devices(cfg, 2)
    switch = apply_overrides(cfg, ["mixed_op.dispatch=switch"])
    steps.check_devices(switch, 8)
    with pytest.raises(ConfigError, match="data.batch_size=64 is out of range: allowed a multiple of 3"):
        steps.check_devices(switch, 3)
    routed = apply_overrides(cfg, ["mixed_op.mode=routed", "mixed_op.arch_mode=dense"])
    steps.check_devices(routed, 4)


def test_evaluation_batches_are_a_multiple_of_the_device_count():
    x, y = np.zeros((10, 2), np.uint8), np.arange(10, dtype=np.int32)
    shapes = [(int(xb.shape[0]), int(mask.sum())) for xb, _, mask in steps.padded_batches(x, y, 4, multiple=3)]
    assert shapes == [(6, 6), (6, 4)]
    assert [int(m.sum()) for _, _, m in steps.padded_batches(x, y, 1000, multiple=8)] == [10]


@pytest.mark.parametrize("value, ok", [("auto", True), ("1", True), ("16", True), (8, True), ("0", False),
                                       ("-2", False), ("x", False)])
def test_parallel_devices_is_auto_or_a_count(value, ok):
    cfg = Config(parallel=ParallelConfig(devices=value))
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="parallel.devices"):
            validate(cfg)


def test_the_parallel_section_leaves_the_config_hash_alone():
    cfg = Config()
    assert config_hash(cfg) == config_hash(apply_overrides(cfg, ["parallel.devices=8", "parallel.axis=batch"]))
