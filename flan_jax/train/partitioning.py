"""Device mesh, logical-axis rules and shardings on today's `jax.sharding` (one code path for CPU, GPU and TPU).

Parameters carry logical axis names (models/t5.py `param_logical_axes`); rules map each logical name to a mesh axis.
A dimension is only sharded when the mesh axis size divides it, so tiny test models still run on wide meshes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# Megatron-style tensor parallelism over 'model'; 'embed' stays replicated unless FSDP shards it over 'data'.
BASE_RULES = (
        ("batch", DATA),
        ("vocab", MODEL),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("joined_kv", MODEL),
        ("kv", None),
        ("embed", None),
        ("relpos_buckets", None),
        ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    num_partitions: int = 1               # model-parallel size; data parallel = devices / num_partitions
    mesh_shape: Optional[Sequence[int]] = None  # explicit (data, model); overrides num_partitions
    fsdp: bool = False                    # also shard params/optimizer state over 'data' (on their 'embed' axis)


def validate_mesh(cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
    if cfg.mesh_shape is not None:
        if len(cfg.mesh_shape) != 2:
            raise ValueError(f"MESH_SHAPE={tuple(cfg.mesh_shape)}: expected two sizes (data, model)")
        dp, mp = (int(x) for x in cfg.mesh_shape)
        if dp * mp != num_devices:
            raise ValueError(f"MESH_SHAPE={(dp, mp)} needs {dp * mp} devices but {num_devices} are available")
        return dp, mp
    mp = int(cfg.num_partitions)
    if mp < 1 or num_devices % mp:
        raise ValueError(f"NUM_PARTITIONS={mp} does not divide the {num_devices} available devices")
    return num_devices // mp, mp


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    dp, mp = validate_mesh(cfg, len(devices))
    # Build the Mesh directly: jax.make_mesh defaults to Explicit axes, which our sharding constraints don't use.
    return Mesh(np.asarray(devices).reshape(dp, mp), (DATA, MODEL))


def logical_rules(cfg: MeshConfig) -> dict:
    rules = dict(BASE_RULES)
    if cfg.fsdp:
        rules["embed"] = DATA
    return rules


def spec_for(axes: Sequence[Optional[str]], shape: Sequence[int], rules: dict, mesh: Mesh) -> P:
    """PartitionSpec for one array: map logical names through rules, skip non-dividing or reused mesh axes."""
    used, out = set(), []
    for name, dim in zip(axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    return P(*out)


def param_shardings(params_shape, param_axes, rules: dict, mesh: Mesh):
    """NamedSharding tree for params, from their logical axes."""
    return jax.tree.map(
            lambda s, axes: NamedSharding(mesh, spec_for(axes, s.shape, rules, mesh)),
            params_shape, param_axes, is_leaf=lambda x: isinstance(x, tuple))


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def opt_state_shardings(opt_state_shape, params_shape, param_axes, rules: dict, mesh: Mesh):
    """Shardings for optimizer state whose leaves mirror params (full slots) or drop one axis (factored v_row/v_col).

    Each state leaf is matched to the param whose dict path ends its own path; scalars (counts) are replicated.
    """
    flat_params = {_path_keys(p): (leaf.shape, axes) for (p, leaf), axes in zip(
            jax.tree_util.tree_flatten_with_path(params_shape)[0],
            jax.tree.leaves(param_axes, is_leaf=lambda x: isinstance(x, tuple)))}
    # Index params by their key path; state paths carry the same keys after a prefix (e.g. FactoredState.v_row).
    def for_leaf(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = flat_params.get(keys[start:])
            if hit is not None:
                shape, axes = hit
                if tuple(leaf.shape) == tuple(shape):
                    return NamedSharding(mesh, spec_for(axes, leaf.shape, rules, mesh))
                if len(leaf.shape) == len(shape) - 1:
                    for drop in range(len(shape) - 1, -1, -1):
                        if tuple(shape[:drop]) + tuple(shape[drop + 1:]) == tuple(leaf.shape):
                            kept = tuple(axes[:drop]) + tuple(axes[drop + 1:])
                            return NamedSharding(mesh, spec_for(kept, leaf.shape, rules, mesh))
                break
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(for_leaf, opt_state_shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                                                                  process_id: Optional[int]) -> None:
    """Multi-host start-up. On TPU pods / SLURM, `jax.distributed.initialize()` with no arguments auto-detects."""
    if coordinator_address is None and num_processes is None:
        return
    logging.info("jax.distributed.initialize(%s, %s, %s)", coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def global_batch_from_local(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assemble global arrays from this process's rows (each process feeds its own slice of the data axis)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
