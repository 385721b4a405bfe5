"""T5's relative position buckets and bias (shared by encoder and decoder self-attention and the KV cache)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def relative_position_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
    """T5 bucket of (key_position - query_position); works on numpy or jax integer arrays.

    Bidirectional: half the buckets for keys before the query, half for keys after; within each
    half, the first half of the buckets are exact distances, the rest log-spaced up to max_distance.
    Unidirectional: keys after the query (future) all fall in bucket 0.
    """
    xp = jnp if isinstance(relative_position, jax.Array) else np
    n = -relative_position
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket = (n < 0).astype(np.int32) * num_buckets
        n = xp.abs(n)
    else:
        n = xp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = xp.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) / np.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int32)
    large = xp.minimum(large, num_buckets - 1)
    return bucket + xp.where(is_small, n, large)


def _toeplitz_bias(rel_embedding: jax.Array, length: int, bidirectional: bool, config) -> jax.Array:
    """The bias [heads, L, L] for positions 0..L-1, built from its 2L-1 distinct offsets without a large gather.

    Row q of the result is a shifted window of one vector indexed by (k - q) mod 2L: tiling that vector L times and
    reading it with row stride 2L-1 lays the windows out. Its gradient is then a dense sum along diagonals, where the
    [L, L] gather's gradient is a scatter-add that XLA:CPU runs serially (a quarter of a tiny model's step)."""
    period = 2 * length
    index = np.arange(period)
    offsets = np.where(index < length, index, index - period)            # (k - q) stored at (k - q) mod 2L
    buckets = relative_position_bucket(offsets, bidirectional, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    by_offset = jnp.take(rel_embedding.astype(jnp.float32), jnp.asarray(buckets), axis=1)  # [heads, 2L]
    flat = jnp.tile(by_offset, (1, length))[:, :length * (period - 1)]
    return flat.reshape(-1, length, period - 1)[:, :, :length]


def relative_position_bias(rel_embedding: jax.Array, q_positions, k_positions, bidirectional: bool,
                           config) -> jax.Array:
    """Bias [heads, Lq, Lk] (1-D positions) or [B, heads, Lq, Lk] (2-D positions), float32."""
    if (isinstance(q_positions, np.ndarray) and isinstance(k_positions, np.ndarray) and q_positions.ndim == 1
            and np.array_equal(q_positions, k_positions) and np.array_equal(q_positions, np.arange(len(q_positions)))):
        return _toeplitz_bias(rel_embedding, len(q_positions), bidirectional, config)
    relative = k_positions[..., None, :] - q_positions[..., :, None]
    buckets = relative_position_bucket(relative, bidirectional, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    table = rel_embedding.astype(jnp.float32).T            # [buckets, heads]
    bias = jnp.take(table, jnp.asarray(buckets), axis=0)   # [..., Lq, Lk, heads]
    return jnp.moveaxis(bias, -1, -3)
