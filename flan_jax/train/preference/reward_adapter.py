"""The learned reward model (flan_jax/train/preference/reward.py) as PPO's reward function.

Its checkpoint is a reward-model run's train state; only `params` ({"backbone", "head"}) is read back. The score is
read, as in reward-model training, at the response's last real token (its EOS). A policy sample can differ from the
reward model's training responses in two ways: it can stop at max_decode_len without EOS (the score is then read at
its last token), and it can hold a sampled id 0 before its EOS, which `scoring.eos_positions` (counting non-zero
ids) would misplace; the last position here comes from ppo_math.response_mask instead.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax import models
from flan_jax.checkpoints import run_dir
from flan_jax.data.vocabularies import EOS_ID
from flan_jax.train import checkpointing
from flan_jax.train.preference import loop as preference_loop, reward, scoring
from flan_jax.train.rl import ppo_math


def load_reward_params(reward_model_dir: str, model_cfg) -> dict:
    """{"backbone", "head"} of a reward-model run's latest checkpoint (or of a checkpoint_<step> dir)."""
    directory, step = preference_loop.resolve_checkpoint(reward_model_dir)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = {"backbone": models.param_shapes(model_cfg), "head": jax.eval_shape(lambda: reward.init_head(model_cfg))}
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    path = os.path.join(directory, f"{checkpointing.STEP_PREFIX}_{step}")
    try:   # run_dir checks every parameter's name and shape first: a partial restore would leave a missing one empty
        return run_dir.restore_params(path, abstract)
    except Exception as e:  # orbax raises several types for a tree that does not fit
        raise ValueError(f"ppo_run.reward_model_dir={reward_model_dir}: {path} is not a reward model of the gin "
                         f"model config ({type(e).__name__}: {str(e).splitlines()[0][:400]})") from e


@functools.partial(jax.jit, static_argnames=("config", "eos_id"))
def score_responses(config, params: dict, prompts: jax.Array, responses: jax.Array,
                    eos_id: int = EOS_ID) -> jax.Array:
    """[B] reward-model scores of responses [B, Lt] (0 after EOS) to prompts [B, Lin]."""
    hidden = scoring.response_hidden_states(config, params["backbone"], prompts, responses[:, None, :])
    length = jnp.sum(ppo_math.response_mask(responses, eos_id), axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(hidden, jnp.maximum(length - 1, 0)[:, None, None], axis=1)[:, 0]
    return last @ params["head"]["kernel"] + params["head"]["bias"]


def learned_reward(reward_model_dir: str, model_cfg, eos_id: int = EOS_ID):
    """RewardFn of the reward model in reward_model_dir (references are not used); eos_id: the policy vocabulary's,
    which ends the sampled responses."""
    params = load_reward_params(reward_model_dir, model_cfg)

    def reward_fn(prompts, responses, references):
        del references
        return np.asarray(score_responses(model_cfg, params, jnp.asarray(prompts), jnp.asarray(responses),
                                                 eos_id))
    return reward_fn
