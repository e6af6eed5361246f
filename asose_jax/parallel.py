"""The device mesh of a data-parallel search, and what is placed on it.

:func:`initialize_distributed` joins the processes of a many-host run into one JAX runtime (``jax.distributed``);
:func:`make_placement` builds the 1-D ``Mesh`` over ``parallel.devices`` with the axis ``parallel.axis``. The
state and the device-resident dataset are replicated on every device of the mesh (``Placement.replicated``); the
batch that a step gathers is split over the axis (``Placement.batch``). The jitted steps stay functions of these
global arrays and XLA partitions them (GSPMD): BatchNorm statistics, losses and the routed mode's batch
permutations are over the global batch, and the gradient all-reduce is XLA's own (NCCL on GPUs, gloo between CPU
processes). Results depend on the device count only through the order of float reductions.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asose_jax.config import MAX_PROCESSES, ParallelConfig, check
from asose_jax.errors import ConfigError, UsageError

logger = logging.getLogger(__name__)

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = ("ASOSE_JAX_COORDINATOR", "ASOSE_JAX_NUM_PROCESSES",
                                                      "ASOSE_JAX_PROCESS_ID")
POLL_S = 0.25  # between attempts to reach the coordinator


# ---------------------------------------------------------------------------------------------- processes

@dataclass(frozen=True)
class Cluster:
    """The processes of a run named explicitly (config or environment), not detected."""
    coordinator: str  # host:port of process 0
    num_processes: int
    process_id: int


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None


def explicit_cluster(cfg: ParallelConfig, env: Mapping[str, str] = os.environ) -> Cluster | None:
    """The processes that ``parallel.coordinator`` / ``num_processes`` / ``process_id`` name, each falling back
    to its environment variable (``ASOSE_JAX_COORDINATOR``, ...); None when no coordinator is named.
    ConfigError when they do not fit together (e.g. a process id past the process count)."""
    coordinator = cfg.coordinator or env.get(ENV_COORDINATOR, "").strip()
    num = cfg.num_processes or _env_int(env, ENV_NUM_PROCESSES, 0)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int(env, ENV_PROCESS_ID, -1)
    if not coordinator:
        if num > 1 or pid > 0:
            raise ConfigError(f"parallel.num_processes={num} / parallel.process_id={pid} need the coordinator: "
                              f"--set parallel.coordinator=HOST:PORT (or {ENV_COORDINATOR})")
        return None
    host, _, port = coordinator.rpartition(":")
    check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "parallel.coordinator",
          "HOST:PORT with a port in 1..65535", coordinator)
    check(1 <= num <= MAX_PROCESSES, "parallel.num_processes",
          f"1..{MAX_PROCESSES} with a coordinator (or {ENV_NUM_PROCESSES})", num)
    check(0 <= pid < num, "parallel.process_id", f"0..{num - 1}, one per process (parallel.num_processes={num}; "
          f"or {ENV_PROCESS_ID})", pid)
    return Cluster(coordinator, num, pid)


def detected_cluster(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a Slurm step (``srun``) or an Open MPI job of more than one task; ``jax.distributed`` then
    reads the coordinator, the process count and this process's id from the cluster's own variables."""
    slurm = "SLURM_PROCID" in env and _env_int(env, "SLURM_NTASKS", 1) > 1
    return slurm or _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once ``address`` accepts a TCP connection; UsageError (one line) after ``timeout_s``.

    Checked here because ``jax.distributed`` aborts the whole process, with a stack dump, when it cannot reach
    its coordinator."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(deadline - time.monotonic(), 0.1)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UsageError(f"coordinator {address} unreachable for {timeout_s:g} s ({e.strerror or e}): start "
                                 f"process 0 first, check parallel.coordinator, or raise parallel.timeout_s") from None
        time.sleep(POLL_S)


def initialize_distributed(cfg: ParallelConfig, env: Mapping[str, str] = os.environ) -> int:
    """Join the run's processes into one JAX runtime when there are several; returns this process's index.

    Many processes come from ``parallel.coordinator`` (with ``num_processes`` and ``process_id``), the matching
    ``ASOSE_JAX_*`` environment variables, or a detected Slurm / Open MPI job. Must run before anything touches a
    JAX device. Between CPU processes the collectives go through gloo (TCP). A process other than 0 first waits
    up to ``parallel.timeout_s`` for the coordinator to listen (one-line error after that); process 0 then waits
    as long for the others, and JAX ends it with its own message if they never come."""
    cluster = explicit_cluster(cfg, env)
    if cluster is None and not detected_cluster(env):
        return 0
    if cluster is not None and cluster.process_id > 0:
        wait_for_coordinator(cluster.coordinator, cfg.timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster is None:
        jax.distributed.initialize(initialization_timeout=cfg.timeout_s)
    else:
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                                   initialization_timeout=cfg.timeout_s)
    logger.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                jax.local_device_count())
    return jax.process_index()


def is_main_process() -> bool:
    """True in process 0, the one that writes the workdir's logs, metrics, plots and genotype."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------- placement

@dataclass(frozen=True)
class Placement:
    """A 1-D mesh of devices and the two shardings of the search: replicated, and split over ``axis``."""
    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        """Every device holds the whole array: the state, the dataset, the epoch order."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """The leading (batch) axis split over the mesh: each device holds ``batch / size`` examples."""
        return NamedSharding(self.mesh, PartitionSpec(self.axis))


def make_placement(cfg: ParallelConfig) -> Placement:
    """The mesh of ``parallel.devices`` (``auto``: every device of every process; ``N``: the first N).

    ConfigError when N is more than there are, or, with many processes, fewer than all of them (each process
    must hold a part of the mesh)."""
    devices = jax.devices()
    n = len(devices) if str(cfg.devices) == "auto" else int(cfg.devices)
    check(n <= len(devices), "parallel.devices", f"auto | 1..{len(devices)} (the devices visible)", cfg.devices)
    if jax.process_count() > 1:
        check(n == len(devices), "parallel.devices", f"auto | {len(devices)}: every device of the "
              f"{jax.process_count()} processes", cfg.devices)
    return Placement(Mesh(np.array(devices[:n]), (cfg.axis,)), cfg.axis)


def place(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` (jax or numpy arrays, the same on every process) on the devices of ``sharding``."""
    return jax.device_put(tree, sharding)


def place_dataset(array: np.ndarray, placement: Placement) -> jax.Array:
    """A host array replicated on every device of the mesh, each process filling its own devices from its own
    copy (no transfer between processes, and no check that the copies agree: each process loads the same data
    from the same seed)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, placement.replicated, lambda index: array[index])


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """Inside a jitted step: ask XLA to lay ``x`` out with ``sharding`` (no-op without one)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def mesh_context(sharding: NamedSharding | None) -> contextlib.AbstractContextManager:
    """Inside a jitted step: make the mesh of ``sharding`` the one that :func:`spread` reads (nothing without one)."""
    return contextlib.nullcontext() if sharding is None else jax.sharding.use_abstract_mesh(sharding.mesh.abstract_mesh)


def spread(x: jax.Array) -> jax.Array:
    """Under :func:`mesh_context` of more than one device, ``x``'s leading (batch) axis split over the mesh; else
    ``x`` unchanged. For the arrays that XLA would otherwise keep whole on every device: the routed mode's groups,
    cut from a permutation of the global batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(mesh.axis_names))
