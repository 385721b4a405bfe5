"""Read and write T5X checkpoints: the legacy msgpack + TensorStore layout and the newer orbax layout.

Legacy layout (T5X `Checkpointer`, version 3):
    checkpoint_<step>/checkpoint            msgpack of {'version': 3, 'optimizer': {'target': params,
                                            'state': {'step': int32, 'param_states': tree of slots}}}
    checkpoint_<step>/target.encoder....    one zarr array (gzip) per large leaf, named by the dotted path
In the msgpack, a leaf written to TensorStore is replaced by its TensorStore spec (a dict with 'driver',
'kvstore', 'metadata') whose path is relative to the checkpoint directory; small leaves are stored inline.
T5X's Adafactor keeps four slots per parameter {v_row, v_col, v, m}; the unused ones are zeros of shape (1,).

Orbax layout (newer T5X): checkpoint_<step>/state/ is an orbax PyTree checkpoint of the same state dict
{'target': params, 'state': {'step', 'param_states'}}.

Parameter trees are the canonical T5X names used by flan_jax.models.t5 (no 'params' wrapper). Flat views
use '/'-joined paths, e.g. 'encoder/layers_0/attention/query/kernel'.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from flan_jax.utils.tree_paths import flatten, unflatten  # noqa: F401  (part of this module's API)
from flan_jax.checkpoints import param_check
from flan_jax import models as model_api
from flan_jax.models import T5Config
import tensorstore as ts
from flax import serialization
from etils import epath
import orbax.checkpoint as ocp

LEGACY_VERSION = 3
SLOT_NAMES = ('v_row', 'v_col', 'v', 'm')
# T5X targets chunks of ~64 MiB in its zarr arrays.
_CHUNK_BYTES = 64 * 1024 * 1024
# T5X Adafactor default: do not factor a parameter whose second-largest dimension is below this.
_MIN_DIM_SIZE_TO_FACTOR = 128


def expected_shapes(config) -> dict:
    """{flat path: shape tuple} for a T5Config, from the model's own parameter table."""
    return {path: tuple(s.shape) for path, s in flatten(model_api.param_shapes(config)).items()}


def check_params(flat: Mapping[str, Any], config, *, source: str, check_dtype: bool = True) -> None:
    """Raise one ValueError naming the first missing, unexpected, mis-shaped or mis-typed parameter (and the config
    field that would fix it, when one does); see param_check."""
    param_check.check_params(flat, config, source=source, check_dtype=check_dtype)


def _count_layers(flat: Mapping[str, Any], stack: str) -> int:
    indices = {int(m.group(1)) for p in flat if (m := re.match(rf'{stack}/layers_(\d+)/', p))}
    return max(indices) + 1 if indices else 0


