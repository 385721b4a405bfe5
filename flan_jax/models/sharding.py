"""Sharding constraints inside the models, active only while a step is traced under a mesh.

Parameters carry shardings (train/partitioning.py); activations get whatever XLA's propagation derives from them.
With FSDP ('embed' sharded over the data axis, like the batch) the TPU compiler sharded activations' model
dimension over 'data' and gathered whole-batch activations onto every chip instead of gathering one layer's weights
(docs/tpu-fit.md). Pinning the batch dimension of each layer's input and output to the data axis rules that out;
`gathered` makes each matmul's weight whole on the chip, FSDP's usual schedule.

The mesh comes from the tracing context (`jax.sharding.use_abstract_mesh`, entered by train/partitioning.under_mesh):
models stay functions of (config, params, batch), and outside a mesh (tests, evaluation on one device) every
constraint here is a no-op.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

# Mesh axis names shared with train/partitioning.py (which builds the meshes).
DATA_AXIS = "data"
MODEL_AXIS = "model"


def _axis_size(name: str) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 1
    return int(mesh.shape[name])


def batch_sharded(x: jax.Array) -> jax.Array:
    """x with its leading (batch) dimension sharded over the data axis, the other dimensions left to the compiler.

    Unchanged when there is no mesh, the data axis has one device, or it does not divide the batch."""
    if not isinstance(x, jax.core.Tracer):   # eager calls: nothing to constrain, and no device mesh to name
        return x
    size = _axis_size(DATA_AXIS)
    if size == 1 or x.ndim == 0 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA_AXIS, *([P.UNCONSTRAINED] * (x.ndim - 1))))


def gathered(kernel: jax.Array) -> jax.Array:
    """A weight replicated on every chip when the mesh has no model axis (FSDP: one layer's all-gather).

    Left to itself the TPU compiler computed FSDP matmuls as windowed einsums (collective-permute loops over weight
    shards), and libtpu 0.0.42 crashed emitting one of them (a stack overflow, under scan with dropout). Gathering
    the weight, in the compute dtype, is FSDP's usual schedule; its gradient becomes a reduce-scatter. With a model
    axis the weight keeps whatever tensor-parallel sharding the compiler derives."""
    if not isinstance(kernel, jax.core.Tracer) or _axis_size(DATA_AXIS) == 1 or _axis_size(MODEL_AXIS) > 1:
        return kernel
    return jax.lax.with_sharding_constraint(kernel, P(*([None] * kernel.ndim)))
