"""The arithmetic of GRPO as plain functions: group-normalized advantages, the k3 KL estimate, per-token loss weights
and the clipped objective. Arrays are [rows, length] with a 0/1 (or weight) mask; padding enters no sum or mean.

Sources: Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300, section 4.1: GRPO), Schulman 2020 ("Approximating KL
divergence": the k3 estimator), Liu et al. 2025 (Dr. GRPO, arXiv:2503.20783: no length or std normalization).

For a prompt q with G sampled responses o_1..o_G and scalar rewards r_1..r_G, every token of o_i gets the advantage
A_i = (r_i - mean(r)) / std(r) (std: the population std of the group; Dr. GRPO: A_i = r_i - mean(r)). The objective,
maximised, is the mean over responses of the mean over each response's tokens of
    min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i) - beta * k3_t,
ratio_t = pi(o_t) / pi_old(o_t), k3_t = ref(o_t)/pi(o_t) - log(ref(o_t)/pi(o_t)) - 1 (>= 0, unbiased for KL(pi || ref)
on samples from pi). Dr. GRPO replaces each response's 1/|o_i| by 1/max_len, the same for every response, so long and
short responses weigh the same per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "dr_grpo")


def group_advantages(scores: jax.Array, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> jax.Array:
    """[P * G] rewards, each prompt's G responses contiguous -> [P * G] advantages (reward minus its group's mean,
    divided by the group's population std + eps when scale_by_std). A group of equal rewards gets 0 everywhere."""
    groups = jnp.reshape(jnp.asarray(scores, jnp.float32), (-1, group_size))
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (jnp.std(groups, axis=1, keepdims=True) + eps)
    return jnp.reshape(centred, (-1,))


def k3_kl(log_probs: jax.Array, reference_log_probs: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref) on tokens sampled from pi: exp(d) - d - 1, d = log ref - log pi."""
    d = reference_log_probs - log_probs
    return jnp.exp(d) - d - 1.0


def token_weights(mask: jax.Array, loss_type: str, max_len: int) -> jax.Array:
    """[B, L] weight of each token in the loss sum: GRPO 1 / (B * |o_i|), Dr. GRPO 1 / (B * max_len); 0 on padding."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo.loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    mask = jnp.asarray(mask, jnp.float32)
    rows = mask.shape[0]
    if loss_type == "dr_grpo":
        return mask / (rows * max_len)
    return mask / (rows * jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))


def objective(log_probs, old_log_probs, reference_log_probs, advantages, weights, clip_eps: float, kl_coef: float):
    """GRPO's loss (the negated objective) -> (loss, metrics). All arrays [..., L] per token: advantages carry each
    token's response advantage, weights come from token_weights (so the loss is a weighted token sum). kl_coef 0 drops
    the KL term (reference_log_probs is then not read)."""
    ratio = jnp.exp(log_probs - old_log_probs)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
    mask = (weights > 0).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {"policy_objective": jnp.sum(weights * surrogate),
               "clip_fraction": jnp.sum(mask * (jnp.abs(ratio - 1.0) > clip_eps)) / tokens}
    per_token = surrogate
    if kl_coef:
        kl = k3_kl(log_probs, reference_log_probs)
        per_token = surrogate - kl_coef * kl
        metrics["kl_k3"] = jnp.sum(mask * kl) / tokens
    return -jnp.sum(weights * per_token), metrics
