"""The train step: forward, loss, gradient accumulation over microbatches, Adafactor update, non-finite guard."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from flan_jax import models
from flan_jax.train import loss as loss_lib, sparse_head, state as state_lib


@dataclasses.dataclass(frozen=True)
class LossConfig:
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    normalizer: loss_lib.Normalizer = loss_lib.NUM_REAL_TARGET_TOKENS  # None: un-normalized sum, as in T5X
    # Decoder-only: the output head and loss run on chunks of this many loss positions per row, as many as the
    # busiest row needs (train/sparse_head.py); None: logits at every position. Encoder-decoder: always full, as
    # T5's packed target rows are dense (30-44% loss positions on the Flan-like stream, the busiest row near full),
    # so little would be skipped (measured: no gain on T5 small). 32 beat 128 by 7% and 16 by 0.5% (llama_small_8l).
    head_chunk: Optional[int] = 32


def init_state(model_cfg, optimizer: optax.GradientTransformation, rng) -> state_lib.TrainState:
    """A step-0 state of all of a model's parameters, initialized from `rng`."""
    return state_lib.new_state(models.init_params(model_cfg, rng), optimizer)


def _split_microbatches(batch: dict, num_microbatches: int) -> dict:
    # Strided split (row i goes to microbatch i % m) keeps each microbatch spread over the data-parallel devices.
    def split(x):
        b = x.shape[0]
        if b % num_microbatches:
            raise ValueError(f"batch of {b} rows does not split into NUM_MICROBATCHES={num_microbatches}")
        return x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def uses_sparse_head(model_cfg, loss_cfg: LossConfig) -> bool:
    """Whether the step runs the output head on loss positions only (decoder-only with head_chunk set)."""
    return loss_cfg.head_chunk is not None and not models.is_encoder_decoder(model_cfg)


def apply_gradients(state: dict, grads, loss, optimizer: optax.GradientTransformation, *,
                    skip_nonfinite_updates: bool = False):
    """(next state, finite, gradient norm): the optimizer's update of `state` by `grads`, its step advanced and its
    nonfinite_step set at the first step whose loss or gradients are not finite (that update is skipped if asked)."""
    params = state["params"]
    grad_norm = optax.tree.norm(grads)
    # A non-finite gradient entry makes the norm non-finite too: one pass over the gradients instead of two.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if skip_nonfinite_updates:
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_params, new_opt = keep(new_params, params), keep(new_opt, state["opt_state"])
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"] + 1, state["nonfinite_step"])
    new_state = state_lib.TrainState(step=state["step"] + 1, params=new_params, opt_state=new_opt,
                                     nonfinite_step=nonfinite_step)
    return new_state, finite, grad_norm


def _make_loss_fn(model_cfg, loss_cfg: LossConfig) -> Callable:
    """loss_fn(params, batch, rng, frozen=None) -> (summed loss, (denominator, aux sums))."""
    use_dropout = model_cfg.dropout_rate > 0
    head_on_loss_positions = uses_sparse_head(model_cfg, loss_cfg)
    options = dict(z_loss=loss_cfg.z_loss, label_smoothing=loss_cfg.label_smoothing, normalizer=loss_cfg.normalizer)

    def loss_fn(params, batch, rng, frozen=None):
        # PEFT: `params` is the trainable {'peft': ...} tree; the frozen base is an input, never differentiated.
        full = params if frozen is None else {**frozen, **params}
        rng = rng if use_dropout else None
        if not head_on_loss_positions:
            logits = models.forward(model_cfg, full, batch, dropout_rng=rng)
            total, denom, aux = loss_lib.summed_loss(logits, batch, **options)
        else:
            hidden = models.hidden_states(model_cfg, full, batch, dropout_rng=rng)
            project = lambda h: models.project_logits(model_cfg, full, h, dropout_rng=rng)
            total, denom, aux = sparse_head.summed_loss_from_hidden(project, hidden, batch, chunk=loss_cfg.head_chunk,
                                                                    **options)
        return total, (denom, aux)

    return loss_fn


def _accumulated(grad_fn: Callable, params, batch: dict, rng, frozen, num_microbatches: int, normalizer):
    """(summed loss, denominator, aux sums, summed gradients) over the batch's microbatches, one after another."""
    micro = _split_microbatches(batch, num_microbatches)

    def body(carry, xs):
        i, mb = xs
        (t, (d, a)), g = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen)
        acc_g, acc_t, acc_d, acc_a = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_t + t, acc_d + d, jax.tree.map(jnp.add, acc_a, a)), None

    zeros_aux = {k: jnp.zeros((), jnp.float32) for k in ("z_loss_sum", "correct_tokens", "target_tokens")}
    init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0), zeros_aux)
    (grads, total, denom, aux), _ = jax.lax.scan(body, init, (jnp.arange(num_microbatches), micro))
    if loss_lib.has_fixed_denominator(normalizer):
        denom = denom / num_microbatches  # constant denominators were added once per microbatch
    return total, denom, aux, grads


def make_train_step(model_cfg, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
                    *, num_microbatches: int = 1, seed: int = 0, skip_nonfinite_updates: bool = False) -> Callable:
    """Returns step(state, batch, frozen=None) -> (state, metrics). Pure; the caller jits it with shardings.

    frozen: for PEFT, the frozen base parameters joined to state['params'] in the forward pass only."""
    base_rng = jax.random.PRNGKey(seed)
    grad_fn = jax.value_and_grad(_make_loss_fn(model_cfg, loss_cfg), has_aux=True)

    def step(state: dict, batch: dict, frozen: Optional[dict] = None):
        params = state["params"]
        rng = jax.random.fold_in(base_rng, state["step"])  # dropout noise is a function of the step: resume is exact
        if num_microbatches == 1:
            (total, (denom, aux)), grads = grad_fn(params, batch, rng, frozen)
        else:
            total, denom, aux, grads = _accumulated(grad_fn, params, batch, rng, frozen, num_microbatches,
                                                    loss_cfg.normalizer)
        denom = jnp.maximum(denom, 1e-9)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        new_state, finite, grad_norm = apply_gradients(state, grads, loss, optimizer,
                                                       skip_nonfinite_updates=skip_nonfinite_updates)
        metrics = {"loss": loss, "z_loss": aux["z_loss_sum"] / denom,
                   "token_accuracy": aux["correct_tokens"] / jnp.maximum(aux["target_tokens"], 1.0),
                   "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    return step
