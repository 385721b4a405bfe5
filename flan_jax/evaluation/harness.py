"""The three request kinds of lm-evaluation-harness on a flan_jax model, over plain text, for both model families:
prompts, batches and decoding are flan_jax.evaluation.inference's, the model calls flan_jax.models'. lm-eval itself
is not imported here (flan_jax.cli.eval_harness wraps HarnessScorer in its LM class).

  loglikelihood(context, continuation)  the context is a prompt as every flan_jax caller encodes it (its ids + EOS,
      left-truncated to max_input_len): T5's encoder input, the prefix-LM decoder's bidirectional prefix. The
      continuation, its leading whitespace dropped, is the target: lm-eval puts the word-boundary space there, but a
      target starts a new sequence after the prompt's EOS, as in training ("even", never " even"). Result: the sum of
      the target's log-probabilities (EOS's included with eos=True, rank classification's convention) and whether
      every target token is the argmax given those before it.
  loglikelihood_rolling(text)  the text's ids in windows of max_target_len; each window is a target whose prompt is
      the ids before it (at most max_input_len - 1) + EOS. One definition for both families: a text that fits one
      window (and starts with no whitespace) scores exactly as loglikelihood("", text). No EOS is scored.
  generate_until(context, gen_kwargs)  greedy decoding for max_gen_toks tokens (or to EOS), cut before the first
      `until` string.

Requests that share a context share one prompt row (rank classification's layout: T5 encodes it once); a batch holds
batch_size prompts, fewer for wide ones (max_batch_tokens; the decoder-only family repeats a prompt in each of its
option rows, and each copy counts).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax import models
from flan_jax.evaluation import inference, scoring


@dataclasses.dataclass(frozen=True)
class HarnessOptions:
    batch_size: int = 16          # prompts per batch
    max_input_len: int = 1024     # longer prompts keep their last tokens
    max_target_len: int = 256     # the window of loglikelihood_rolling
    max_gen_toks: int = 256       # generate_until when a request does not set it
    max_batch_tokens: int = 8192  # fewer prompts per batch when batch_size of them would exceed this many tokens
    eos: bool = False             # score EOS after each loglikelihood continuation

    def __post_init__(self):
        for key in ("batch_size", "max_input_len", "max_target_len", "max_gen_toks", "max_batch_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r}: expected an int >= 1")
        if self.max_input_len < 2:
            raise ValueError(f"max_input_len={self.max_input_len}: a prompt needs room for a token and EOS")


@functools.partial(jax.jit, static_argnames=("config", "pad_id"))
def scores_and_greedy(config, params, tokens, option_tokens, pad_id: int = 0):
    """([B, K] summed log-likelihood, [B, K] whether each option is the greedy continuation) of option_tokens
    [B, K, Lt] given tokens [B, L]. The sums are rank classification's (scoring.rank_classification_scores)."""
    batch, num_options, length = option_tokens.shape
    targets = option_tokens.reshape(batch * num_options, length)
    logits = models.option_logits(config, params, tokens, option_tokens)
    real = targets != pad_id
    scores = jnp.sum(scoring.token_log_probs(logits, targets) * real, axis=-1)
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~real, axis=-1)
    return scores.reshape(batch, num_options), greedy.reshape(batch, num_options)


def rolling_windows(ids: Sequence[int], window: int, context: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids without EOS, target ids) covering ids once, in order: targets of `window` ids, each prompt the at
    most `context` ids before its target."""
    return [(list(ids[max(0, start - context):start]), list(ids[start:start + window]))
            for start in range(0, len(ids), window)]


def cut_at_stops(text: str, until: Iterable[str]) -> str:
    """text before the earliest of the stop strings (empty ones ignored)."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


# Requests sharing a prompt share its row up to this many; more start another row (every text's first rolling window
# has the same prompt, EOS alone).
OPTIONS_PER_ROW = 16


