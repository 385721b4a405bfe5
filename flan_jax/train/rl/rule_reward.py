"""A checkable reward for prompts with a known right answer (the embedded rule-based preference tasks): 1 when the
decoded response equals the reference answer (whitespace-stripped), else 0. Used to test PPO without a learned reward
model, and to measure exact match; PPO's acceptance uses the learned reward model.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from flan_jax.evaluation import inference


def response_text(vocabulary, tokens) -> str:
    """Decoded response up to (not including) the vocabulary's EOS; padding ids dropped."""
    return inference.tokens_to_text(vocabulary, tokens)


def exact_match_reward(vocabulary) -> Callable:
    """RewardFn: (prompts, responses, references) -> [B] float32 of 1.0 / 0.0."""
    def reward(prompts, responses, references):
        del prompts
        if len(responses) != len(references):
            raise ValueError(f"exact_match_reward: {len(responses)} responses but {len(references)} references")
        texts = [response_text(vocabulary, row) for row in responses]
        return np.array([float(t.strip() == r.strip()) for t, r in zip(texts, references)], np.float32)
    return reward
