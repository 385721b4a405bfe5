"""PPO rollouts for either model family: sample responses with our decoder, then score every response token under
the policy (log-prob, entropy, value) and the frozen SFT reference (log-prob), through the model interface only.

A response is laid out as the family trains on (prompt, target) pairs: T5 encodes the prompt and decodes the response;
a decoder-only model reads BOS ++ prompt ++ response as one prefix-LM row and the response part is sliced out. The value
of the state before token t is read from the hidden state that predicts token t (models.hidden_states), through a
linear value head.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax import models
from flan_jax.data.vocabularies import EOS_ID
from flan_jax.evaluation import inference
from flan_jax.models import lm_inputs
from flan_jax.train.rl import ppo_math

# (prompt tokens [B, Lin], response tokens [B, Lt], reference answers (list of B str)) -> scores [B] float32
RewardFn = Callable[[np.ndarray, np.ndarray, list], np.ndarray]


def response_features(config, prompts: jax.Array, responses: jax.Array) -> dict:
    """The family's batch that predicts `responses` [B, Lt] given `prompts` [B, Lin] (both right-padded)."""
    if models.is_encoder_decoder(config):
        return {'encoder_input_tokens': prompts, 'decoder_input_tokens': models.shift_right(responses),
                'decoder_target_tokens': responses}
    features = lm_inputs.prompt_and_targets(prompts, responses)
    return {k: v for k, v in features.items()}


def response_part(config, values: jax.Array, features: dict, length: int) -> jax.Array:
    """Per-position values of the whole row -> the [B, Lt, ...] positions that predict the response."""
    if models.is_encoder_decoder(config):
        return values
    return lm_inputs.target_part(values, features, length)


def _model_batch(features: dict) -> dict:
    return {k: v for k, v in features.items() if k != 'prompt_length'}


def response_logits(config, params, prompts, responses) -> jax.Array:
    """Logits [B, Lt, V] of each response token."""
    features = response_features(config, prompts, responses)
    logits = models.forward(config, params, _model_batch(features))
    return response_part(config, logits, features, responses.shape[1])


def response_hidden(config, params, prompts, responses) -> jax.Array:
    """Final hidden states [B, Lt, emb_dim] at the positions that predict each response token."""
    features = response_features(config, prompts, responses)
    hidden = models.hidden_states(config, params, _model_batch(features))
    return response_part(config, hidden, features, responses.shape[1])


def init_value_head(config, bias: float = 0.0) -> dict:
    """A linear value head, zero kernel: every value starts at `bias` (e.g. the mean reward of the SFT policy)."""
    return {'kernel': jnp.zeros((config.emb_dim,), jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}


def values_from_hidden(value_head: dict, hidden: jax.Array) -> jax.Array:
    return hidden @ value_head['kernel'] + value_head['bias']


def policy_outputs(config, params: dict, prompts, responses, value_gradient_to_policy: bool = False):
    """params = {'policy': model params, 'value_head': ...} -> (token log-probs, entropies, values), each [B, Lt].

    value_gradient_to_policy=False reads the values off stop-gradient hidden states: the value loss then trains the
    head only and cannot move the policy (a separate value function on the policy's features)."""
    logits = response_logits(config, params['policy'], prompts, responses)
    hidden = response_hidden(config, params['policy'], prompts, responses)
    if not value_gradient_to_policy:
        hidden = jax.lax.stop_gradient(hidden)
    return (ppo_math.token_log_probs(logits, responses), ppo_math.token_entropy(logits),
            values_from_hidden(params['value_head'], hidden))


@functools.partial(jax.jit, static_argnames=('config',))
def reference_log_probs(config, reference_params, prompts, responses) -> jax.Array:
    return ppo_math.token_log_probs(response_logits(config, reference_params, prompts, responses), responses)


_policy_outputs = jax.jit(policy_outputs, static_argnames=('config',))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_decode_len: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = EOS_ID   # the vocabulary's: pass special_ids(vocab).eos for a vocabulary with another EOS


def sample(config, policy_params, prompts, rng, sampling: SamplingConfig) -> jax.Array:
    """Responses [B, max_decode_len] drawn from the policy (0 after each row's EOS); temperature 0 is greedy."""
    return inference.sample_tokens(config, policy_params, prompts, sampling.max_decode_len, rng,
                                   temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                   eos_id=sampling.eos_id)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One batch of episodes, every array [B, Lt] except scores [B]; what the PPO epochs train on."""
    prompts: jax.Array
    responses: jax.Array
    mask: jax.Array
    old_log_probs: jax.Array
    reference_log_probs: jax.Array
    old_values: jax.Array
    scores: jax.Array
    kl: jax.Array
    advantages: jax.Array
    returns: jax.Array

    def arrays(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@functools.partial(jax.jit, static_argnames=('gamma', 'lam', 'whiten'))
def _advantages(scores, log_probs, ref_log_probs, values, mask, beta, gamma, lam, whiten):
    kl = ppo_math.per_token_kl(log_probs, ref_log_probs, mask)
    rewards = ppo_math.shaped_rewards(scores, kl, mask, beta)
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = ppo_math.masked_whiten(advantages, mask)
    return kl, advantages, returns


def collect(config, params: dict, reference_params, prompts: np.ndarray, references: list, rng,
            reward_fn: RewardFn, beta: float, sampling: SamplingConfig, gamma: float, lam: float,
            whiten_advantages: bool = True) -> Rollout:
    """Sample one response per prompt, score it, and compute the KL-shaped rewards' advantages and returns."""
    prompts = jnp.asarray(prompts)
    responses = sample(config, params['policy'], prompts, rng, sampling)
    mask = ppo_math.response_mask(responses, sampling.eos_id)
    log_probs, _, values = _policy_outputs(config, params, prompts, responses)
    ref_log_probs = reference_log_probs(config, reference_params, prompts, responses)
    scores = jnp.asarray(reward_fn(np.asarray(prompts), np.asarray(responses), references), jnp.float32)
    kl, advantages, returns = _advantages(scores, log_probs, ref_log_probs, values, mask, jnp.float32(beta),
                                          gamma, lam, whiten_advantages)
    return Rollout(prompts, responses, mask, log_probs, ref_log_probs, values * mask, scores, kl, advantages,
                   returns)
