"""Self-consistency (Wang et al. 2022): sample k chain-of-thought outputs per input and vote on their answers."""
from __future__ import annotations

import collections
from typing import Sequence

import jax.numpy as jnp

from flan_jax.data.templates import extract_cot_answer
from flan_jax.evaluation import inference


def self_consistency(samples: Sequence[Sequence[str]]) -> list[str]:
    """Majority vote over the extracted answers of each example's sampled CoT outputs.

    `samples[i]` are the k decoded outputs for example i. Ties go to the answer reached first; empty extracted
    answers do not vote (an example whose samples are all empty gets "").
    """
    voted = []
    for outputs in samples:
        answers = [a for a in (extract_cot_answer(o) for o in outputs) if a]
        counts = collections.Counter(answers)
        voted.append(max(answers, key=lambda a: (counts[a], -answers.index(a))) if answers else "")
    return voted


def sample_self_consistency(config, params, encoder_input_tokens, *, vocabulary, rng, num_samples: int = 8,
                            temperature: float = 0.7, max_decode_len: int = 128, top_k: int = 0,
                            top_p: float = 1.0) -> tuple[list[str], list[list[str]]]:
    """Draws `num_samples` CoT outputs per input with sample_decode and votes; returns (answers, samples).

    encoder_input_tokens: int32 [B, L]. The B inputs are repeated k times in one decode batch (rows i*k..i*k+k-1
    belong to input i), so one call samples everything.
    """
    if num_samples < 1:
        raise ValueError(f"sample_self_consistency: num_samples must be >= 1, got {num_samples}")
    tokens = jnp.repeat(jnp.asarray(encoder_input_tokens, jnp.int32), num_samples, axis=0)
    model = inference.InferenceModel(config, params, vocabulary)
    outputs = model.sample(tokens, max_decode_len, rng, temperature=temperature, top_k=top_k, top_p=top_p)
    texts = [o.text for o in inference.decode_rows(vocabulary, outputs)]
    samples = [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(texts) // num_samples)]
    return self_consistency(samples), samples
