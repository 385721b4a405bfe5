"""The output head and loss on the loss positions only, in chunks, with the gradient formed chunk by chunk.

A decoder-only row's loss covers few of its positions (the targets of prefix-LM rows: ~5-25% on Flan-like data), and
the head is the largest matmul of a small model. `summed_loss_from_hidden` moves each row's loss positions to the
front (a per-row sort: on a batch-sharded mesh it stays on the row's device), then runs the head on chunks of
`chunk` positions per row, for as many chunks as the busiest row needs: a loop with a data-dependent trip count.

Such a loop has no reverse-mode derivative, so the gradient is made in the forward pass (`jax.custom_vjp`): each
chunk's logits are differentiated on the spot (`jax.vjp`) and the head-parameter gradients summed; the backward
pass only scales them by the incoming cotangent. Nothing the size of the head's weights is created per chunk,
where a `lax.cond` per chunk made every skipped chunk add a zero gradient of the head's size (~65 MB for a 32k
vocabulary at d 512) in the backward pass. The head's closed-over parameters are made explicit with
`jax.closure_convert`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flan_jax.train import loss as loss_lib


def summed_loss_from_hidden(project, hidden, batch, *, chunk: int, z_loss=0.0, label_smoothing=0.0,
                            normalizer: loss_lib.Normalizer = loss_lib.NUM_REAL_TARGET_TOKENS):
    """loss.summed_loss(project(hidden), batch), with the head run only where the loss needs it.

    hidden: [B, L, d], the states `project` maps to logits. Exact for every batch: no loss position is dropped and
    the sums equal summed_loss's up to float summation order. Differentiable in the summed loss (the first
    output); the aux figures are metrics and carry no gradient.
    """
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"summed_loss_from_hidden: chunk={chunk!r}: expected a positive int")
    weights, denom = loss_lib.loss_weights_and_denominator(batch, normalizer)
    is_loss = weights > 0
    order = jnp.argsort(~is_loss, axis=1, stable=True)            # loss positions first, in order
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    hidden, targets, weights = take(hidden), take(batch["decoder_target_tokens"]), take(weights)
    pad = -hidden.shape[1] % chunk     # whole chunks: a dynamic slice past the end would be moved back, not cut
    if pad:
        widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        hidden, targets, weights = widen(hidden), widen(targets), widen(weights)
    busiest = jnp.max(jnp.sum(is_loss, axis=1))
    num_chunks = (busiest + chunk - 1) // chunk
    head, trained, fixed = _split_consts(*jax.closure_convert(project, hidden[:, :chunk]))
    total, z_sum, correct = _chunked_sums(head, chunk, float(z_loss), float(label_smoothing), trained, fixed,
                                          hidden, targets, weights, num_chunks)
    sums = (total, jax.lax.stop_gradient(z_sum), jax.lax.stop_gradient(correct))
    return total, denom, loss_lib.aux_sums(sums, weights)


def _chunk(x, i, chunk):
    return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _split_consts(head, consts):
    """(head taking (h, *float consts, *other consts), float consts, other consts): only the float ones are
    differentiated (an integer const, e.g. a dropout key, has no gradient)."""
    floats = [i for i, c in enumerate(consts) if _is_float(c)]
    others = [i for i, c in enumerate(consts) if not _is_float(c)]

    def reordered(h, *args):
        full = [None] * len(consts)
        for i, c in zip(floats + others, args):
            full[i] = c
        return head(h, *full)

    return reordered, tuple(consts[i] for i in floats), tuple(consts[i] for i in others)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _chunked_sums(head, chunk, z_loss, label_smoothing, trained, fixed, hidden, targets, weights, num_chunks):
    """(weighted loss sum, z-loss sum, correct count) over the first `num_chunks` chunks of every row; `head(h,
    *trained, *fixed)` gives a chunk's logits."""
    # Only ever called under differentiation (the train step), so the primal is the forward rule's first output.
    return _chunked_sums_fwd(head, chunk, z_loss, label_smoothing, trained, fixed, hidden, targets, weights,
                             num_chunks)[0]


def _chunked_sums_fwd(head, chunk, z_loss, label_smoothing, trained, fixed, hidden, targets, weights, num_chunks):
    def body(i, carry):
        sums, d_trained, d_hidden = carry
        t, w = _chunk(targets, i, chunk), _chunk(weights, i, chunk)

        def chunk_loss(params, h):
            total, *metrics = loss_lib.weighted_sums(head(h, *params, *fixed), t, w, z_loss, label_smoothing)
            return total, tuple(metrics)

        total, pullback, metrics = jax.vjp(chunk_loss, trained, _chunk(hidden, i, chunk), has_aux=True)
        d_params, d_h = pullback(jnp.ones((), total.dtype))
        sums = tuple(a + b for a, b in zip(sums, (total,) + metrics))
        d_trained = tuple(a + b.astype(a.dtype) for a, b in zip(d_trained, d_params))
        d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, d_h.astype(d_hidden.dtype), i * chunk, axis=1)
        return sums, d_trained, d_hidden

    init = (tuple(jnp.zeros((), jnp.float32) for _ in range(3)), tuple(jnp.zeros_like(c) for c in trained),
            jnp.zeros_like(hidden))
    sums, d_trained, d_hidden = jax.lax.fori_loop(0, num_chunks, body, init)
    return sums, (d_trained, d_hidden, fixed)


def _chunked_sums_bwd(head, chunk, z_loss, label_smoothing, residuals, cotangents):
    # Only the loss sum is differentiated: the caller stop_gradient-s the other two (metrics).
    d_trained, d_hidden, fixed = residuals
    g = cotangents[0]
    return (tuple((d * g).astype(d.dtype) for d in d_trained), tuple(None for _ in fixed),
            (d_hidden * g).astype(d_hidden.dtype), None, None, None)


_chunked_sums.defvjp(_chunked_sums_fwd, _chunked_sums_bwd)
