"""A frozen base stored quantized (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), through qwix's array API.

A quantized kernel is a dict {'qvalue', 'scale'} at the kernel's path: qvalue has the kernel's shape in the storage
type (int8; int4; uint4 indices into the NF4 code book), scale is float in the kernel's own dtype, shape
[in / group, out] (one scale per output channel and group of `GROUP` input rows) or [1, out] (per output channel).
The storage dtype names the code, so `dequantize` needs no config. `layers.dense` dequantizes just before the matmul,
in the compute dtype; the LoRA factors beside the kernel stay float32 and train as usual.

Modes: 'int8' (per output channel, absmax), 'int4' (absmax per group), 'nf4' (NormalFloat, absmax per group, QLoRA's
data type). Every 2-D kernel is quantized except the output projection `logits_dense` (kept like the embeddings:
the head's error reaches every logit directly; bitsandbytes' QLoRA skips lm_head too).

qwix is the optional 'qlora' extra, so it is imported where a quantized base is built or read.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.utils import tree_paths

MODES = ('int8', 'int4', 'nf4')
GROUP = 64                      # QLoRA's NF4 block size
SKIP = ('logits_dense/kernel',)
_QTYPE = {'int8': jnp.int8, 'int4': jnp.int4, 'nf4': 'nf4'}
_STORAGE = {'int8': jnp.int8, 'int4': jnp.int4, 'nf4': jnp.uint4}
_GROUPED = ('int4', 'nf4')      # 16 levels: one scale per column is too coarse (outliers), so per group


def check_mode(mode) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f'PeftConfig.base_quantization={mode!r}: expected None or one of {MODES}')


def is_quantized(kernel: Any) -> bool:
    return isinstance(kernel, Mapping) and 'qvalue' in kernel


def any_quantized(tree: Mapping) -> bool:
    return any(is_quantized(v) or (isinstance(v, Mapping) and any_quantized(v)) for v in tree.values())


def targets(flat: Mapping) -> list:
    """Paths of the 2-D kernels a quantized base stores quantized."""
    return sorted(p for p, v in flat.items() if p.endswith('/kernel') and len(v.shape) == 2
                  and not any(p == s or p.endswith('/' + s) for s in SKIP))


def _group(mode: str, rows: int) -> int:
    """Input rows per scale: GROUP for 4-bit when it divides the rows, else the whole column."""
    return GROUP if mode in _GROUPED and rows % GROUP == 0 else rows


def scale_shape(mode: str, shape) -> tuple:
    rows, cols = shape
    return rows // _group(mode, rows), cols


def _qtype_of(qvalue) -> Any:
    return 'nf4' if qvalue.dtype == jnp.uint4 else qvalue.dtype


def quantize(kernel: jax.Array, mode: str) -> dict:
    """{'qvalue', 'scale'} of a 2-D kernel [in, out]; the scale keeps the kernel's dtype."""
    import qwix  # lazy: qwix is the optional 'qlora' extra
    rows = kernel.shape[0]
    q = qwix.quantize(kernel, _QTYPE[mode], channelwise_axes=(1,), tiled_axes={0: _group(mode, rows)})
    return {'qvalue': q.qvalue, 'scale': q.scale}


def dequantize(kernel: Mapping, dtype=None) -> jax.Array:
    """The kernel back as a float array in `dtype` (default: the scale's, i.e. the original kernel's dtype)."""
    import qwix  # lazy: qwix is the optional 'qlora' extra
    scale = kernel['scale'] if dtype is None else kernel['scale'].astype(dtype)
    return qwix.dequantize(qwix.QArray(jnp.asarray(kernel['qvalue']), jnp.asarray(scale),
                                       qtype=_qtype_of(kernel['qvalue'])))


def quantize_tree(params: Mapping, mode: str) -> dict:
    """The base tree with its target kernels quantized (everything else as it is)."""
    flat = tree_paths.flatten(params)
    for path in targets(flat):
        flat[path] = quantize(flat[path], mode)
    return tree_paths.unflatten(tree_paths.flatten(flat))


def dequantize_tree(params: Mapping) -> dict:
    """The tree with every quantized kernel back as a float array in its original dtype."""
    out = {}
    for key, value in params.items():
        if is_quantized(value):
            out[key] = dequantize(value)
        else:
            out[key] = dequantize_tree(value) if isinstance(value, Mapping) else value
    return out


def abstract(shapes: Mapping, axes: Mapping, mode: str) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, logical axes) of the quantized base, from the full-precision ones. A group scale is
    sharded like the kernel (its row blocks follow the kernel's rows); a per-column scale has one row."""
    flat_shapes, flat_axes = tree_paths.flatten(shapes), tree_paths.flatten(axes)
    for path in targets(flat_shapes):
        s, (ax_in, ax_out) = flat_shapes[path], flat_axes[path]
        sshape = scale_shape(mode, s.shape)
        flat_shapes[path] = {'qvalue': jax.ShapeDtypeStruct(s.shape, _STORAGE[mode]),
                             'scale': jax.ShapeDtypeStruct(sshape, s.dtype)}
        flat_axes[path] = {'qvalue': (ax_in, ax_out), 'scale': (ax_in if sshape[0] > 1 else None, ax_out)}
    return (tree_paths.unflatten(tree_paths.flatten(flat_shapes)),
            tree_paths.unflatten(tree_paths.flatten(flat_axes)))


def full_precision(quantized_abstract: Mapping) -> dict:
    """The full-precision abstract tree a quantized one was made from (kernel: qvalue's shape and sharding, the
    scale's dtype): what a base checkpoint is restored into before it is quantized."""
    out = {}
    for key, value in quantized_abstract.items():
        if is_quantized(value):
            q = value['qvalue']
            out[key] = jax.ShapeDtypeStruct(q.shape, value['scale'].dtype, sharding=getattr(q, 'sharding', None))
        else:
            out[key] = full_precision(value) if isinstance(value, Mapping) else value
    return out


def nbytes(tree) -> int:
    """Bytes of a tree's arrays (or ShapeDtypeStructs) with 4-bit types at half a byte, as TPUs store them."""
    return int(sum(np.prod(x.shape) * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(tree)))
