"""Where a run's arrays live: the devices it trains on, as one mesh axis ``batch`` over every
process's devices, and which process writes the run directory.

    initialize(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)  # several hosts only
    placement = Placement.create(devices=0)     # 0: every device of every process
    state = placement.whole(state)              # replicated on every device
    batch = placement.batch(local_rows, 256)    # a global batch of 256 from this process's rows
    rows = placement.local_rows(256)            # which rows of a global batch this process holds

Data parallel: the state is replicated, every global batch is split along its first axis over the
``batch`` axis (``pfa_jax.train.AXIS``), and XLA partitions the jitted steps (sharded ``jit``):
each device computes its rows' forward and backward pass and the gradients, feedback signals and
batch statistics are averaged over all devices, so a step is that of one device on the whole batch
(to float rounding). The batch sizes must divide by the device count.

Several processes (one per host of a TPU pod slice or a GPU cluster, or several on one machine):
``initialize`` joins them with ``jax.distributed`` before anything else touches JAX. Without
arguments it detects the cluster where JAX can (Cloud TPU, SLURM, Open MPI, Kubernetes); otherwise
pass the coordinator's ``host:port``, the process count and this process's index (or set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``). Every process then runs
the same program: each builds its part of a global batch from its own rows (``local_rows``,
``batch``: ``jax.make_array_from_process_local_data``), and only process 0 writes files
(``writer``); ``barrier`` waits for all of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pfa_jax import train

__all__ = ["add_arguments", "barrier", "from_arguments", "initialize", "Placement", "writer"]

ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to a multi-process run (``jax.distributed.initialize``): the arguments,
    else the environment variables of ``ENVIRONMENT``, else JAX's cluster detection. CPU devices
    use gloo collectives. Call it first, before any other JAX call."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _int_or_none("num_processes", num_processes, "JAX_NUM_PROCESSES")
    process_id = _int_or_none("process_id", process_id, "JAX_PROCESS_ID")
    if num_processes is not None and not (process_id is not None and 0 <= process_id < num_processes):
        raise ValueError(f"process_id={process_id!r} must lie in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of a multi-process run (``from_arguments`` reads them)."""
    group = parser.add_argument_group(
        "several processes (hosts)", "run the same command on every host; see "
        "pfa_jax.app.placement")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run: the flags below, else $JAX_COORDINATOR_ADDRESS, "
                            "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID, else JAX's detection of a "
                            "Cloud TPU pod slice, SLURM, Open MPI or Kubernetes")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordinator service (implies --distributed)")
    group.add_argument("--num-processes", type=int, help="number of processes (implies --distributed)")
    group.add_argument("--process-id", type=int,
                       help="this process's index, 0 .. num-processes - 1 (implies --distributed)")


def from_arguments(args: argparse.Namespace) -> None:
    """``initialize`` when the flags of ``add_arguments`` ask for several processes."""
    given = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(value is not None for value in given):
        initialize(*given)


def _int_or_none(name: str, value, variable: str) -> int | None:
    value = os.environ.get(variable) if value is None else value
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} (or ${variable}) must be an int") from None


def writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The run's device mesh (module docstring)."""

    mesh: Mesh

    @classmethod
    def create(cls, devices: int = 0) -> Placement:
        """The first ``devices`` devices of ``jax.devices()`` (0: all of them, over every
        process). Several processes train on all their devices: ``devices`` is then 0 or the
        global device count."""
        available = jax.devices()
        if devices < 0 or devices > len(available) or (
                devices and jax.process_count() > 1 and devices != len(available)):
            multi = (f" over {jax.process_count()} processes, which train on all of them"
                     if jax.process_count() > 1 else "")
            raise ValueError(f"config devices={devices!r} is not available: {len(available)} "
                             f"{available[0].platform} device(s){multi}; valid: 0 (all)"
                             + ("" if multi else f" or 1..{len(available)}"))
        return cls(train.batch_mesh(available[:devices] if devices else available))

    @property
    def size(self) -> int:
        """The number of devices."""
        return self.mesh.size

    @property
    def rows(self) -> jax.sharding.Sharding:
        """A batch's sharding: its first axis split over the devices (one device: that device)."""
        if self.size == 1:
            return jax.sharding.SingleDeviceSharding(self.mesh.devices.flat[0])
        return NamedSharding(self.mesh, PartitionSpec(train.AXIS))

    @property
    def split(self) -> NamedSharding | None:
        """The ``sharding=`` of ``train.train_epoch`` and ``train.evaluate``: ``rows``, or None on
        one device, where the compiled program stays the one-device program of before (no
        sharding annotations, so the same fusions and the same rounding)."""
        return None if self.size == 1 else self.rows

    def check_divides(self, key: str, size: int) -> None:
        """Raises unless a batch of ``size`` (config ``key``) splits evenly over the devices."""
        if size % self.size:
            raise ValueError(f"config {key}={size} does not split evenly over the {self.size} "
                             f"devices: choose a multiple of {self.size}, or set devices to a "
                             "count that divides it")

    def local_rows(self, size: int) -> slice:
        """The rows of a global batch of ``size`` that this process's devices hold (one block:
        ``jax.devices()`` lists each process's devices together)."""
        spans = self.rows.addressable_devices_indices_map((size,)).values()
        starts, stops = zip(*((s[0].start or 0, size if s[0].stop is None else s[0].stop)
                              for s in spans))
        if sum(stops) - sum(starts) != max(stops) - min(starts):
            raise ValueError(f"process {jax.process_index()}'s devices hold rows {starts} .. "
                             f"{stops} of a batch, not one block; order the mesh's devices by "
                             "process")
        return slice(min(starts), max(stops))

    def batch(self, local, size: int):
        """The global batch of ``size`` rows of which this process holds ``local`` (a pytree of
        arrays, their rows ``local_rows(size)``), split over the devices."""
        if self.size == 1:
            return jax.device_put(local, self.rows)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.rows, np.asarray(x), (size,) + np.shape(x)[1:]), local)

    def whole(self, tree):
        """``tree`` (the same on every process) replicated on every device."""
        if self.size == 1:
            return jax.device_put(tree, self.rows)
        return train.replicate_on(tree, self.mesh)
