"""The compiled train step as a value: built from a config and a mesh, without data, devices' memory or a checkpoint.

Training (train/loop.py) calls the step this builds; `flan-jax compile` lowers the same step on abstract arguments
for a TPU topology's devices. Everything that goes into the traced step (the mesh, the attention kernel's target
platform, the batch's shapes) comes from the arguments here, never from the host the code runs on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from flan_jax import models
from flan_jax.train import optim, partitioning, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class StepProgram:
    step_fn: Callable          # the pure step(state, batch[, frozen]) -> (state, metrics)
    jitted: Any                # step_fn jitted with the layout's shardings (state donated)
    layout: state_lib.StateLayout
    batch: dict                # {feature: ShapeDtypeStruct} of one global batch, with the batch sharding
    batch_sharding: Any
    mesh: Mesh
    optimizer: optax.GradientTransformation

    def abstract_args(self) -> tuple:
        """The step's arguments as ShapeDtypeStructs: what `jitted.lower(*...)` compiles for."""
        args = (self.layout.abstract, self.batch)
        return args + ((self.layout.frozen,) if self.layout.frozen is not None else ())


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The run's Adafactor (schedule included) from a TrainConfig."""
    return optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))


def batch_shapes(model_cfg, task_feature_lengths: dict, global_batch_size: int, converter=None) -> dict:
    """{feature: (global_batch_size, length)} of the model features the run's feature converter produces."""
    converter = models.feature_converter(model_cfg) if converter is None else converter
    lengths = converter.get_model_feature_lengths(dict(task_feature_lengths))
    return {name: (global_batch_size, int(length)) for name, length in lengths.items()}


def build(cfg, mesh: Mesh, *, converter=None, optimizer: Optional[optax.GradientTransformation] = None,
          platform: Optional[str] = None) -> StepProgram:
    """The train step of TrainConfig `cfg` on `mesh`: layout, jitted step and abstract batch.

    platform: the platform the step is compiled for ("tpu", "gpu", "cpu"); default: the mesh's devices' platform.
    Kernels that differ by platform (models' attention) are chosen from it, not from the host's default backend.
    """
    optimizer = make_optimizer(cfg) if optimizer is None else optimizer
    platform = platform or mesh.devices.flat[0].platform
    model_cfg = models.for_platform(cfg.model, platform)
    layout = state_lib.state_layout(model_cfg, optimizer, cfg.mesh, mesh)
    step_fn = step_lib.make_train_step(model_cfg, optimizer, cfg.loss, num_microbatches=cfg.num_microbatches,
                                       seed=cfg.seed, skip_nonfinite_updates=cfg.skip_nonfinite_updates)
    step_fn = partitioning.under_mesh(mesh, step_fn)   # the models' activation shardings name this mesh's axes
    batch_sharding = partitioning.batch_sharding(mesh)
    shapes = batch_shapes(model_cfg, cfg.input.task_feature_lengths, cfg.input.global_batch_size, converter)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for k, shape in shapes.items()}
    jitted = state_lib.jit_step(step_fn, layout, batch_sharding, cfg.compile_effort)
    return StepProgram(step_fn, jitted, layout, batch, batch_sharding, mesh, optimizer)
