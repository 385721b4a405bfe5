"""A checkable reward for prompts with a known right answer (the embedded rule-based preference tasks): 1 when the
decoded response equals the reference answer (whitespace-stripped), else 0. Used to test PPO without a learned reward
model, and to measure exact match; PPO's acceptance uses the learned reward model.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def response_text(vocabulary, tokens, eos_id: int = 1) -> str:
    """Decoded response up to (not including) its first EOS; padding ids dropped."""
    ids = []
    for t in np.asarray(tokens).tolist():
        if t == eos_id:
            break
        if t > 1:
            ids.append(int(t))
    return vocabulary.decode(ids)


def exact_match_reward(vocabulary, eos_id: int = 1) -> Callable:
    """RewardFn: (prompts, responses, references) -> [B] float32 of 1.0 / 0.0."""
    def reward(prompts, responses, references):
        del prompts
        if len(responses) != len(references):
            raise ValueError(f"exact_match_reward: {len(responses)} responses but {len(references)} references")
        texts = [response_text(vocabulary, row, eos_id) for row in responses]
        return np.array([float(t.strip() == r.strip()) for t, r in zip(texts, references)], np.float32)
    return reward
