"""Autoregressive decoding with a key/value cache for any model family: greedy, sampling, beam search.

The family's decode_start consumes the inputs once (T5: the encoder and cross-attention K/V; a decoder-only
model: a prefill of BOS ++ inputs) and returns the first logits; decode_step feeds one token per row and writes
its keys/values into the pre-allocated cache. Decoding stops when every row has emitted EOS (or at
max_decode_len); tokens after a row's EOS are 0 (padding). All public functions are jitted with the
config and the length/strategy arguments static.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.models import base

NEG_INF = -1.0e7   # finite "impossible" score: keeps beam arithmetic free of inf - inf


def _check_args(encoder_input_tokens, max_decode_len: int):
    if encoder_input_tokens.ndim != 2:
        raise ValueError(f'encoder_input_tokens must be [batch, length], got shape {encoder_input_tokens.shape}')
    if max_decode_len <= 0:
        raise ValueError(f'max_decode_len must be positive, got {max_decode_len}')


def _token_loop(config, params, encoder_input_tokens, max_decode_len: int, eos_id: int,
                choose: Callable, rng) -> jax.Array:
    """Shared greedy/sampling loop; choose(logits [B, V], rng) -> tokens [B]."""
    _check_args(encoder_input_tokens, max_decode_len)
    batch = encoder_input_tokens.shape[0]
    fam = base.family(config)
    logits, fixed, cache = fam.decode_start(config, params, encoder_input_tokens, 1, max_decode_len)

    def cond(state):
        index, _, _, done, _ = state
        return (index < max_decode_len) & ~jnp.all(done)

    def body(state):
        index, logits, cache, done, out = state
        chosen = jnp.where(done, 0, choose(logits, jax.random.fold_in(rng, index)).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, chosen[:, None], (0, index))
        logits, cache = fam.decode_step(config, params, chosen, index, fixed, cache, 1)
        return index + 1, logits, cache, done | (chosen == eos_id), out

    init = (jnp.int32(0), logits, cache, jnp.zeros((batch,), bool), jnp.zeros((batch, max_decode_len), jnp.int32))
    return jax.lax.while_loop(cond, body, init)[-1]


@functools.partial(jax.jit, static_argnames=('config', 'max_decode_len', 'eos_id'))
def greedy_decode(config, params, encoder_input_tokens: jax.Array, max_decode_len: int,
                  eos_id: int = 1) -> jax.Array:
    """Argmax decoding -> int32 [B, max_decode_len]; positions after a row's EOS are 0."""
    return _token_loop(config, params, encoder_input_tokens, max_decode_len, eos_id,
                       lambda logits, _: jnp.argmax(logits, axis=-1), jax.random.PRNGKey(0))


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Temperature scaling, then keep the top_k largest (0 = all), then the smallest set with mass >= top_p."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)   # the first token is always kept
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=('config', 'max_decode_len', 'eos_id', 'temperature', 'top_k',
                                             'top_p'))
def sample_decode(config, params, encoder_input_tokens: jax.Array, max_decode_len: int,
                  rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  eos_id: int = 1) -> jax.Array:
    """Ancestral sampling with temperature / top-k / top-p; temperature 0 means greedy."""
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f'sample_decode: bad temperature={temperature}, top_k={top_k} or top_p={top_p}')
    if top_k > config.vocab_size:
        raise ValueError(f'sample_decode: top_k={top_k} exceeds vocab_size={config.vocab_size}')
    if temperature == 0.0:
        choose = lambda logits, _: jnp.argmax(logits, axis=-1)
    else:
        choose = lambda logits, key: jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))
    return _token_loop(config, params, encoder_input_tokens, max_decode_len, eos_id, choose, rng)


