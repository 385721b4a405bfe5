"""The arithmetic of PPO for language models, as plain functions on [batch, length] arrays with a 0/1 token mask.

Sources: Schulman et al. 2017 (clipped surrogate, arXiv:1707.06347), Schulman et al. 2016 (GAE, arXiv:1506.02438),
Ziegler et al. 2019 (per-token KL penalty and the adaptive KL controller, arXiv:1909.08593), Ouyang et al. 2022
(InstructGPT: reward at the end of the response minus beta * KL per token, arXiv:2203.02155).

Token t of a response is an action; its state is the prompt and tokens < t. A row's real tokens are those with
mask 1 (the response up to and including its EOS); padding never enters a sum, a mean or the GAE recursion.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.data.vocabularies import EOS_ID


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the positions where mask is 1 (0 when the mask is empty)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked positions; padding positions come out 0."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return jnp.where(mask > 0, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def response_mask(tokens: jax.Array, eos_id: int = EOS_ID) -> jax.Array:
    """[B, L] float 0/1: the positions up to and including each row's first EOS (all of them when there is none).

    Not `tokens > 0`: a sampled id 0 before EOS is a real action, and the decoder writes 0 only after EOS.
    """
    is_eos = (tokens == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
    return (eos_before == 0).astype(jnp.float32)


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(token) at every position, [B, L] float32, from logits [B, L, V]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution at every position, [B, L] float32 (nats)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def per_token_kl(policy_logprobs: jax.Array, reference_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token sample estimate of KL(policy || reference): log pi(y_t) - log ref(y_t) for y_t ~ pi, 0 on padding.

    Its sum over a row is an unbiased estimate of the sequence KL (the k1 estimator; Ziegler et al. 2019).
    """
    return jnp.where(mask > 0, policy_logprobs - reference_logprobs, 0.0)


def sequence_kl(policy_logprobs, reference_logprobs, mask) -> jax.Array:
    """[B] the estimated KL of each row's whole response (sum over its real tokens)."""
    return jnp.sum(per_token_kl(policy_logprobs, reference_logprobs, mask), axis=-1)


def shaped_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, beta) -> jax.Array:
    """InstructGPT's per-token reward: -beta * KL_t at every real token, plus the sequence score at the last one.

    scores [B] (the reward model's score of each response), kl [B, L] from per_token_kl, mask [B, L].
    """
    mask = mask.astype(jnp.float32)
    length = jnp.sum(mask, axis=-1).astype(jnp.int32)
    is_last = jax.nn.one_hot(jnp.maximum(length - 1, 0), mask.shape[-1]) * (length > 0)[:, None]
    return (-beta * kl + scores[:, None] * is_last) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float):
    """Generalized advantage estimation over each row's real tokens -> (advantages, returns), both [B, L].

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after the last real
    token (the episode ends at EOS). returns = A + V are the value targets. Padding comes out 0.
    """
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards + gamma * next_values - values

    def backwards(next_advantage, xs):
        delta, m = xs
        advantage = (delta + gamma * lam * next_advantage) * m
        return advantage, advantage

    _, advantages = jax.lax.scan(backwards, jnp.zeros(rewards.shape[0]), (deltas.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """PPO's clipped surrogate, negated to be minimised -> (loss, clip_fraction).

    loss = -mean_t min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - old_logp). A ratio already past
    the clip in the direction the advantage pushes gets no gradient; clip_fraction is the share of tokens clipped.
    """
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = masked_mean(-jnp.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask)
    return loss, clip_fraction


def value_loss(values, old_values, returns, mask, clip_range: float):
    """PPO's clipped value loss: 0.5 * mean_t max((V - R)^2, (V_clipped - R)^2), V_clipped within old_V +- clip_range.

    Returns (loss, value_clip_fraction)."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    squared = jnp.maximum(jnp.square(values - returns), jnp.square(clipped_values - returns))
    fraction = masked_mean((jnp.abs(values - old_values) > clip_range).astype(jnp.float32), mask)
    return 0.5 * masked_mean(squared, mask), fraction


# --- KL controllers (Ziegler et al. 2019, section 2.2) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KLController:
    """beta for the KL penalty. Fixed when target is None; otherwise adaptive (Ziegler et al. 2019):

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + K_beta * e * n_steps / horizon), with K_beta = 0.1.
    """
    beta: float
    target: float | None = None
    horizon: int = 10_000
    k_beta: float = 0.1
    error_clip: float = 0.2

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"KLController.beta={self.beta}: must be >= 0")
        if self.target is not None and (self.target <= 0 or self.horizon <= 0):
            raise ValueError(f"KLController target={self.target}, horizon={self.horizon}: both must be > 0")

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, observed_kl: float, n_steps: int) -> "KLController":
        """The controller after observing the mean sequence KL of a batch of n_steps episodes."""
        if not self.adaptive:
            return self
        error = float(np.clip(observed_kl / self.target - 1.0, -self.error_clip, self.error_clip))
        beta = self.beta * (1.0 + self.k_beta * error * n_steps / self.horizon)
        return dataclasses.replace(self, beta=beta)
