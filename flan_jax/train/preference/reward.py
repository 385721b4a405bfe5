"""Reward model: a backbone of either family plus a scalar head on its final hidden state at the response's EOS.

Where the score is read: at the EOS target position of the response. There the model has read the whole response
with teacher forcing (its decoder inputs are 0 ++ response, so that position has seen every response token by
causal attention) and, for T5, the whole prompt through cross-attention; it is the state that decides to stop. The
T5 encoder never sees the response, so its states cannot score it. For decoder-only models the same position of the
prompt ++ response row is read. The head starts at zero, so every reward is 0 before training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flan_jax import models
from flan_jax.train.preference import scoring


def init_head(config) -> dict:
    return {"kernel": jnp.zeros((config.emb_dim,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def head_logical_axes() -> dict:
    return {"kernel": ("embed",), "bias": ()}


def reward_params(config, backbone: dict) -> dict:
    return {"backbone": backbone, "head": init_head(config)}


def reward_logical_axes(config) -> dict:
    return {"backbone": models.param_logical_axes(config), "head": head_logical_axes()}


def rewards(config, params: dict, inputs: jax.Array, responses: jax.Array, *, dropout_rng=None) -> jax.Array:
    """Scalar rewards [P, K] of responses [P, K, Lt] to prompts [P, Lin]."""
    p, k, length = responses.shape
    hidden = scoring.response_hidden_states(config, params["backbone"], inputs, responses, dropout_rng=dropout_rng)
    at_eos = jnp.take_along_axis(hidden, scoring.eos_positions(responses.reshape(p * k, length))[:, None, None],
                                 axis=1)[:, 0]
    head = params["head"]
    return (at_eos @ head["kernel"] + head["bias"]).reshape(p, k)
