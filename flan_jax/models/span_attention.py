"""Masked attention that computes only the key span each block of queries needs.

Packed rows hold several short segments, and no query attends outside its own segment, so most of a dense
[Lq, Lk] score matrix is masked out: with causal attention over ~200-token segments in 640-token rows, four fifths
of it. Here the queries are cut into blocks; for each (row, query block) the first and last key block that any of
its queries may attend are read off the mask, and the scores are computed over that span only (a `lax.switch` over
the span width picks a static shape). The mask is still applied inside the span, so the result is the dense
masked softmax, exactly up to float summation order; scores the span leaves out are ones the mask zeroes anyway.

The backward pass is written out (`jax.custom_vjp`, the FlashAttention recurrences of Dao et al. 2022): it keeps
q, k, v, the output and each query's log-sum-exp, recomputes the probabilities span by span and accumulates dk, dv
into the span's slice. Letting JAX differentiate the switch instead would materialize every branch's residuals.

An optional additive bias shared by the batch rows ([kv, Lq, G, Lk], e.g. T5's relative-position bias) is sliced
per span as well, and its gradient is summed over rows in the backward pass.

A query that may attend no key (padding) gets a zero output here, where a plain softmax over all-masked scores
would average every value in the row; `dense_attention` below applies the same rule, and such positions carry no
loss.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flan_jax.models import fused_attention
from flan_jax.models.layers import MASK_VALUE


def dense_attention(q, k, v, mask, scale: float, bias=None):
    """Reference: q [B, kv, Lq, G, hd], k, v [B, kv, Lk, hd], mask bool [B, Lq, Lk], bias [kv, Lq, G, Lk] or None
    -> [B, kv, Lq, G, hd]."""
    s = jnp.einsum('bkqgd,bksd->bkqgs', q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias[None].astype(jnp.float32)
    m = mask[:, None, :, None, :]
    p = jax.nn.softmax(jnp.where(m, s, MASK_VALUE), axis=-1) * jnp.any(m, axis=-1, keepdims=True)
    return jnp.einsum('bkqgs,bksd->bkqgd', p.astype(v.dtype), v)


def blocked_attention(q, k, v, mask, scale: float, block: int, bias=None):
    """dense_attention computed `block` queries at a time, each block's scores recomputed in the backward pass: a row's
    whole [Lq, Lk] float32 score matrix never exists (Lq / block times less attention memory, for a second pass over
    the scores). Same layout and values as dense_attention; Lq a whole number of blocks."""
    b, kv, lq, g, hd = q.shape
    n = lq // block
    blocks = q.reshape(b, kv, n, block, g, hd).transpose(2, 0, 1, 3, 4, 5)
    masks = jnp.broadcast_to(mask, (b, lq, k.shape[2])).reshape(b, n, block, -1).transpose(1, 0, 2, 3)
    biases = None if bias is None else bias.reshape(kv, n, block, g, -1).transpose(1, 0, 2, 3, 4)
    one = jax.checkpoint(lambda qb, mb, bb: dense_attention(qb, k, v, mb, scale, bb))
    out = jax.lax.map(lambda xs: one(*xs), (blocks, masks, biases))
    return out.transpose(1, 2, 0, 3, 4, 5).reshape(b, kv, lq, g, v.shape[-1])


# 'auto': the span kernel on the CPU backend the step is traced on; models.for_platform resolves it for the platform a
# step is compiled for (a TPU program traced on a CPU host must not get the CPU kernel). 'span', 'blocked' (query
# blocks, any platform) and 'dense' (the model's own fused attention) are chosen as named. 'splash' (Pallas, TPU only)
# and 'cudnn' (cuDNN on GPU, XLA elsewhere) are models/fused_attention.py's, for decoder-only models.
KERNELS = ('auto', 'span', 'blocked', 'dense', 'splash', 'cudnn')
FUSED = {'splash': fused_attention.splash_attention, 'cudnn': fused_attention.cudnn_attention}


def _check(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f'attention_kernel={kernel!r}: expected one of {KERNELS}')


def usable(lq: int, lk: int, block: int, kernel: str = 'auto') -> bool:
    """Whether the span path applies: kernel 'span' (or 'auto' on the CPU backend), both lengths whole numbers of
    blocks, more than one.

    On GPU/TPU the loop over (row, block) pairs would serialize the work and, under a batch-sharded mesh, gather
    every row to every device; there XLA's dense (fused) attention is the better kernel."""
    _check(kernel)
    on_cpu = kernel == 'span' or (kernel == 'auto' and jax.default_backend() == 'cpu')
    return bool(block) and lq % block == 0 and lk % block == 0 and max(lq, lk) > block and on_cpu