class HarnessScorer:
    def __init__(self, model: inference.InferenceModel, options: HarnessOptions = HarnessOptions()):
        self.model, self.opts = model, options
        self.vocab = model.vocabulary
        self.truncated = 0   # prompts longer than max_input_len so far (left-truncated)

    # --- loglikelihood ---------------------------------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        prompts = self._prompts([context for context, _ in pairs])
        eos = [self.model.ids.eos] if self.opts.eos else []
        targets = [list(self.vocab.encode(continuation.lstrip())) + eos for _, continuation in pairs]
        scores, greedy = self.score_ids(prompts, targets)
        return [(float(s), bool(g)) for s, g in zip(scores, greedy)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        eos, owner, prompts, targets = self.model.ids.eos, [], [], []
        for n, text in enumerate(texts):
            for prompt, target in rolling_windows(list(self.vocab.encode(text)), self.opts.max_target_len,
                                                  self.opts.max_input_len - 1):
                owner.append(n)
                prompts.append(prompt + [eos])
                targets.append(target)
        scores, _ = self.score_ids(prompts, targets)
        totals = np.zeros(len(texts))
        np.add.at(totals, np.asarray(owner, np.int64), scores)
        return [float(t) for t in totals]

    def score_ids(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]):
        """([N] summed log-likelihood, [N] greedy) of target ids given EOS-terminated prompt ids; pairs with the same
        prompt share a row, their targets its options."""
        if not prompts:
            return np.zeros(0), np.zeros(0, bool)
        row_of, unique, option_rows, slot = {}, [], [], []
        for prompt, target in zip(prompts, targets):
            row = row_of.get(tuple(prompt))
            if row is None or len(option_rows[row]) == OPTIONS_PER_ROW:
                row = row_of[tuple(prompt)] = len(unique)
                unique.append(list(prompt))
                option_rows.append([])
            slot.append((row, len(option_rows[row])))
            option_rows[row].append(list(target))
        # A decoder-only model repeats the prompt in every option row (T5 encodes it once): count those copies.
        copies = 1 if models.is_encoder_decoder(self.model.config) else \
            inference.pow2_at_least(max(len(o) for o in option_rows), 1)
        pending = [(real, self._dispatch(tokens, [option_rows[i] for i in padded]))
                   for real, padded, tokens in self._ladder(unique, copies)]
        by_row = {}
        for real, (scores, greedy) in pending:
            scores, greedy = np.asarray(scores), np.asarray(greedy)
            by_row.update({int(i): (scores[b], greedy[b]) for b, i in enumerate(real)})
        out_scores = np.array([by_row[r][0][j] for r, j in slot], np.float64)
        return out_scores, np.array([bool(by_row[r][1][j]) for r, j in slot])

    def _dispatch(self, tokens, options):
        """Scores of one batch, dispatched: options padded to a power of two in count and length (few shapes)."""
        k = inference.pow2_at_least(max(len(opts) for opts in options), 1)
        width = inference.pow2_at_least(max(len(t) for opts in options for t in opts), 8)
        option_tokens = inference.pad_options(options, k, width, self.model.ids.pad)
        return scores_and_greedy(self.model.config, self.model.params, tokens, option_tokens, self.model.ids.pad)

    # --- generate_until --------------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Greedy text per (context, gen_kwargs); requests with the same max_gen_toks decode together."""
        lengths = [int(kwargs.get("max_gen_toks") or self.opts.max_gen_toks) for _, kwargs in requests]
        if any(kwargs.get("do_sample") for _, kwargs in requests):
            logging.warning("flan_jax harness: do_sample requested; decoding greedily")
        out = [""] * len(requests)
        for length in sorted(set(lengths)):
            members = [n for n, m in enumerate(lengths) if m == length]
            rows = self._prompts([requests[n][0] for n in members])
            decoded = inference.generate(self.vocab, lambda tokens, _: self.model.greedy(tokens, length),
                                         self._ladder(rows), len(rows))
            for n, d in zip(members, decoded):
                until = requests[n][1].get("until") or []
                out[n] = cut_at_stops(d.text, [until] if isinstance(until, str) else until)
        return out

    # --- shared ----------------------------------------------------------------------------------------------------
    def _prompts(self, texts: Sequence[str]) -> list[list[int]]:
        rows, truncated = inference.encode_prompts(self.vocab, texts, self.opts.max_input_len)
        self.truncated += truncated
        return rows

    def _ladder(self, rows, copies: int = 1):
        """inference.Batch of prompt rows: at most batch_size, and max_batch_tokens over width x copies of the row."""
        per_batch = lambda width: max(1, min(self.opts.batch_size, self.opts.max_batch_tokens // (width * copies)))
        return inference.ladder_batches(rows, self.opts.max_input_len, per_batch, self.model.ids.pad)
