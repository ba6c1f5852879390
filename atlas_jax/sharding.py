"""Device mesh and shardings: data parallel, FSDP and expert parallel over a (data, fsdp, expert) mesh.

- The batch is split over all three axes (every device computes a different slice of the batch).
- Params and optimizer state are replicated when fsdp == 1, otherwise each array is split along
  its largest dimension that the fsdp size divides (arrays with none stay replicated).
- The stacked expert tensors of a MoE layer (`.../moe/w_gate|w_up|w_down`, [E, ...]) and their
  optimizer state are split along E over the expert axis (each device holds E/expert experts; fsdp
  splits one of their other dimensions). The MoE layers exchange tokens: each token's hidden state
  goes to the devices of its experts and back by all_to_all (model.expert_parallel, moe.experts_all_to_all).
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

BATCH_AXES = ("data", "fsdp", "expert")
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


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


def make_mesh(mesh_shape: list[int] | tuple[int, ...], devices: list | None = None) -> Mesh:
    """train.mesh ([data, fsdp] or [data, fsdp, expert], one -1 = the rest) -> a (data, fsdp, expert) Mesh."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = list(mesh_shape) + [1] * (3 - len(mesh_shape))
    if -1 in sizes:
        rest = -int(np.prod(sizes))  # the product of the given sizes
        if n % rest:
            raise ConfigError(f"train.mesh={list(mesh_shape)}: the other axes ({rest} devices) do not divide the "
                              f"{n} devices")
        sizes[sizes.index(-1)] = n // rest
    if int(np.prod(sizes)) != n:
        raise ConfigError(f"train.mesh={list(mesh_shape)} needs {int(np.prod(sizes))} devices but {n} are present; "
                          f"use -1 for one axis to take the rest")
    return Mesh(np.asarray(devices).reshape(sizes), ("data", "fsdp", "expert"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, expert_axis: bool = False) -> P:
    """Split the largest dimension fsdp divides (not the expert dimension 0 of an expert tensor, which
    goes on the expert axis); replicate otherwise."""
    spec: list = [None] * len(shape)
    if expert_axis:
        spec[0] = "expert"
    if fsdp > 1:
        for dim in sorted(range(int(expert_axis), len(shape)), key=lambda i: -shape[i]):
            if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                spec[dim] = "fsdp"
                break
    return P(*spec) if any(spec) else P()


def _is_expert_tensor(path, ndim: int) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return ndim == 3 and "moe" in names and names[-1] in EXPERT_PARAMS


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    fsdp, expert = mesh.shape["fsdp"], mesh.shape["expert"]

    def spec(path, x):
        on_expert = expert > 1 and _is_expert_tensor(path, len(x.shape))
        if on_expert and x.shape[0] % expert:
            raise ConfigError(f"train.mesh expert axis {expert} does not divide model.moe_experts={x.shape[0]}; "
                              f"use an expert axis that divides {x.shape[0]}")
        return NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, on_expert))

    return jax.tree_util.tree_map_with_path(spec, abstract_state)


def check_batch_divides(global_batch: int, microbatches: int, mesh: Mesh) -> None:
    n = mesh.size
    per_micro = global_batch // microbatches
    if per_micro % n:
        raise ConfigError(
            f"train.batch_size={global_batch} / train.microbatches={microbatches} = {per_micro} sequences per "
            f"microbatch does not split over {n} devices; use a multiple of {n * microbatches}")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, sharded over (data, fsdp, expert)."""
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
