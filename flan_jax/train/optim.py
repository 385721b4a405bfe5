"""Adafactor with T5X's defaults and learning-rate schedules.

T5X defaults (t5x/adafactor.py; Shazeer & Stern 2018, arXiv:1804.04235): factored second moments for dims >= 128,
decay_rate 0.8 (beta2_t = 1 - (t+1)^-0.8), step_offset 0, update scaled by max(rms(param), 1e-3), update clipping at
RMS 1.0, epsilon1 1e-30, no momentum, no weight decay, float32 state. optax.adafactor implements the same rule; this
module pins those values in one place. optax keeps the second moments in the parameter dtype, so the rule here runs on
float32 copies of parameters and gradients: the state is float32 whatever the parameter dtype, as in T5X, and the
float32 update is added to the parameter before one rounding back to its dtype (optax.apply_updates).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "constant"  # constant | warmup_constant | rsqrt
    learning_rate: float = 1e-3
    warmup_steps: int = 0


def make_schedule(cfg: ScheduleConfig) -> optax.Schedule:
    lr, warm = cfg.learning_rate, max(cfg.warmup_steps, 0)
    if cfg.kind == "constant":
        return optax.constant_schedule(lr)
    if cfg.kind == "warmup_constant":
        return lambda step: lr * jnp.minimum(1.0, (step + 1) / max(warm, 1))
    if cfg.kind == "rsqrt":
        # T5's pretraining schedule: lr / sqrt(max(step, warmup)), with `learning_rate` the value at the end of warmup.
        return lambda step: lr * jnp.sqrt(max(warm, 1)) / jnp.sqrt(jnp.maximum(step + 1, max(warm, 1)))
    raise ValueError(f"schedule kind={cfg.kind!r}: expected constant, warmup_constant or rsqrt")


def schedule_count(opt_state) -> Optional[jax.Array]:
    """The learning-rate schedule's own step counter in an optimizer state (None if it has none).

    It equals the loop's step, except after a T5X restore with its optimizer state: then it continues from T5X's
    step (train/init_from.py), and so does the schedule."""
    is_count = lambda x: isinstance(x, optax.ScaleByScheduleState)
    counts = [x.count for x in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(x)]
    return counts[0] if counts else None


def applied_learning_rate(schedule: optax.Schedule, opt_state, loop_step: int) -> float:
    """The learning rate of the update that brought the optimizer to `opt_state` (the loop's step-th update)."""
    count = schedule_count(opt_state)
    return float(schedule((loop_step if count is None else int(count)) - 1))  # int(): replicated, fine multi-host


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
    decay_rate: float = 0.8
    step_offset: int = 0
    multiply_by_parameter_scale: bool = True
    clipping_threshold: Optional[float] = 1.0
    epsilon1: float = 1e-30
    min_dim_size_to_factor: int = 128
    beta1: Optional[float] = None
    weight_decay_rate: Optional[float] = None
    factored: bool = True


def make_adafactor(cfg: AdafactorConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return in_float32(_optax_adafactor(cfg, schedule))


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to float32 copies of gradients and parameters: float32 state and float32 updates."""
    as_f32 = lambda tree: None if tree is None else jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

    def update(updates, state, params=None):
        return inner.update(as_f32(updates), state, as_f32(params))

    return optax.GradientTransformation(lambda params: inner.init(as_f32(params)), update)


def _optax_adafactor(cfg: AdafactorConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adafactor(
            learning_rate=schedule,
            min_dim_size_to_factor=cfg.min_dim_size_to_factor,
            decay_rate=cfg.decay_rate,
            decay_offset=cfg.step_offset,
            multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
            clipping_threshold=cfg.clipping_threshold,
            momentum=cfg.beta1,
            dtype_momentum=jnp.float32,
            weight_decay_rate=cfg.weight_decay_rate,
            eps=cfg.epsilon1,
            factored=cfg.factored,
    )