def choose(lq: int, lk: int, block: int, kernel: str = 'auto'):
    """The kernel function (span_attention, blocked_attention or a FUSED one, called as f(q, k, v, mask, scale, block,
    bias)) for these lengths, or None where the model's own dense attention runs."""
    if kernel in FUSED:   # any lengths: splash pads them to whole tiles
        return FUSED[kernel]
    if usable(lq, lk, block, kernel):
        return span_attention
    if kernel == 'blocked' and block and lq % block == 0 and lq > block:
        return blocked_attention
    return None


def kernel_for_platform(kernel: str, platform: str, key: str = 'attention_kernel') -> str:
    """The kernel a step compiled for `platform` ('cpu', 'gpu', 'tpu') uses: 'auto' resolved, a named one kept; 'splash'
    only for TPU (or under fused_attention.INTERPRET). `key` names the setting in the error."""
    _check(kernel)
    if kernel == 'splash' and platform != 'tpu' and not fused_attention.INTERPRET:
        raise ValueError(f"{key}='splash' is a TPU kernel (Pallas); this step compiles for {platform!r}: choose "
                         "'auto', 'span', 'blocked', 'dense' or 'cudnn' there")
    if kernel != 'auto':
        return kernel
    return 'span' if platform == 'cpu' else 'dense'


def key_spans(mask, block: int):
    """(first key block, width in blocks) [B, Lq / block] int32 covering every key a query block may attend."""
    b, lq, lk = mask.shape
    hit = mask.reshape(b, lq // block, block, lk // block, block).any(axis=(2, 4))
    nk = lk // block
    first = jnp.argmax(hit, axis=-1)
    last = nk - 1 - jnp.argmax(hit[..., ::-1], axis=-1)
    none = ~hit.any(axis=-1)
    first = jnp.where(none, 0, first).astype(jnp.int32)
    width = jnp.where(none, 1, last - first + 1).astype(jnp.int32)
    return first, width


def span_attention(q, k, v, mask, scale: float, block: int, bias=None):
    """As `dense_attention`, computing each query block's scores over its key span only (see the module doc)."""
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], k.shape[2]))
    first, width = key_spans(mask, block)
    return _span_attention(q, k, v, bias, mask, first, width, scale, block)


def _slice_block(x, row, start, size, axis):
    """x[row] sliced along `axis` (of x[row]) at a dynamic start."""
    x = jax.lax.dynamic_index_in_dim(x, row, axis=0, keepdims=False)
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _span_scores(qb, k, v, bias, mask_rows, row, qi, start, w, block):
    """For one query block qb [kv, Bq, G, hd] (already scaled) over the key span of `w` blocks from block `start`:
    the span's keys and values [kv, S, hd] and its masked scores [kv, Bq, G, S] (float32, bias added)."""
    ks = _slice_block(k, row, start * block, w * block, 1)
    vs = _slice_block(v, row, start * block, w * block, 1)
    s = jnp.einsum('kqgd,ksd->kqgs', qb, ks, preferred_element_type=jnp.float32)
    if bias is not None:
        kv, _, g, _ = bias.shape
        s = s + jax.lax.dynamic_slice(bias, (0, qi * block, 0, start * block), (kv, block, g, w * block)).astype(
            jnp.float32)
    m = jax.lax.dynamic_slice_in_dim(mask_rows, start * block, w * block, axis=1)[None, :, None, :]
    return ks, vs, jnp.where(m, s, MASK_VALUE)


