"""Token cross-entropy with z-loss and label smoothing, and T5X's loss normalizers (packing-aware)."""
from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp

from flan_jax.data.vocabularies import PAD_ID

# What the summed token loss is divided by, with T5X's meanings (t5x/losses.py: compute_weighted_cross_entropy and
# SpecialLossNormalizingFactor): None (or "none") leaves the weighted sum un-normalized; a number is a fixed divisor
# (e.g. 233472 = 1024 x 228 for Mesh-TF-pretrained T5); a name is computed from the batch. Names are case-insensitive,
# so T5X's enum spellings ("NUM_REAL_TARGET_TOKENS") work too.
Normalizer = Union[None, str, float]
NUM_REAL_TARGET_TOKENS = "num_real_target_tokens"    # sum of the loss weights: a token mean (our default)
NUM_TOTAL_TARGET_TOKENS = "num_total_target_tokens"  # every target slot, padding included
AVERAGE_PER_SEQUENCE = "average_per_sequence"        # each (packed) sequence weighs the same
NORMALIZER_NAMES = ("none", NUM_REAL_TARGET_TOKENS, NUM_TOTAL_TARGET_TOKENS, AVERAGE_PER_SEQUENCE)


def canonical_normalizer(normalizer: Normalizer) -> Normalizer:
    """None, a number (as float) or a lower-case name from NORMALIZER_NAMES; ValueError for anything else."""
    if normalizer is None:
        return None
    if isinstance(normalizer, str) and normalizer.lower() in NORMALIZER_NAMES:
        return None if normalizer.lower() == "none" else normalizer.lower()
    if isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        return float(normalizer)
    raise ValueError(f"loss_normalizing_factor={normalizer!r}: expected None (un-normalized sum), a number, or one "
                     f"of {NORMALIZER_NAMES}")


def has_fixed_denominator(normalizer: Normalizer) -> bool:
    """True when the denominator does not depend on the batch (None or a number)."""
    return not isinstance(canonical_normalizer(normalizer), str)


def token_cross_entropy(logits, targets, *, z_loss: float = 0.0, label_smoothing: float = 0.0):
    """Per-token loss [B, L] (cross-entropy + z_loss * logsumexp^2) and the z-loss part alone, both float32."""
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0:
        token_loss, log_z = _hard_target_loss(logits, targets, float(z_loss))
        return token_loss, z_loss * jnp.square(log_z)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    # Subtract the entropy of the soft targets so a perfect prediction has zero loss (as T5X does).
    floor = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    zl = z_loss * jnp.square(log_z)
    return -jnp.sum(soft * log_probs, axis=-1) - floor + zl, zl


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _hard_target_loss(logits, targets, z_loss: float):
    """(log_z - logit[target] + z_loss * log_z^2, log_z), with a hand-written gradient.

    Autodiff of take_along_axis scatters into a zeroed [B, L, vocab] buffer and adds it to the softmax term; here the
    gradient is one elementwise pass, softmax * (1 + 2 z log_z) - onehot, with the one-hot made by an iota compare.
    """
    return _hard_target_loss_fwd(logits, targets, z_loss)[0]


def _hard_target_loss_fwd(logits, targets, z_loss):
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (log_z - target_logit + z_loss * jnp.square(log_z), log_z), (logits, targets, log_z)


def _hard_target_loss_bwd(z_loss, residuals, cotangents):
    logits, targets, log_z = residuals
    g_loss, g_log_z = cotangents
    probs = jnp.exp(logits - log_z[..., None])
    scale = (g_loss * (1.0 + 2.0 * z_loss * log_z) + g_log_z)[..., None]
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    return probs * scale - jnp.where(onehot, g_loss[..., None], 0.0), None


_hard_target_loss.defvjp(_hard_target_loss_fwd, _hard_target_loss_bwd)


def predicted_correctly(logits, targets):
    """[B, L] bool: the target has the highest logit. A max-compare instead of argmax, which XLA:CPU runs as a slow
    two-output reduction; the two differ only on exact ties, which argmax breaks towards the lower id."""
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit >= jnp.max(logits, axis=-1)


def loss_weights_and_denominator(batch, normalizer: Normalizer):
    """Returns (per-token weights, denominator) so that loss = sum(token_loss * weights) / denominator.

    The denominator is returned un-divided so gradient accumulation can sum numerators and denominators over microbatches
    and divide once (correct token normalization across microbatches).
    """
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = (batch["decoder_target_tokens"] != PAD_ID)
    weights = weights.astype(jnp.float32)
    normalizer = canonical_normalizer(normalizer)
    if normalizer is None:
        return weights, jnp.float32(1.0)
    if normalizer == NUM_REAL_TARGET_TOKENS:
        return weights, jnp.sum(weights)
    if normalizer == NUM_TOTAL_TARGET_TOKENS:
        return weights, jnp.float32(weights.size)
    if normalizer == AVERAGE_PER_SEQUENCE:
        seg = batch.get("decoder_segment_ids")
        if seg is None:  # unpacked: each row is one sequence
            per_row = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)
            num_seq = jnp.sum(jnp.any(weights > 0, axis=-1))
            return weights / per_row, num_seq.astype(jnp.float32)
        # Packed: each (row, segment) pair is one sequence; spread its weight so every sequence counts once.
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
        seg_tokens = jnp.einsum("bqk,bk->bq", same.astype(jnp.float32), weights)
        w = jnp.where(weights > 0, weights / jnp.maximum(seg_tokens, 1e-9), 0.0)
        return w, jnp.sum(w)
    return weights, jnp.float32(normalizer)


def summed_loss(logits, batch, *, z_loss=0.0, label_smoothing=0.0, normalizer: Normalizer = NUM_REAL_TARGET_TOKENS):
    """(summed weighted loss, denominator, aux dict of summed figures) for one (micro)batch.

    aux: z_loss_sum, and correct_tokens / target_tokens over the loss positions (weight > 0)."""
    weights, denom = loss_weights_and_denominator(batch, normalizer)
    sums = weighted_sums(logits, batch["decoder_target_tokens"], weights, z_loss, label_smoothing)
    return sums[0], denom, aux_sums(sums, weights)


def weighted_sums(logits, targets, weights, z_loss, label_smoothing):
    """(sum of weighted token loss, sum of weighted z-loss, correct predictions at loss positions)."""
    token_loss, token_z = token_cross_entropy(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
    correct = predicted_correctly(logits, targets) & (weights > 0)
    return jnp.sum(token_loss * weights), jnp.sum(token_z * weights), jnp.sum(correct.astype(jnp.float32))


def aux_sums(sums, weights) -> dict:
    return {"z_loss_sum": sums[1], "correct_tokens": sums[2], "target_tokens": jnp.sum(weights > 0).astype(jnp.float32)}
