"""Text in, text out for the generation pipeline: batched sampling and option scoring through
flan_jax.evaluation.inference, the one inference path of the package.

Batches have a fixed row count and input widths are multiples of 32, so a run compiles a handful of shapes. Prompts
longer than `max_input_length` keep their end (where the model continues) and are counted in `truncated_prompts`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from flan_jax.evaluation import inference


@dataclasses.dataclass
class TextModel:
    config: Any            # the model config (hashable; a static jit argument)
    params: Any
    vocabulary: Any        # a seqio.Vocabulary
    max_input_length: int
    batch_size: int = 8
    truncated_prompts: int = 0

    @property
    def model(self) -> inference.InferenceModel:
        return inference.InferenceModel(self.config, self.params, self.vocabulary)

    def _batches(self, texts: Sequence[str]):
        """inference.Batch of the texts: batch_size rows, the width the longest row of the batch rounded up to 32."""
        rows, truncated = inference.encode_prompts(self.vocabulary, texts, self.max_input_length)
        self.truncated_prompts += truncated
        for real, padded in inference.fixed_batches(len(rows), self.batch_size):
            width = inference.round_up(max(len(rows[i]) for i in real), 32, self.max_input_length)
            yield real, padded, inference.pad_rows([rows[i] for i in padded], width, self.vocabulary.pad_id)

    def generate(self, prompts: Sequence[str], max_decode_len: int, rng: jax.Array, temperature: float = 0.0,
                 top_p: float = 1.0) -> list[tuple[str, bool]]:
        """(continuation, cut_off) per prompt; cut_off means no EOS within max_decode_len tokens. Batch b samples
        with fold_in(rng, index of its first prompt)."""
        model = self.model
        decode = lambda tokens, real: model.sample(tokens, max_decode_len, jax.random.fold_in(rng, int(real[0])),
                                                   temperature=temperature, top_p=top_p)
        decoded = inference.generate(self.vocabulary, decode, self._batches(list(prompts)), len(prompts))
        return [(o.text, not o.ended) for o in decoded]

    def option_scores(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """[len(prompts), len(options)] log-likelihood of each option (the same options for every prompt)."""
        if not prompts:
            return np.zeros((0, len(options)))
        encoded = inference.encode_options(self.vocabulary, options)
        scores = inference.option_scores(self.model.rank, self._batches(list(prompts)), [encoded] * len(prompts),
                                         max(len(e) for e in encoded), self.vocabulary.pad_id)
        return scores.astype(np.float32)   # the model's precision: the scores are float32 log-likelihoods
