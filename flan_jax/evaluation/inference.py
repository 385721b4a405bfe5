"""Inference for every caller (the evaluator, the eval suites, Self-Instruct, self-consistency, RL rollouts): texts to
padded token batches, option ranking, decoding, and output ids back to text.

  tokens   encode_prompts / encode_options (EOS-terminated ids), pad_rows / pad_options (int32 arrays), the width
           rules round_up / bucket_width / pow2_at_least, and longest (the last non-pad column)
  batches  fixed_batches (a fixed row count; filler rows repeat the batch's first row) and ladder_batches (rows
           sorted by length, widths from a ladder, rows per batch from a token budget; filler repeats the last row)
  model    greedy_tokens / sample_tokens (flan_jax.models.decoding) and rank_scores (rank classification,
           flan_jax.evaluation.scoring); InferenceModel binds a config, params and vocabulary to them
  driving  option_scores and generate run a sequence of batches, dispatching every batch before reading any back
  text     cut_at_eos, tokens_to_text, decode_rows

EOS and padding ids come from the vocabulary (flan_jax.data.vocabularies.special_ids). Filler rows and padding never
change a real row's result: padding is masked, and the rows of a batch do not interact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.data.vocabularies import EOS_ID, PAD_ID, SpecialIds, special_ids
from flan_jax.evaluation import scoring
from flan_jax.models import decoding

# (real row indices, padded row indices (real ones first, then filler), int32 tokens [len(padded), width])
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


# --- tokens ----------------------------------------------------------------------------------------------------------
def encode_prompts(vocab, texts: Iterable[str], max_len: int) -> tuple[list[list[int]], int]:
    """(EOS-terminated ids per text, how many were too long). A text longer than max_len keeps its last tokens: the
    end is where the test input sits and where the model continues."""
    eos = special_ids(vocab).eos
    rows, truncated = [], 0
    for text in texts:
        ids = list(vocab.encode(text))
        if len(ids) + 1 > max_len:
            ids, truncated = ids[len(ids) + 1 - max_len:], truncated + 1
        rows.append(ids + [eos])
    return rows, truncated


def encode_options(vocab, options: Iterable[str], max_len: Optional[int] = None) -> list[list[int]]:
    """EOS-terminated ids of each option; with max_len, an option keeps its first max_len - 1 tokens."""
    eos = special_ids(vocab).eos
    keep = None if max_len is None else max_len - 1
    return [list(vocab.encode(o))[:keep] + [eos] for o in options]


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int = PAD_ID) -> np.ndarray:
    """int32 [len(rows), width]: each row cut to width, then padded."""
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        row = np.asarray(row, np.int32)[:width]
        out[i, :len(row)] = row
    return out


def pad_options(option_rows: Sequence[Sequence[Sequence[int]]], num_options: int, width: int,
                pad_id: int = PAD_ID) -> np.ndarray:
    """int32 [len(option_rows), num_options, width]; absent options are all padding (rank_scores scores them 0)."""
    out = np.full((len(option_rows), num_options, width), pad_id, np.int32)
    for i, options in enumerate(option_rows):
        for j, ids in enumerate(options):
            out[i, j, :len(ids)] = ids
    return out


def round_up(length: int, multiple: int, limit: int) -> int:
    """length rounded up to a multiple, at most limit and at least 1."""
    return max(1, min(limit, -(-length // multiple) * multiple))


WIDTH_RATIO = 2 ** 0.25


def bucket_width(length: int, limit: int) -> int:
    """The smallest ladder width >= length: multiples of 64 near 64 * 2^(i/4) (64, 128, ..., 1024, 1280, 1472, 1728,
    2048, ...), capped at limit (itself a width). About 2^(1/4) apart: little padding, a handful of compiled shapes."""
    i = 0
    while True:
        width = min(limit, -(-int(64 * WIDTH_RATIO ** i) // 64) * 64)
        if width >= length or width == limit:
            return width
        i += 1


def pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n - 1).bit_length()))


def longest(tokens: np.ndarray, pad_id: int = PAD_ID) -> int:
    """1 + the last column of [N, L] tokens holding a non-pad id in any row (0 when all is padding)."""
    real = tokens != pad_id
    return int(np.max(np.where(real.any(1), tokens.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)))


# --- batches ---------------------------------------------------------------------------------------------------------
def fixed_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(real indices, padded indices) of batch_size rows over range(n); filler rows repeat the batch's first row."""
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        yield idx, np.pad(idx, (0, batch_size - len(idx)), constant_values=idx[0])


def ladder_batches(rows: Sequence[Sequence[int]], limit: int, rows_per_batch: Callable[[int], int],
                   pad_id: int = PAD_ID) -> Iterator[Batch]:
    """Batches of rows sorted by length: width = bucket_width of the longest row, rows_per_batch(width) rows (one
    shape per width); a short batch is filled with repeats of its last row."""
    order = np.argsort([len(r) for r in rows], kind="stable")
    width_of = lambda i: bucket_width(len(rows[i]), limit)
    start = 0
    while start < len(order):
        idx = order[start:start + rows_per_batch(width_of(order[start]))]
        idx = idx[:rows_per_batch(width_of(idx[-1]))]     # the longest row may need a wider, shorter batch
        width = width_of(idx[-1])
        padded = np.pad(idx, (0, rows_per_batch(width) - len(idx)), mode="edge")
        yield idx, padded, pad_rows([rows[i] for i in padded], width, pad_id)
        start += len(idx)