def brevity_penalty(length, alpha: float):
    """GNMT length normalisation ((5 + length) / 6) ** alpha, as in T5X beam search."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=('config', 'max_decode_len', 'beam_size', 'length_penalty_alpha',
                                             'eos_id', 'return_scores'))
def beam_search(config, params, encoder_input_tokens: jax.Array, max_decode_len: int,
                beam_size: int = 4, length_penalty_alpha: float = 0.6, eos_id: int = 1,
                return_scores: bool = False):
    """Beam search -> best sequence per row int32 [B, max_decode_len] (and its normalised score).

    Scores are sum log p / brevity_penalty(length). Each step expands the alive beams to 2*beam_size
    candidates; those ending in EOS and ranked within the top beam_size compete for the finished set,
    the non-EOS ones for the alive set. Stops when
    no alive beam can beat the worst finished one (using the most optimistic length penalty). Rows
    with nothing finished at max_decode_len return their best alive beam.
    """
    _check_args(encoder_input_tokens, max_decode_len)
    batch, k = encoder_input_tokens.shape[0], beam_size
    if not 1 <= 2 * k <= config.vocab_size:
        raise ValueError(f'beam_search: beam_size={beam_size} must be >= 1 and <= vocab_size/2')
    fam = base.family(config)
    first_logits, fixed, cache = fam.decode_start(config, params, encoder_input_tokens, k, max_decode_len)
    max_penalty = brevity_penalty(float(max_decode_len), length_penalty_alpha)

    def gather_beams(x, beam_index):   # x [B, K', ...], beam_index [B, K] -> [B, K, ...]
        return jnp.take_along_axis(x, beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(state):
        index, _, _, alive_logp, _, fin_scores, _ = state
        best_alive = alive_logp[:, 0] / max_penalty
        worst_finished = jnp.where(fin_scores[:, -1] > NEG_INF / 2, fin_scores[:, -1], NEG_INF)
        return (index < max_decode_len) & ~jnp.all(worst_finished > best_alive)

    def body(state):
        index, logits, alive_seqs, alive_logp, fin_seqs, fin_scores, cache = state
        logp = jax.nn.log_softmax(logits).reshape(batch, k, -1)
        vocab = logp.shape[-1]
        candidates = (alive_logp[..., None] + logp).reshape(batch, k * vocab)
        cand_logp, cand_index = jax.lax.top_k(candidates, 2 * k)
        cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seqs = gather_beams(alive_seqs, cand_beam)
        cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_token[..., None], (0, 0, index))
        is_eos = cand_token == eos_id

        # Finished set: old finished + EOS candidates ranked within the top k (as in HF; this makes
        # beam_size=1 greedy), best k by normalised score.
        new_fin = jnp.where(is_eos & (jnp.arange(2 * k) < k)[None], cand_logp / brevity_penalty(index + 1.0, length_penalty_alpha), NEG_INF)
        fin_scores, fin_pick = jax.lax.top_k(jnp.concatenate([fin_scores, new_fin], axis=1), k)
        fin_seqs = gather_beams(jnp.concatenate([fin_seqs, cand_seqs], axis=1), fin_pick)

        # Alive set: best k candidates that did not emit EOS; reorder the cache rows to follow them.
        alive_logp, alive_pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand_logp), k)
        alive_seqs = gather_beams(cand_seqs, alive_pick)
        last = gather_beams(cand_token, alive_pick)
        source_rows = (gather_beams(cand_beam, alive_pick) + jnp.arange(batch)[:, None] * k).reshape(-1)
        cache = jax.tree_util.tree_map(lambda c: jnp.take(c, source_rows, axis=0), cache)
        logits, cache = fam.decode_step(config, params, last.reshape(-1), index, fixed, cache, k)
        return index + 1, logits, alive_seqs, alive_logp, fin_seqs, fin_scores, cache

    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    seqs = jnp.zeros((batch, k, max_decode_len), jnp.int32)
    init = (jnp.int32(0), first_logits, seqs, alive_logp, seqs,
            jnp.full((batch, k), NEG_INF, jnp.float32), cache)
    _, _, alive_seqs, alive_logp, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, init)

    none_finished = fin_scores[:, 0] <= NEG_INF / 2
    best = jnp.where(none_finished[:, None], alive_seqs[:, 0], fin_seqs[:, 0])
    if return_scores:
        return best, jnp.where(none_finished, alive_logp[:, 0] / max_penalty, fin_scores[:, 0])
    return best
