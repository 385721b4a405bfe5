"""Device mesh, logical-axis rules and shardings on today's `jax.sharding` (one code path for CPU, GPU and TPU).

Parameters carry logical axis names (models/t5.py `param_logical_axes`); rules map each logical name to a mesh axis.
A dimension is only sharded when the mesh axis size divides it, so tiny test models still run on wide meshes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flan_jax.models import sharding as model_sharding

# The models' activation constraints (models/sharding.py) name the same axes.
DATA, MODEL = model_sharding.DATA_AXIS, model_sharding.MODEL_AXIS

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
    return Mesh(device_grid(devices, dp, mp), (DATA, MODEL))


def device_grid(devices: Sequence, dp: int, mp: int) -> np.ndarray:
    """[data, model] array of devices, laid out so each model-parallel group is as close together as it can be.

    Multi-slice TPU (devices with distinct `slice_index`): a hybrid mesh, data parallel across slices (the slow DCN
    links) and (data/slices, model) inside each slice. Otherwise `mesh_utils.create_device_mesh` maps the mesh onto
    the physical torus on TPU and keeps the process-major device order elsewhere, so a model group of
    `mp <= local_device_count` devices stays inside one host whenever `mp` divides it. A model group larger than a
    host necessarily spans hosts (e.g. NUM_PARTITIONS=8 on 4-chip hosts); the processes in it then share one data
    shard and feed identical rows (see `data_shard`).
    """
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1 and dp % len(slices) == 0:
        return mesh_utils.create_hybrid_device_mesh((dp // len(slices), mp), (len(slices), 1), devices,
                                                    allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh((dp, mp), devices, allow_split_physical_axes=True)


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's share of the input, derived from the mesh as T5X does: the data-parallel rows its devices hold.

    Processes whose devices hold the same rows (a model group spanning hosts) share an index and feed identical rows.
    """
    index: int   # which of `count` equal blocks of the global batch's rows this process feeds
    count: int   # number of distinct data shards (= data-parallel size / rows per process)


def data_shard_of(process_grid: np.ndarray, process_index: int, key: str = "NUM_PARTITIONS") -> DataShard:
    """Shard of one process, from process_grid[data_row, model_col] = index of the process owning that device.

    Every process must hold a contiguous, aligned block of data rows, and two processes' blocks must be equal or
    disjoint; otherwise a global batch cannot be split into per-process pieces and the error names `key`.
    """
    grid = np.asarray(process_grid)
    dp = grid.shape[0]
    blocks = {}
    for p in np.unique(grid):
        rows = np.flatnonzero((grid == p).any(axis=1))
        n = len(rows)
        if rows[-1] - rows[0] + 1 != n or dp % n or rows[0] % n:
            raise ValueError(f"{key}: process {int(p)} holds data-parallel rows {rows.tolist()} of {dp}, not an "
                             f"aligned contiguous block; choose a model-parallel size that divides the "
                             f"{int((grid == p).sum())} local devices or is a multiple of them")
        blocks[int(p)] = (int(rows[0]), n)
    for p, (start, n) in blocks.items():
        for q, (start2, n2) in blocks.items():
            if (start, n) != (start2, n2) and start < start2 + n2 and start2 < start + n:
                raise ValueError(f"{key}: processes {p} and {q} hold overlapping but different data-parallel rows")
    start, n = blocks[int(process_index)]
    return DataShard(index=start // n, count=dp // n)


def data_shard(mesh: Mesh, key: str = "NUM_PARTITIONS") -> DataShard:
    """This process's DataShard in `mesh`."""
    grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return data_shard_of(grid, jax.process_index(), key)


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


def under_mesh(mesh: Mesh, fn):
    """fn, traced with `mesh` as the abstract mesh, so that the models' activation sharding constraints
    (models/sharding.py) apply inside it; jit the result with shardings on the same mesh."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                                 process_id: Optional[int], auto: bool = False) -> None:
    """Multi-host start-up. `auto`: `jax.distributed.initialize()` with no arguments, which finds the coordinator
    and this process's id from the environment on Cloud TPU VMs / pods, SLURM and Open MPI. Otherwise a coordinator
    address and process count (and id) are given explicitly; with neither, the run stays single-process."""
    if auto:
        logging.info("jax.distributed.initialize() (auto-detected cluster)")
        jax.distributed.initialize()
        return
    if coordinator_address is None and num_processes is None:
        return
    logging.info("jax.distributed.initialize(%s, %s, %s)", coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def global_batch_from_local(local_batch: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
    """Global arrays from this process's rows: the rows of its DataShard (identical on processes sharing it)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
            for k, v in local_batch.items()}
