"""Device mesh and shardings: data parallel and FSDP over a (data, fsdp) mesh.

- The batch is split over both axes (every device computes a different slice of the batch).
- Params and optimizer state are replicated when fsdp == 1, otherwise each array is split along
  its largest dimension that the fsdp size divides (arrays with none stay replicated).
- Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize`; each process
  builds its rows of the global batch and `global_batch` assembles the global array.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run when a coordinator is given (flags or ATLAS_COORDINATOR etc.)."""
    coordinator = coordinator or os.environ.get("ATLAS_COORDINATOR")
    if not coordinator:
        return
    num_processes = num_processes if num_processes is not None else int(os.environ.get("ATLAS_NUM_PROCESSES", "1"))
    process_id = process_id if process_id is not None else int(os.environ.get("ATLAS_PROCESS_ID", "0"))
    # Cross-process collectives on CPU (no effect on GPU/TPU); set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def make_mesh(mesh_shape: list[int] | tuple[int, int], devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = mesh_shape
    if data == -1:
        if n % fsdp:
            raise ConfigError(f"train.mesh={list(mesh_shape)}: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ConfigError(f"train.mesh={list(mesh_shape)}: data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ConfigError(f"train.mesh={list(mesh_shape)} needs {data * fsdp} devices but {n} are present; "
                          f"use -1 for one axis to take the rest")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest dimension fsdp divides; replicate otherwise."""
    if fsdp == 1 or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state)


def check_batch_divides(global_batch: int, microbatches: int, mesh: Mesh) -> None:
    n = mesh.size
    per_micro = global_batch // microbatches
    if per_micro % n:
        raise ConfigError(
            f"train.batch_size={global_batch} / train.microbatches={microbatches} = {per_micro} sequences per "
            f"microbatch does not split over {n} devices; use a multiple of {n * microbatches}")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def make_flag_agreement(mesh: Mesh):
    """flag -> a replicated array holding whether ANY process passed True (a max over one int per
    device). Every process calls it at the same step, so all of them learn the same answer at the same
    step: the trainer uses it to stop (and save) together when only one process was signalled."""
    reduce = jax.jit(lambda x: x.max(), out_shardings=replicated(mesh))
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])

    def agree(flag: bool) -> jax.Array:
        local = np.full((n_local,), int(flag), np.int32)
        return reduce(jax.make_array_from_process_local_data(sharding, local))

    return agree