def _block_forward(q, k, v, bias, mask, row, qi, start, width, scale, block):
    qb = _scaled(_slice_block(q, row, qi * block, block, 1), scale)
    mask_rows = _slice_block(mask, row, qi * block, block, 0)
    live = jnp.any(mask_rows, axis=-1)[None, :, None]   # [1, Bq, 1]: queries with at least one key

    def branch(w):
        def run(_):
            _, vs, s = _span_scores(qb, k, v, bias, mask_rows, row, qi, start, w, block)
            peak = jnp.max(s, axis=-1, keepdims=True)
            # Masked scores are MASK_VALUE below a live row's peak, so exp gives exact zeros there; only rows with
            # no key at all need the `live` factor. Normalizing after the product divides hd values, not S.
            p = jnp.exp(s - peak)
            total = jnp.sum(p, axis=-1)
            out = jnp.einsum('kqgs,ksd->kqgd', p.astype(v.dtype), vs, preferred_element_type=jnp.float32)
            out = out * jnp.where(live, 1.0 / total, 0.0)[..., None]
            # A dead row's log-sum-exp is +|MASK_VALUE|: the backward pass's exp(s - lse) is then zero there too.
            lse = jnp.where(live, peak[..., 0] + jnp.log(total), -MASK_VALUE)
            return out.astype(v.dtype), lse
        return run

    return jax.lax.switch(width - 1, [branch(w) for w in range(1, k.shape[2] // block + 1)], None)


def _scaled(qb, scale: float):
    """The query block times the score scale, once per block rather than once per score."""
    return qb if scale == 1.0 else (qb.astype(jnp.float32) * scale).astype(qb.dtype)


def _pairs(first):
    rows, blocks = first.shape
    return rows * blocks, blocks


def _forward(q, k, v, bias, mask, first, width, scale, block):
    n, blocks = _pairs(first)
    out = jnp.zeros(q.shape, v.dtype)
    lse = jnp.zeros(q.shape[:-1], jnp.float32)

    def body(pair, carry):
        out, lse = carry
        row, qi = pair // blocks, pair % blocks
        o, l = _block_forward(q, k, v, bias, mask, row, qi, first[row, qi], width[row, qi], scale, block)
        out = jax.lax.dynamic_update_slice(out, o[None], (row, 0, qi * block, 0, 0))
        lse = jax.lax.dynamic_update_slice(lse, l[None], (row, 0, qi * block, 0))
        return out, lse

    return jax.lax.fori_loop(0, n, body, (out, lse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _span_attention(q, k, v, bias, mask, first, width, scale, block):
    return _forward(q, k, v, bias, mask, first, width, scale, block)[0]


def _fwd(q, k, v, bias, mask, first, width, scale, block):
    out, lse = _forward(q, k, v, bias, mask, first, width, scale, block)
    return out, (q, k, v, bias, mask, first, width, out, lse)


def _accumulate(total, part, at):
    """total[at : at + part.shape] += part."""
    return jax.lax.dynamic_update_slice(total, jax.lax.dynamic_slice(total, at, part.shape) + part, at)


def _bwd(scale, block, residuals, d_out):
    q, k, v, bias, mask, first, width, out, lse = residuals
    n, blocks = _pairs(first)
    f32 = jnp.float32
    # delta_i = sum_d dO_i * O_i: the softmax Jacobian's row term.
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)

    def body(pair, carry):
        dq, dk, dv, dbias = carry
        row, qi = pair // blocks, pair % blocks
        start = first[row, qi]
        qb = _scaled(_slice_block(q, row, qi * block, block, 1), scale)
        dob = _slice_block(d_out, row, qi * block, block, 1)
        lb = _slice_block(lse, row, qi * block, block, 1)
        db = _slice_block(delta, row, qi * block, block, 1)
        mask_rows = _slice_block(mask, row, qi * block, block, 0)

        def branch(w):
            def run(_):
                ks, vs, s = _span_scores(qb, k, v, bias, mask_rows, row, qi, start, w, block)
                p = jnp.exp(s - lb[..., None])   # zero at masked scores and in dead rows (see _block_forward)
                dp = jnp.einsum('kqgd,ksd->kqgs', dob, vs, preferred_element_type=f32)
                d_scores = p * (dp - db[..., None])   # d loss / d (scaled scores + bias)
                dqb = jnp.einsum('kqgs,ksd->kqgd', d_scores.astype(q.dtype), ks, preferred_element_type=f32) * scale
                dks = jnp.einsum('kqgs,kqgd->ksd', d_scores.astype(q.dtype), qb, preferred_element_type=f32)
                dvs = jnp.einsum('kqgs,kqgd->ksd', p.astype(dob.dtype), dob, preferred_element_type=f32)
                # The span's gradients placed in key-length buffers: the switch returns new values only, so XLA
                # need not copy the whole-batch accumulators into and out of each branch.
                place = lambda x, axis: jax.lax.dynamic_update_slice_in_dim(
                    jnp.zeros(x.shape[:axis] + (k.shape[2],) + x.shape[axis + 1:], f32), x, start * block, axis)
                d_span_bias = None if bias is None else place(d_scores, 3)
                return dqb, place(dks, 1), place(dvs, 1), d_span_bias
            return run

        dqb, dks, dvs, d_span_bias = jax.lax.switch(width[row, qi] - 1,
                                                    [branch(w) for w in range(1, k.shape[2] // block + 1)], None)
        dk = _accumulate(dk, dks[None], (row, 0, 0, 0))
        dv = _accumulate(dv, dvs[None], (row, 0, 0, 0))
        if dbias is not None:
            dbias = _accumulate(dbias, d_span_bias, (0, qi * block, 0, 0))
        dq = jax.lax.dynamic_update_slice(dq, dqb[None], (row, 0, qi * block, 0, 0))
        return dq, dk, dv, dbias

    zeros = lambda x: None if x is None else jnp.zeros(x.shape, f32)
    dq, dk, dv, dbias = jax.lax.fori_loop(0, n, body, (zeros(q), zeros(k), zeros(v), zeros(bias)))
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None, None)


_span_attention.defvjp(_fwd, _bwd)
