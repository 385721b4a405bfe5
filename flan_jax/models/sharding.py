"""Activation sharding constraints inside the models, active only while a step is traced under a mesh.

Parameters carry shardings (train/partitioning.py); activations get whatever XLA's propagation derives from them.
With FSDP ('embed' sharded over the data axis, like the batch) the TPU compiler sharded activations' model
dimension over 'data' and gathered whole-batch activations onto every chip instead of gathering one layer's weights
(docs/tpu-fit.md). Pinning the batch dimension of each layer's input and output to the data axis rules that out.

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
