"""Span and blocked attention (models/span_attention.py) equal dense masked attention, values and gradients; the span
kernel skips work."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models, packing
from flan_jax.models import span_attention as sa
from flan_jax.train import loss as loss_lib

BLOCK = 8


def _segments(rng, rows, length, pad_rows=()):
    """Packed segment ids [rows, length]: runs of 3..20 tokens, a padded tail, and rows of pure padding."""
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        if r in pad_rows:
            continue
        pos, s = 0, 1
        while True:
            n = int(rng.integers(3, 21))
            if pos + n > length - 4:
                break
            seg[r, pos:pos + n], pos, s = s, pos + n, s + 1
    return seg


def _mask(kind, rng, rows=3, lq=48, lk=48):
    seg_q = _segments(rng, rows, lq, pad_rows=(2,))
    if kind == 'cross':   # queries from one packed stream, keys from another with the same segment numbering
        seg_k = np.zeros((rows, lk), np.int32)
        for r in range(rows):
            ids = [s for s in np.unique(seg_q[r]) if s]
            for i, s in enumerate(ids):
                seg_k[r, 2 * i + i * 3:2 * i + i * 3 + 4] = s
        return (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] > 0)
    same = (seg_q[:, :, None] == seg_q[:, None, :]) & (seg_q[:, :, None] > 0)
    causal = np.tril(np.ones((lq, lq), bool))[None]
    if kind == 'causal':
        return same & causal
    if kind == 'bidirectional':
        return same
    # prefix-LM: the first half of each segment (its inputs) is visible to all of the segment's queries
    pos = np.zeros_like(seg_q)
    for r in range(rows):
        for s in np.unique(seg_q[r]):
            idx = np.nonzero(seg_q[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    prefix = (pos < 3)[:, None, :]
    return same & (causal | prefix)


def _inputs(rng, mask, kv=2, groups=2, hd=8, dtype=jnp.float32, bias=False):
    rows, lq, lk = mask.shape
    q = jnp.asarray(rng.normal(size=(rows, kv, lq, groups, hd)), dtype)
    k = jnp.asarray(rng.normal(size=(rows, kv, lk, hd)), dtype)
    v = jnp.asarray(rng.normal(size=(rows, kv, lk, hd)), dtype)
    b = jnp.asarray(rng.normal(size=(kv, lq, groups, lk)), jnp.float32) if bias else None
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    return q, k, v, b, w


@pytest.mark.parametrize('kind', ['causal', 'prefix_lm', 'bidirectional', 'cross'])
@pytest.mark.parametrize('with_bias', [False, True])
@pytest.mark.parametrize('kernel', [sa.span_attention, sa.blocked_attention])
def test_span_and_blocked_equal_dense_values_and_gradients(kind, with_bias, kernel):
    rng = np.random.default_rng(0)
    mask = jnp.asarray(_mask(kind, rng, lk=64 if kind == 'cross' else 48))
    q, k, v, bias, w = _inputs(rng, mask, bias=with_bias)

    def loss(fn):
        return lambda q, k, v, b: jnp.sum(fn(q, k, v, b) * w)
    dense = lambda q, k, v, b: sa.dense_attention(q, k, v, mask, 0.35, b)
    span = lambda q, k, v, b: kernel(q, k, v, mask, 0.35, BLOCK, b)
    np.testing.assert_allclose(jax.jit(span)(q, k, v, bias), dense(q, k, v, bias), atol=1e-5)
    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    grads_dense = jax.grad(loss(dense), argnums)(q, k, v, bias)
    grads_span = jax.jit(jax.grad(loss(span), argnums))(q, k, v, bias)
    for name, a, b in zip('qkvb', grads_dense, grads_span):
        np.testing.assert_allclose(b, a, atol=2e-5, err_msg=f'd{name} ({kind})')


def test_padding_queries_get_zero_output_and_spans_skip_masked_blocks():
    rng = np.random.default_rng(1)
    mask = jnp.asarray(_mask('causal', rng))
    q, k, v, _, _ = _inputs(rng, mask)
    out = sa.span_attention(q, k, v, mask, 0.35, BLOCK)
    padding = ~np.asarray(mask).any(-1)            # [rows, Lq] queries that may attend nothing
    assert padding[2].all() and padding[:2].any()
    assert np.all(np.asarray(out).transpose(0, 2, 1, 3, 4)[padding] == 0)
    first, width = sa.key_spans(mask, BLOCK)
    blocks = mask.shape[1] // BLOCK
    # every allowed (query, key) pair lies inside its block's span ...
    hit = np.asarray(mask).reshape(3, blocks, BLOCK, blocks, BLOCK).any(axis=(2, 4))
    cols = np.arange(blocks)
    inside = (cols >= np.asarray(first)[..., None]) & (cols < np.asarray(first + width)[..., None])
    assert not (hit & ~inside).any()
    # ... and the spans cover far fewer key blocks than the dense rows would
    assert int(width.sum()) < 0.6 * mask.shape[0] * blocks * blocks


def test_bfloat16_stays_close_to_float32_dense():
    rng = np.random.default_rng(2)
    mask = jnp.asarray(_mask('causal', rng))
    q, k, v, _, _ = _inputs(rng, mask)
    ref = sa.dense_attention(q, k, v, mask, 0.35)
    got = sa.span_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, 0.35, BLOCK)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=5e-2)


def test_usable_needs_whole_blocks_and_more_than_one():
    assert jax.default_backend() == 'cpu'   # the span path is CPU-only (see usable's doc)
    assert sa.usable(64, 64, 8) and sa.usable(8, 64, 8)
    assert not sa.usable(60, 64, 8) and not sa.usable(8, 8, 8) and not sa.usable(64, 64, 0)
    assert sa.choose(64, 64, 8) is sa.span_attention and sa.choose(64, 64, 8, 'dense') is None
    assert sa.choose(64, 48, 8, 'blocked') is sa.blocked_attention and sa.choose(60, 64, 8, 'blocked') is None
    with pytest.raises(ValueError, match="attention_kernel='flash'"):
        sa.choose(64, 64, 8, 'flash')


# ---------------------------------------------------------------------------------------------- in the models

DECODER = models.DecoderConfig(vocab_size=53, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                               mlp_dim=48, rope_theta=10000.0)


def _decoder_examples(seed):
    rng = np.random.default_rng(seed)
    sizes = [(5, 3), (7, 4), (2, 6), (6, 2), (9, 5), (3, 3)]
    return [(rng.integers(2, 53, i).astype(np.int32), rng.integers(2, 53, t).astype(np.int32)) for i, t in sizes]


def _loss_and_grads(config, params, batch):
    def total(p):
        return loss_lib.summed_loss(models.forward(config, p, batch), batch, normalizer='none')[0]
    return jax.value_and_grad(total)(params), models.forward(config, params, batch)


def _assert_same_model(config, batch, valid, kernel='auto'):
    """Span or blocked kernel (block 8) and dense (block 0) give the same loss, gradients and logits at real
    positions ('auto' is the span kernel on this CPU backend)."""
    params = models.init_params(config, jax.random.PRNGKey(0))
    chosen = dataclasses.replace(config, attention_block=BLOCK, attention_kernel=kernel)
    (loss_span, grads_span), logits_span = _loss_and_grads(chosen, params, batch)
    (loss_dense, grads_dense), logits_dense = _loss_and_grads(dataclasses.replace(config, attention_block=0),
                                                              params, batch)
    np.testing.assert_allclose(loss_span, loss_dense, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_span)[valid], np.asarray(logits_dense)[valid], atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_dense), jax.tree_util.tree_leaves(grads_span)):
        # Summed losses give gradients of order 10: float32 summation order alone moves them by ~1e-6 relative.
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('prefix_lm', [True, False])
@pytest.mark.parametrize('kernel', ['auto', 'blocked'])
def test_decoder_span_and_blocked_attention_equal_dense(prefix_lm, kernel):
    examples = _decoder_examples(3)
    rows = packing.prefix_lm_feature_batch([examples[:3], examples[3:]], 48)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    _assert_same_model(dataclasses.replace(DECODER, prefix_lm=prefix_lm), batch, rows['decoder_segment_ids'] != 0,
                       kernel)


@pytest.mark.parametrize('kernel', ['auto', 'blocked'])
def test_t5_span_and_blocked_attention_equal_dense_with_relative_position_bias(kernel):
    config = models.T5Config.preset('tiny', num_encoder_layers=2, num_decoder_layers=2, emb_dim=32, mlp_dim=48,
                                    head_dim=8, num_heads=2)
    rng = np.random.default_rng(4)
    examples = [(rng.integers(3, 300, n).astype(np.int32), rng.integers(3, 300, t).astype(np.int32))
                for n, t in [(9, 4), (14, 6), (5, 3), (11, 5), (7, 7)]]
    rows = list(packing.pack_examples(examples, (32, 16)))
    features = packing.encdec_feature_batch(rows, (32, 16))
    assert features['encoder_segment_ids'].max() > 1
    batch = {k: jnp.asarray(v) for k, v in features.items()}
    _assert_same_model(config, batch, features['decoder_segment_ids'] != 0, kernel)


def test_a_mask_shared_by_the_rows_is_broadcast_to_every_row():
    rng = np.random.default_rng(5)
    causal = jnp.asarray(np.tril(np.ones((32, 32), bool))[None])
    q, k, v, _, _ = _inputs(rng, jnp.broadcast_to(causal, (3, 32, 32)))
    np.testing.assert_allclose(sa.span_attention(q, k, v, causal, 0.35, BLOCK),
                               sa.dense_attention(q, k, v, causal, 0.35), atol=1e-5)
