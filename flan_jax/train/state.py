"""The one train state and the one builder of its abstract form (shapes, dtypes and shardings, nothing allocated).

Every trainer (SFT, PEFT, reward model, DPO) and `flan-jax compile` get their layout from `state_layout`, so what
compiles for a TPU topology is what trains there. The state is a plain dict (orbax checkpoints hold it as such):

    {"step": int32[], "params": trainable params, "opt_state": optimizer state of those, "nonfinite_step": int32[]}

`nonfinite_step` is the first step whose loss or gradients were not finite (-1 while all are), read on the host at
log and save points. With PEFT the trainable params are `{"peft": ...}` alone; the frozen base travels beside the
state (`StateLayout.frozen`), an input of every step that is never differentiated or donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypedDict

import jax
import jax.numpy as jnp
import optax

from flan_jax import models
from flan_jax.models import quant
from flan_jax.train import partitioning

PEFT_KEY = "peft"


class TrainState(TypedDict):
    step: Any
    params: Any
    opt_state: Any
    nonfinite_step: Any


def new_state(params, optimizer: optax.GradientTransformation, step: int = 0) -> TrainState:
    """A state at `step` for `params` with a fresh optimizer state."""
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optimizer.init(params),
                      nonfinite_step=jnp.full((), -1, jnp.int32))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    abstract: TrainState   # ShapeDtypeStructs carrying their NamedShardings
    shardings: TrainState  # the NamedSharding tree (in/out shardings of the jitted step)
    frozen: Any = None     # PEFT: the frozen base params as ShapeDtypeStructs with shardings (QLoRA: quantized)

    @property
    def frozen_shardings(self):
        return None if self.frozen is None else jax.tree.map(lambda a: a.sharding, self.frozen)


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def layout(param_shapes, param_axes, optimizer: optax.GradientTransformation, mesh_cfg: partitioning.MeshConfig,
           mesh, *, frozen_shapes=None, frozen_axes=None) -> StateLayout:
    """The layout of a state training `param_shapes` (logical axes `param_axes`) with `optimizer` on `mesh`; the
    optimizer state is sharded like the parameters it belongs to. frozen_*: a frozen base beside the state."""
    rules = partitioning.logical_rules(mesh_cfg)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
    shapes = TrainState(step=scalar, params=param_shapes, opt_state=opt_shapes, nonfinite_step=scalar)
    shardings = TrainState(
        step=partitioning.replicated(mesh),
        params=partitioning.param_shardings(param_shapes, param_axes, rules, mesh),
        opt_state=partitioning.opt_state_shardings(opt_shapes, param_shapes, param_axes, rules, mesh),
        nonfinite_step=partitioning.replicated(mesh))
    frozen = None
    if frozen_shapes is not None:
        frozen = _with_shardings(frozen_shapes, partitioning.param_shardings(frozen_shapes, frozen_axes, rules, mesh))
    return StateLayout(_with_shardings(shapes, shardings), shardings, frozen)


def peft_enabled(model_cfg) -> bool:
    return getattr(model_cfg, "peft", None) is not None


def split_trainable(tree: dict) -> tuple[dict, dict]:
    """(trainable {'peft': ...}, frozen base) of a PEFT model's parameter (or logical-axes) tree."""
    if PEFT_KEY not in tree:
        raise KeyError(f"parameters have no '{PEFT_KEY}' subtree; top-level keys: {sorted(tree)}")
    return {PEFT_KEY: tree[PEFT_KEY]}, {k: v for k, v in tree.items() if k != PEFT_KEY}


def state_layout(model_cfg, optimizer: optax.GradientTransformation, mesh_cfg: partitioning.MeshConfig,
                 mesh) -> StateLayout:
    """The train-state layout of a model config: all parameters trainable, or with PEFT the PEFT parameters
    trainable and the base frozen beside the state."""
    shapes, axes = models.param_shapes(model_cfg), models.param_logical_axes(model_cfg)
    if not peft_enabled(model_cfg):
        return layout(shapes, axes, optimizer, mesh_cfg, mesh)
    (trainable, frozen), (trainable_axes, frozen_axes) = split_trainable(shapes), split_trainable(axes)
    if model_cfg.peft.base_quantization:   # QLoRA: the base is held (and compiled for) in its storage types
        frozen, frozen_axes = quant.abstract(frozen, frozen_axes, model_cfg.peft.base_quantization)
    return layout(trainable, trainable_axes, optimizer, mesh_cfg, mesh, frozen_shapes=frozen, frozen_axes=frozen_axes)


def init_on_mesh(make_params: Callable, optimizer: optax.GradientTransformation, state_layout_: StateLayout,
                 *args) -> TrainState:
    """A step-0 state of `make_params(*args)`, built by one jitted call straight into the layout's shardings (the
    parameters never sit whole on one device)."""
    init = jax.jit(lambda *a: new_state(make_params(*a), optimizer), out_shardings=state_layout_.shardings)
    return init(*args)


def jit_step(step_fn: Callable, state_layout_: StateLayout, batch_sharding, compile_effort: float = 0.0):
    """`step_fn(state, batch[, frozen]) -> (state, metrics)` jitted with the layout's shardings, the state donated.
    The same function serves training (called) and `flan-jax compile` (`.lower(...)` on abstract arguments).
    compile_effort: XLA's exec_time_optimization_effort (TrainConfig.compile_effort); 0 leaves XLA's default."""
    in_shardings = (state_layout_.shardings, batch_sharding)
    if state_layout_.frozen is not None:
        in_shardings += (state_layout_.frozen_shardings,)
    options = {"exec_time_optimization_effort": float(compile_effort)} if compile_effort else None
    return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_layout_.shardings, None),
                   donate_argnums=(0,), compiler_options=options)


def abstract_params(model_cfg, mesh_cfg: partitioning.MeshConfig, mesh) -> dict:
    """ShapeDtypeStructs of all of a model's parameters (PEFT ones included) with the shardings training gives
    them: what restoring a checkpoint for eval or export reads into."""
    shapes = models.param_shapes(model_cfg)
    rules = partitioning.logical_rules(mesh_cfg)
    return _with_shardings(shapes, partitioning.param_shardings(shapes, models.param_logical_axes(model_cfg), rules,
                                                                mesh))


def no_optimizer() -> optax.GradientTransformation:
    """Stands in where only the parameters' layout is needed (a frozen base, an eval restore)."""
    return optax.identity()