def infer_config(params: Mapping, **overrides):
    """T5Config whose shapes match `params` (nested or flat). Fields that shapes cannot tell
    (layer_norm_epsilon, relative_attention_max_distance, dropout_rate, compute dtype) take T5Config defaults
    unless given in `overrides`; param_dtype is the embedding's stored dtype."""
    flat = params if any('/' in k for k in params) else flatten(params)
    try:
        vocab, d = np.shape(flat['token_embedder/embedding'])
        heads, buckets = np.shape(flat['encoder/relpos_bias/rel_embedding'])
        joined_kv = np.shape(flat['encoder/layers_0/attention/query/kernel'])[1]
        mlp_dim = np.shape(flat['encoder/layers_0/mlp/wi_0/kernel'])[1]
    except KeyError as e:
        raise ValueError(f'cannot infer a T5Config: parameter {e.args[0]!r} is missing '
                         f'(have {len(flat)} parameters, e.g. {sorted(flat)[:5]})') from None
    if joined_kv % heads:
        raise ValueError(f'cannot infer head_dim: attention width {joined_kv} is not a multiple of '
                         f'{heads} heads (encoder/relpos_bias/rel_embedding)')
    fields = dict(vocab_size=int(vocab), emb_dim=int(d), num_heads=int(heads), head_dim=int(joined_kv // heads),
                  mlp_dim=int(mlp_dim), relative_attention_num_buckets=int(buckets),
                  num_encoder_layers=_count_layers(flat, 'encoder'),
                  num_decoder_layers=_count_layers(flat, 'decoder'))
    stored = np.dtype(getattr(flat['token_embedder/embedding'], 'dtype', np.float32)).name
    if stored in ('float32', 'bfloat16', 'float16'):   # the dtype the checkpoint holds is the one it is checked for
        fields['param_dtype'] = stored
    fields.update(overrides)
    return T5Config(**fields)


def _to_numpy_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


# ----------------------------------------------------------------------------------------------
# Adafactor slots.

def _factored_dims(shape) -> Optional[tuple]:
    """T5X Adafactor rule: factor over the two largest dims when the second largest is >= 128."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < _MIN_DIM_SIZE_TO_FACTOR:
        return None
    return int(order[-2]), int(order[-1])


def default_adafactor_slots(shape) -> dict:
    """Zero slots shaped as T5X's Adafactor (factored, no momentum) would initialise them."""
    slots = {name: np.zeros((1,), np.float32) for name in SLOT_NAMES}
    dims = _factored_dims(tuple(shape))
    if dims is None:
        slots['v'] = np.zeros(shape, np.float32)
    else:
        second, largest = dims
        slots['v_row'] = np.zeros(np.delete(shape, largest), np.float32)
        slots['v_col'] = np.zeros(np.delete(shape, second), np.float32)
    return slots


def _is_placeholder(slot: np.ndarray, param_shape) -> bool:
    return slot.shape == (1,) and tuple(param_shape) != (1,)


# ----------------------------------------------------------------------------------------------
# Legacy writer.

def _chunk_shape(shape, itemsize: int) -> list:
    """Largest chunk (each dim a divisor of the array dim) under ~64 MiB, shrinking the biggest dim first."""
    target = max(1, _CHUNK_BYTES // itemsize)
    divisors = [[k for k in range(1, n + 1) if n % k == 0] or [1] for n in shape]
    while int(np.prod([d[-1] for d in divisors])) > target:
        biggest = max(range(len(shape)), key=lambda i: divisors[i][-1])
        divisors[biggest].pop()
    return [d[-1] for d in divisors]


def _write_tensorstore(ckpt_dir: str, name: str, array: np.ndarray) -> dict:
    """Write `array` as zarr+gzip under ckpt_dir/<dotted name>; return the relative spec T5X stores."""
    relative = name.replace('/', '.')
    spec = {'driver': 'zarr', 'dtype': array.dtype.name,
            'kvstore': {'driver': 'file', 'path': relative},
            'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(array.shape),
                         'chunks': _chunk_shape(array.shape, array.dtype.itemsize)}}
    absolute = {**spec, 'kvstore': {'driver': 'file', 'path': os.path.join(ckpt_dir, relative)}}
    store = ts.open(absolute, create=True, open=True).result()
    store.write(array).result()
    return ts.Spec(spec).to_json()


def save_t5x_legacy(params: Mapping, path: str, step: int, param_states: Optional[Mapping] = None) -> str:
    """Write params (nested T5X tree) as T5X's legacy checkpoint `path/checkpoint_<step>/`; return that dir.

    param_states: Adafactor slots, either {flat path: {slot: array}} or a tree mirroring params with
    {slot: array} leaves-dicts; missing slots are written as T5X's (1,)-zeros placeholders. None writes
    zero slots shaped like a fresh T5X Adafactor so stock T5X can restore the checkpoint.
    Parameters and full-size v/m slots go to TensorStore; factored slots and the step stay inline.
    """
    flat_params = {p: np.asarray(a) for p, a in flatten(params).items()}
    if param_states is None:
        flat_states = {p: default_adafactor_slots(a.shape) for p, a in flat_params.items()}
    else:
        flat_states = _flat_slots(param_states)
        unknown = sorted(set(flat_states) - set(flat_params))
        if unknown:
            raise ValueError(f'save_t5x_legacy: param_states for unknown parameters: {unknown}')
    ckpt_dir = os.path.join(path, f'checkpoint_{int(step)}')
    if os.path.exists(os.path.join(ckpt_dir, 'checkpoint')):
        raise FileExistsError(f'save_t5x_legacy: {ckpt_dir} already holds a checkpoint')
    os.makedirs(ckpt_dir, exist_ok=True)

    target = {p: _write_tensorstore(ckpt_dir, f'target/{p}', a) for p, a in flat_params.items()}
    states = {}
    for p, a in flat_params.items():
        slots = {name: np.zeros((1,), np.float32) for name in SLOT_NAMES}
        slots.update({k: np.asarray(v) for k, v in flat_states.get(p, {}).items()})
        for name, slot in slots.items():
            full_size = name in ('v', 'm') and slot.shape == a.shape and not _is_placeholder(slot, a.shape)
            states[f'{p}/{name}'] = (_write_tensorstore(ckpt_dir, f'state/param_states/{p}/{name}', slot)
                                     if full_size else slot)
    contents = {'version': LEGACY_VERSION,
                'optimizer': {'target': unflatten(target),
                              'state': {'step': np.asarray(step, np.int32),
                                        'param_states': unflatten(states)}}}
    with open(os.path.join(ckpt_dir, 'checkpoint'), 'wb') as f:
        f.write(serialization.msgpack_serialize(contents))
    return ckpt_dir


def _flat_slots(param_states: Mapping) -> dict:
    """Accept {path: {slot: arr}} or a nested tree ending in {slot: arr} dicts -> {path: {slot: arr}}."""
    flat = flatten(param_states)
    out: dict = {}
    for path, value in flat.items():
        param_path, _, slot = path.rpartition('/')
        if slot not in SLOT_NAMES:
            raise ValueError(f'param_states entry {path!r}: slot name must be one of {SLOT_NAMES}')
        out.setdefault(param_path, {})[slot] = value
    return out


# ----------------------------------------------------------------------------------------------
# Readers.

def _is_ts_spec(value) -> bool:
    return isinstance(value, Mapping) and 'driver' in value and ('kvstore' in value or 'path' in value)


def _read_tensorstore(spec: Mapping, ckpt_dir: str, name: str) -> np.ndarray:
    """Open a spec as stored in the msgpack: relative path, any of file/gfile/gcs kvstores."""
    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    metadata = spec.get('metadata', {})
    # Chunking and compression are read from the zarr metadata on disk; T5X drops them too.
    metadata.pop('chunks', None)
    metadata.pop('compressor', None)
    if spec.get('dtype') == 'uint16' or metadata.get('dtype') == '<u2':
        raise ValueError(f'{name}: uint16-encoded bfloat16 (T5X checkpoint version 2) is not supported')
    kvstore = spec.get('kvstore', {})
    relative = kvstore.get('path', spec.pop('path', None))
    if relative is None:
        raise ValueError(f'{name}: TensorStore spec has no path: {spec}')
    if kvstore.get('driver', 'file') not in ('file', 'gfile', 'gcs'):
        raise ValueError(f'{name}: unsupported TensorStore kvstore driver {kvstore.get("driver")!r}')
    # Checkpoints written to GCS carry a dummy bucket; files live next to the msgpack wherever it is now.
    spec['kvstore'] = _kvstore(ckpt_dir, relative)
    try:
        return np.asarray(ts.open(spec, open=True).result().read().result())
    except Exception as e:  # tensorstore raises ValueError/OSError subclasses with terse messages
        raise ValueError(f'{name}: cannot read TensorStore array at {spec["kvstore"]["path"]}: {e}') from e


def _kvstore(ckpt_dir: str, relative: str) -> dict:
    if ckpt_dir.startswith('gs://'):
        bucket, _, prefix = ckpt_dir[len('gs://'):].partition('/')
        return {'driver': 'gcs', 'bucket': bucket, 'path': f'{prefix.rstrip("/")}/{relative}'.lstrip('/')}
    return {'driver': 'file', 'path': os.path.join(ckpt_dir, relative)}


def _materialize(tree, ckpt_dir: str, prefix: str):
    if _is_ts_spec(tree):
        return _read_tensorstore(tree, ckpt_dir, prefix)
    if isinstance(tree, Mapping):
        return {k: _materialize(v, ckpt_dir, f'{prefix}/{k}') for k, v in tree.items()}
    return np.asarray(tree)


def absolute_path(path) -> str:
    """A local path made absolute (orbax and TensorStore need that); URLs such as gs://bucket/x stay as they are."""
    path = os.fspath(path)
    return path if '://' in path else os.path.abspath(path)


def _find_checkpoint(path: str) -> tuple[str, str]:
    """Resolve `path` (local, relative or gs://) to ('legacy', msgpack file) or ('orbax', state dir)."""
    root = epath.Path(absolute_path(path))
    if root.is_file():
        return 'legacy', str(root)
    if not root.is_dir():
        raise FileNotFoundError(f'T5X checkpoint not found: {path}')
    if (root / 'checkpoint').is_file():
        return 'legacy', str(root / 'checkpoint')
    if (root / 'state').is_dir():
        return 'orbax', str(root / 'state')
    if (root / '_CHECKPOINT_METADATA').is_file() or (root / '_METADATA').is_file():
        return 'orbax', str(root)
    steps = sorted((int(m.group(1)), child.name) for child in root.iterdir()
                   if (m := re.fullmatch(r'checkpoint_(\d+)', child.name)))
    if steps:
        return _find_checkpoint(str(root / steps[-1][1]))
    raise ValueError(f'{path}: not a T5X checkpoint (no checkpoint file, no state/ dir, no checkpoint_<step>/)')


def _read_legacy(msgpack_file: str) -> dict:
    raw = epath.Path(msgpack_file).read_bytes()
    if raw.startswith(b'model_checkpoint_path'):
        raise ValueError(f'{msgpack_file} is a TensorFlow (Mesh TF) checkpoint index, not a T5X checkpoint')
    contents = serialization.msgpack_restore(raw)
    version = contents.get('version', 0) if isinstance(contents, Mapping) else 0
    if version < 2 or 'optimizer' not in contents:
        raise ValueError(f'{msgpack_file}: unsupported T5X checkpoint version {version} (need >= 2 with '
                         f"an 'optimizer' entry)")
    return _materialize(contents['optimizer'], os.path.dirname(msgpack_file), 'optimizer')


def _read_orbax(state_dir: str) -> dict:
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(state_dir)
    tree = getattr(metadata, 'item_metadata', None) or metadata
    tree = getattr(tree, 'tree', tree)
    restore_args = _map_tree(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return _to_numpy_tree(state)


def _map_tree(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _map_tree(fn, v) for k, v in tree.items()}
    return fn(tree)


def load_t5x(path: str, *, with_optimizer_state: bool = False, config=None):
    """Load params from a T5X checkpoint (legacy msgpack+TensorStore or orbax `state/`).

    path: a `checkpoint_<step>` dir, its `checkpoint` msgpack file, its `state/` dir, or a directory of
    `checkpoint_<step>` dirs (the highest step is used).
    config: a T5Config to validate against; default: inferred from the shapes (see infer_config), so
    the names and shapes are always checked.
    Returns params (nested dict of numpy arrays), or (params, {'step': int, 'slots': {flat path: {slot:
    array}}}) when with_optimizer_state; placeholder (1,)-slots are dropped, so factored parameters have
    v_row/v_col and the others v (plus m when T5X used momentum).
    """
    kind, location = _find_checkpoint(absolute_path(path))
    state = _read_legacy(location) if kind == 'legacy' else _read_orbax(location)
    if 'target' not in state:
        raise ValueError(f"{location}: no 'target' (parameters) in the checkpoint; top keys: {sorted(state)}")
    target = state['target']
    if set(target) == {'params'}:
        target = target['params']
    flat = {p: np.asarray(a) for p, a in flatten(target).items()}
    check_params(flat, config if config is not None else infer_config(flat), source=f'T5X checkpoint {location}')
    params = unflatten(flat)
    if not with_optimizer_state:
        return params
    opt = state.get('state', {})
    step = int(np.asarray(opt.get('step', 0)))
    slots = {}
    for param_path, param_slots in _flat_slots(opt.get('param_states', {})).items():
        if param_path not in flat:
            raise ValueError(f'{location}: optimizer slots for unknown parameter {param_path!r}')
        kept = {k: np.asarray(v) for k, v in param_slots.items()
                if not _is_placeholder(np.asarray(v), flat[param_path].shape)}
        slots[param_path] = kept
    return params, {'step': step, 'slots': slots}


def save_orbax_params(params: Mapping, path: str, *, step: Optional[int] = None,
                      slots: Optional[Mapping] = None) -> str:
    """Write params as a T5X-style orbax checkpoint `path/state/` ({'target': params[, 'state': ...]}).

    step/slots (as returned by load_t5x(with_optimizer_state=True)) are stored under 'state' so a
    conversion keeps the optimizer state; every parameter then carries T5X Adafactor's four slots {v_row, v_col, v,
    m}, the unused ones as (1,)-shaped zeros, which is the tree T5X's checkpointer restores into. Returns the state
    dir. `load_t5x(path)` reads it back.
    """
    tree = {'target': _to_numpy_tree(params)}
    if step is not None or slots:
        tree['state'] = {'step': np.asarray(step or 0, np.int32),
                         'param_states': unflatten(_slots_with_placeholders(params, slots or {}))}
    state_dir = epath.Path(absolute_path(path)) / 'state'
    if state_dir.exists():
        raise FileExistsError(f'save_orbax_params: {state_dir} already exists')
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(state_dir, args=ocp.args.PyTreeSave(tree))
    checkpointer.close() if hasattr(checkpointer, 'close') else None
    return str(state_dir)


def _slots_with_placeholders(params: Mapping, slots: Mapping) -> dict:
    """{'<param>/<slot>': array} with all four T5X slots per parameter ((1,) zeros where a slot is unused)."""
    flat_params = flatten(params)
    unknown = sorted(set(slots) - set(flat_params))
    if unknown:
        raise ValueError(f'save_orbax_params: slots for unknown parameters: {unknown[:5]}')
    out = {}
    for p in flat_params:
        for name in SLOT_NAMES:
            value = slots.get(p, {}).get(name)
            out[f'{p}/{name}'] = np.zeros((1,), np.float32) if value is None else np.asarray(value)
    return out
