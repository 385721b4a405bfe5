"""Attention through the accelerators' fused kernels, in span_attention's layout and with its semantics.

'splash': Pallas splash attention for TPU (jax.experimental.pallas.ops.tpu.splash_attention), one kernel call per
batch row over all its heads (GQA: each KV head serves its group of query heads). The row's [Lq, Lk] mask goes in as
a dynamic splash mask: blocks it zeroes entirely (future keys, other packed segments, padding) are skipped, and the
rest are masked inside the kernel. So causal and prefix-LM rows, packed segments and prefix-tuning keys all come out
exact, with no static mask to describe them. Lengths are padded to whole 128s; the query and key tiles are the
largest multiples of 128 dividing them and at most attention_block (clipped to [128, 512]). The kernel is lowered by
Mosaic for TPU only; `INTERPRET` runs it through the Pallas interpreter on any backend (the CPU tests set it).

'cudnn': `jax.nn.dot_product_attention` with the mask as given: cuDNN's fused attention when the backend is a GPU
(bfloat16 or float16 only), XLA's implementation of the same call elsewhere.

A query with no allowed key gets a zero output, as in dense_attention; the kernels give the average of the values
there, or NaN (splash, in a tile with no allowed key at all).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.sharding import PartitionSpec as P

from flan_jax.models.sharding import DATA_AXIS, MODEL_AXIS

LANES = 128       # splash tiles are whole multiples of the TPU's 128 lanes
MAX_TILE = 512    # the tile the TPU compile checks use; larger tiles take more of the kernel's VMEM
INTERPRET = False  # True: the Pallas interpreter instead of Mosaic (any backend, slow; tests)


def _live(out, mask):
    """out [B, kv, Lq, G, hd] zeroed at queries with no allowed key (a select: the kernels' values there may be
    NaN)."""
    return jnp.where(jnp.any(mask, axis=-1)[:, None, :, None, None], out, jnp.zeros((), out.dtype))


def _no_bias(bias, kernel: str):
    if bias is not None:
        raise ValueError(f"attention_kernel='{kernel}' takes no additive attention bias (decoder-only models)")


# ---------------------------------------------------------------------------------------------- splash (TPU)

def splash_attention(q, k, v, mask, scale: float, block: int, bias=None):
    """As span_attention.dense_attention (q [B, kv, Lq, G, hd], k, v [B, kv, Lk, hd], mask bool [B|1, Lq, Lk]),
    through the splash kernel with tiles from `block`."""
    _no_bias(bias, 'splash')
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], k.shape[2]))
    rows = functools.partial(_splash_rows, scale=scale, block=block)
    return _live(_sharded(rows, q, k, v, mask), mask)


def tile(length: int, block: int) -> tuple[int, int]:
    """(length padded to whole 128s, the tile: the largest multiple of 128 dividing it and at most block, clipped to
    [128, MAX_TILE])."""
    lanes = -(-length // LANES)
    cap = min(max(block // LANES, 1), MAX_TILE // LANES)
    return lanes * LANES, LANES * next(t for t in range(cap, 0, -1) if lanes % t == 0)


def _block_sizes(bq: int, bkv: int):
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _pad(x, axis: int, length: int):
    return jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])


def _splash_rows(q, k, v, mask, scale: float, block: int):
    b, kv, lq, g, hd = q.shape
    (pq, bq), (pk, bkv) = tile(lq, block), tile(k.shape[2], block)
    # The kernel does not scale the scores; scaling q in float32 costs Lq * hd products, not Lq * Lk.
    q = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 1, 3, 2, 4).reshape(b, kv * g, lq, hd)
    q, k, v = _pad(q, 2, pq), _pad(k, 2, pk), _pad(v, 2, pk)
    mask = _pad(_pad(mask, 1, pq), 2, pk)   # padded queries and keys allow nothing
    sizes = _block_sizes(bq, bkv)

    def row(q, k, v, mask):
        kernel = splash.make_splash_mha_single_device(mask[None], block_sizes=sizes, interpret=INTERPRET)
        return _dynamic(kernel)(q, k, v)

    out = jax.vmap(row)(q, k, v, mask)[:, :, :lq]
    return out.reshape(b, kv, g, lq, hd).transpose(0, 1, 3, 2, 4)


def _dynamic(kernel):
    """The kernel with its mask marked dynamic by a Python bool: make_splash_* stores the flag as an array, which is
    a tracer under jit, and the kernel's __call__ branches on it."""
    kernel.fwd_mask_info = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
    return kernel


def _sharded(fn, q, k, v, mask):
    """fn(q, k, v, mask) on each device's rows (and KV heads, under a model axis dividing them) of the tracing
    context's mesh: XLA cannot partition a Pallas call, and would gather every row to every chip around it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, mask)
    axis = lambda name, n: name if name in mesh.axis_names and n % mesh.shape[name] == 0 else None
    rows, heads = axis(DATA_AXIS, q.shape[0]), axis(MODEL_AXIS, k.shape[1])
    # check_vma=False: the splash kernel's outputs declare no variation over the mesh axes.
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(rows, heads),) * 3 + (P(rows),), out_specs=P(rows, heads),
                         check_vma=False)(q, k, v, mask)


# ---------------------------------------------------------------------------------------------- cuDNN (GPU)

def cudnn_attention(q, k, v, mask, scale: float, block: int, bias=None):
    """As span_attention.dense_attention, through jax.nn.dot_product_attention ([B, L, heads, hd] layout, GQA);
    `block` is unused."""
    del block
    _no_bias(bias, 'cudnn')
    b, kv, lq, g, hd = q.shape
    on_gpu = jax.default_backend() == 'gpu'
    if on_gpu and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_kernel='cudnn' runs bfloat16 or float16 on GPU (cuDNN flash attention), not "
                         f"{q.dtype}: set DecoderConfig.dtype")
    mask = jnp.broadcast_to(mask, (b, lq, k.shape[2]))
    out = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3, 4).reshape(b, lq, kv * g, hd), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        mask=mask[:, None], scale=scale, implementation='cudnn' if on_gpu else 'xla')
    return _live(out.reshape(b, lq, kv, g, hd).transpose(0, 2, 1, 3, 4), mask)
