"""Text in, text out: batched sampling and option scoring for the generation pipeline.

The only place in flan_jax.generation that touches the model: it calls the KV-cache decoder
(flan_jax.models.decoding.sample_decode) and rank-classification scoring (flan_jax.evaluation.scoring). Batches
are padded to a fixed row count and input lengths to multiples of 32, so a run compiles a handful of shapes.
Prompts longer than `max_input_length` keep their end (where the model continues) and are counted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from flan_jax.evaluation import scoring
from flan_jax.models import decoding

EOS, PAD = 1, 0


@dataclasses.dataclass
class TextModel:
    config: Any            # the model config (hashable; a static jit argument)
    params: Any
    vocabulary: Any        # a seqio.Vocabulary
    max_input_length: int
    batch_size: int = 8
    truncated_prompts: int = 0

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            ids = list(self.vocabulary.encode(text))
            if len(ids) > self.max_input_length - 1:
                self.truncated_prompts += 1
                ids = ids[-(self.max_input_length - 1):]
            rows.append(ids + [EOS])
        width = min(self.max_input_length, -(-max(len(r) for r in rows) // 32) * 32)
        out = np.zeros((self.batch_size, width), np.int32)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = ids
        out[len(rows):] = out[0]   # filler rows repeat the first one; their results are discarded
        return out

    def _chunks(self, items: Sequence):
        for start in range(0, len(items), self.batch_size):
            yield start, items[start:start + self.batch_size]

    def generate(self, prompts: Sequence[str], max_decode_len: int, rng: jax.Array, temperature: float = 0.0,
                 top_p: float = 1.0) -> list[tuple[str, bool]]:
        """(continuation, cut_off) per prompt; cut_off means no EOS within max_decode_len tokens."""
        results = []
        for start, chunk in self._chunks(list(prompts)):
            tokens = decoding.sample_decode(self.config, self.params, self._encode(chunk), max_decode_len,
                                            jax.random.fold_in(rng, start), temperature=temperature, top_p=top_p)
            for row in np.asarray(jax.device_get(tokens))[:len(chunk)].tolist():
                cut_off = EOS not in row
                ids = row if cut_off else row[:row.index(EOS)]
                results.append((self.vocabulary.decode([t for t in ids if t > EOS]), cut_off))
        return results

    def option_scores(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """[len(prompts), len(options)] log-likelihood of each option (the same options for every prompt)."""
        encoded = [list(self.vocabulary.encode(o)) + [EOS] for o in options]
        targets = np.zeros((self.batch_size, len(options), max(len(e) for e in encoded)), np.int32)
        for j, ids in enumerate(encoded):
            targets[:, j, :len(ids)] = ids
        scores = []
        for _, chunk in self._chunks(list(prompts)):
            batch = scoring.rank_classification_scores(self.config, self.params, self._encode(chunk), targets)
            scores.append(np.asarray(batch)[:len(chunk)])
        return np.concatenate(scores) if scores else np.zeros((0, len(options)))
