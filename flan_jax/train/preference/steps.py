"""Jittable train and eval steps of the reward model and DPO, over batches from pairs.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flan_jax.train import step as step_lib
from flan_jax.train.preference import losses, reward, scoring


def reward_scores(model_cfg, params, batch, dropout_rng=None):
    return reward.rewards(model_cfg, params, batch["inputs"], batch["responses"], dropout_rng=dropout_rng)


def policy_scores(model_cfg, params, batch):
    return scoring.response_logprobs(model_cfg, params, batch["inputs"], batch["responses"])


def make_reward_loss(model_cfg):
    use_dropout = model_cfg.dropout_rate > 0

    def loss_fn(params, batch, rng):
        r = reward_scores(model_cfg, params, batch, rng if use_dropout else None)
        loss = losses.reward_loss(r[:, 0], r[:, 1], batch["weight"])
        return loss, {"accuracy": losses.weighted_mean((r[:, 0] > r[:, 1]).astype(jnp.float32), batch["weight"]),
                      "reward_margin": losses.weighted_mean(r[:, 0] - r[:, 1], batch["weight"])}
    return loss_fn


def make_dpo_loss(model_cfg, beta: float, loss_type: str):
    # Dropout is left off: the reference log-probs were computed without it, and h must compare like with like.
    def loss_fn(params, batch, rng):
        del rng
        logp = policy_scores(model_cfg, params, batch)
        ref = batch["reference_logprobs"]
        loss = losses.dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], batch["weight"], beta=beta,
                               loss_type=loss_type)
        h = losses.log_ratio_margin(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1])
        w = batch["weight"]
        return loss, {"accuracy": losses.weighted_mean((logp[:, 0] > logp[:, 1]).astype(jnp.float32), w),
                      "implicit_reward_accuracy": losses.weighted_mean((h > 0).astype(jnp.float32), w),
                      "log_ratio_margin": losses.weighted_mean(h, w)}
    return loss_fn


def make_train_step(loss_fn, optimizer: optax.GradientTransformation, seed: int):
    """step(state, batch) -> (state, metrics) on a TrainState (train/state.py); `loss_fn(params, batch, rng)` gives
    (loss, aux metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    base_rng = jax.random.PRNGKey(seed)

    def step(state, batch):
        rng = jax.random.fold_in(base_rng, state["step"])
        (loss, aux), grads = grad_fn(state["params"], batch, rng)
        new_state, _, grad_norm = step_lib.apply_gradients(state, grads, loss, optimizer)
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}
    return step
