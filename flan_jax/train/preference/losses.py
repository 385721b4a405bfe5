"""Pairwise preference losses on per-pair scores; every loss is a weighted mean over pairs (weight 0 = padding).

Reward model (Ouyang et al. 2022): -log sigmoid(r_chosen - r_rejected).
DPO (Rafailov et al. 2023): -log sigmoid(beta * h), h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
IPO (Azar et al. 2023): (h - 1 / (2 tau))^2 on the same h; tau plays beta's part.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flan_jax.data.vocabularies import PAD_ID

LOSS_TYPES = ("sigmoid", "ipo")


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def reward_loss(r_chosen: jax.Array, r_rejected: jax.Array, weights: jax.Array) -> jax.Array:
    return weighted_mean(-jax.nn.log_sigmoid(r_chosen - r_rejected), weights)


def log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> jax.Array:
    """h: how much more the policy than the reference prefers the chosen response (sequence log-probs)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, *, beta: float,
             loss_type: str = "sigmoid") -> jax.Array:
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type == "sigmoid":
        per_pair = -jax.nn.log_sigmoid(beta * h)
    elif loss_type == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"DPO loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    return weighted_mean(per_pair, weights)


def sequence_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum over real (non-padding) target tokens of log p(token) [N] from logits [N, L, V] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets != PAD_ID, picked, 0.0), axis=-1)