# --- model -----------------------------------------------------------------------------------------------------------
def greedy_tokens(config, params, tokens, max_decode_len: int, eos_id: int = EOS_ID) -> jax.Array:
    """Argmax continuation [B, max_decode_len] of tokens [B, L]; 0 after each row's EOS. Dispatched, not read back."""
    return decoding.greedy_decode(config, params, tokens, max_decode_len=max_decode_len, eos_id=eos_id)


def sample_tokens(config, params, tokens, max_decode_len: int, rng: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID) -> jax.Array:
    """Sampled continuation [B, max_decode_len] (temperature 0: argmax); 0 after each row's EOS."""
    return decoding.sample_decode(config, params, jnp.asarray(tokens), max_decode_len, rng, temperature=temperature,
                                  top_k=top_k, top_p=top_p, eos_id=eos_id)


def rank_scores(config, params, tokens, option_tokens) -> jax.Array:
    """[B, K] log-likelihood of option_tokens [B, K, Lt] given tokens [B, L] (the encoder runs once per input)."""
    return scoring.rank_classification_scores(config, params, tokens, option_tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class InferenceModel:
    """A model ready to run on text: its config (hashable, a static jit argument), params and vocabulary."""
    config: Any
    params: Any
    vocabulary: Any

    @property
    def ids(self) -> SpecialIds:
        return special_ids(self.vocabulary)

    def greedy(self, tokens, max_decode_len: int) -> jax.Array:
        return greedy_tokens(self.config, self.params, tokens, max_decode_len, self.ids.eos)

    def sample(self, tokens, max_decode_len: int, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> jax.Array:
        return sample_tokens(self.config, self.params, tokens, max_decode_len, rng, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_id=self.ids.eos)

    def rank(self, tokens, option_tokens) -> jax.Array:
        return rank_scores(self.config, self.params, tokens, option_tokens)


# --- driving ---------------------------------------------------------------------------------------------------------
def option_scores(rank_fn: Callable, batches: Iterable[Batch], option_rows: Sequence[Sequence[Sequence[int]]],
                  width: int, pad_id: int = PAD_ID) -> np.ndarray:
    """[N, K] log-likelihood of every example's options (K = most options; absent ones -inf).

    rank_fn(tokens [B, L], option tokens [B, K, width]) -> [B, K]; option_rows[i] are example i's EOS-terminated
    options; batches must cover every example once."""
    k = max(len(o) for o in option_rows)
    out, pending = np.full((len(option_rows), k), -np.inf), []
    for real, padded, tokens in batches:
        options = pad_options([option_rows[i] for i in padded], k, width, pad_id)
        pending.append((real, rank_fn(tokens, options)))   # dispatched; read back below
    for real, scores in pending:
        scores = np.asarray(scores)
        for row, i in enumerate(real):
            out[i, :len(option_rows[i])] = scores[row, :len(option_rows[i])]
    return out


def argmax_options(scores: np.ndarray, options: Sequence[Sequence]) -> list:
    """Each example's highest-scoring option (scores [N, K]; only the first len(options[i]) columns count)."""
    return [opts[int(np.argmax(scores[i, :len(opts)]))] for i, opts in enumerate(options)]


@dataclasses.dataclass(frozen=True)
class Decoded:
    text: str
    num_tokens: int        # generated tokens before EOS
    ended: bool            # EOS came within the decode length


def generate(vocab, decode_fn: Callable, batches: Iterable[Batch], n: int) -> list[Decoded]:
    """Decoded output of rows 0..n-1: decode_fn(tokens [B, L], real indices) -> output ids [B, T] for each batch."""
    pending = [(real, decode_fn(tokens, real)) for real, _, tokens in batches]
    out: list = [None] * n
    for real, tokens in pending:
        for i, decoded in zip(real, decode_rows(vocab, np.asarray(jax.device_get(tokens))[:len(real)])):
            out[i] = decoded
    return out


# --- text ------------------------------------------------------------------------------------------------------------
def cut_at_eos(ids: Iterable[int], eos_id: int) -> tuple[list[int], bool]:
    """(the ids before the first EOS, whether there was one)."""
    ids = [int(t) for t in np.asarray(ids).reshape(-1)]
    if eos_id in ids:
        return ids[:ids.index(eos_id)], True
    return ids, False


def tokens_to_text(vocab, ids: Iterable[int]) -> str:
    """The text of ids up to (not including) the first EOS; padding dropped."""
    ids, _ = cut_at_eos(ids, special_ids(vocab).eos)
    pad = vocab.pad_id
    return vocab.decode([t for t in ids if t != pad])


def decode_rows(vocab, tokens: np.ndarray) -> list[Decoded]:
    """Decoded of every row of output ids [B, T]."""
    ids = special_ids(vocab)
    out = []
    for row in np.asarray(tokens):
        kept, ended = cut_at_eos(row, ids.eos)
        out.append(Decoded(vocab.decode([t for t in kept if t != ids.pad]), len(kept), ended))
    return out
