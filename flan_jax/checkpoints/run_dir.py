"""Our own training checkpoints (MODEL_DIR/checkpoint_<N>, MODEL_DIR/best/checkpoint_<N>) as a source of parameters.

flan_jax.train.checkpointing writes each step through orbax's Composite layout:
    checkpoint_<N>/state/   PyTree {'step', 'nonfinite_step', 'params', 'opt_state'}
    checkpoint_<N>/meta/    JSON {'step', 'seed', 'batches_consumed', 'model': {'family', 'config'}}
Restoring the whole `state` needs the optimizer's state structure (optax named tuples, which only the training config
can rebuild), so readers outside training restore `params` alone (orbax's partial restore). `meta['model']` records
the model config (runs from before it was recorded lack it: T5 configs are then inferred from the shapes).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Optional

import numpy as np
from flan_jax import models
from etils import epath
import orbax.checkpoint as ocp
import jax
from flan_jax.checkpoints import hf_tokenizer, param_check, t5x, vocab_rows

STEP_PREFIX = 'checkpoint'
STATE_ITEM, META_ITEM = 'state', 'meta'


# --- model config record ---------------------------------------------------------------------------------------------
def model_record(config, vocabulary=None) -> dict:
    """JSON-ready {'family', 'config'} of a model config (T5Config, DecoderConfig), saved in each checkpoint's meta;
    with a vocabulary also its kind (hf_tokenizer.vocabulary_record: the tokenizer an HF export writes) and, for an
    HF tokenizer vocabulary, the id swaps it applies (flan_jax.data.vocabularies.hf), so that an export can put the
    vocabulary rows back into the tokenizer's own order."""
    record = {'family': models.family(config).name, 'config': dataclasses.asdict(config)}
    described = hf_tokenizer.vocabulary_record(vocabulary) if vocabulary is not None else None
    if described:
        record['vocabulary'] = described
    swaps = getattr(vocabulary, 'swaps', None)
    if swaps:
        record.update(vocabulary_swaps=[list(map(int, s)) for s in swaps], vocabulary_size=int(vocabulary.vocab_size))
    return record


def model_from_record(record: dict):
    """The model config saved by model_record (JSON lists back to the tuples the frozen configs hold)."""
    config_type = models.family_by_name(record['family']).config_type
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record['config'].items()}
    return config_type(**fields)


# --- locating ----------------------------------------------------------------------------------------------------------
def _is_step_dir(path: str) -> bool:
    root = epath.Path(path)
    return (root / STATE_ITEM).is_dir() and (root / META_ITEM).is_dir()


def find_trained_checkpoint(path: str) -> Optional[tuple[str, int]]:
    """(checkpoint_<N> dir, N) when `path` is one of our training checkpoints, a MODEL_DIR (its latest) or
    MODEL_DIR/best; None when it is none of these (a T5X or HF checkpoint, say). Unfinished (tmp) saves are skipped."""
    path = os.fspath(path).rstrip('/')
    path = path if '://' in path else os.path.abspath(path)
    root = epath.Path(path)
    if not root.is_dir():
        return None
    own = re.fullmatch(rf'{STEP_PREFIX}_(\d+)', root.name)
    if own and _is_step_dir(path):
        return path, int(own.group(1))
    steps = sorted((int(m.group(1)), child) for child in root.iterdir()
                   if (m := re.fullmatch(rf'{STEP_PREFIX}_(\d+)', child.name)) and _is_step_dir(str(child)))
    if steps:
        return str(steps[-1][1]), steps[-1][0]
    return None


def read_meta(checkpoint_dir: str) -> dict:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(checkpoint_dir, META_ITEM))


# --- restoring -----------------------------------------------------------------------------------------------------
def _saved_params(checkpointer, state_dir: str):
    """The saved `params` tree of array metadata (shape, dtype), read without the arrays."""
    logging.getLogger('absl').setLevel(logging.ERROR)  # orbax warns that state/ lacks a step-level metadata file
    saved = checkpointer.metadata(state_dir)
    tree = getattr(saved, 'item_metadata', None) or saved
    tree = getattr(tree, 'tree', tree)
    if 'params' not in tree:
        raise ValueError(f'{state_dir}: no params in this training checkpoint (top keys: {sorted(tree)})')
    return tree['params']


def check_restorable(saved, abstract_params, *, source: str) -> None:
    """Every leaf of `abstract_params` is saved with its shape: orbax's partial restore would hand a missing one back
    unfilled, and a shape mismatch would surface only inside a jitted step. Saved leaves beyond it are fine (PEFT
    restores the frozen and trainable parts separately); a dtype differing from the saved one is cast by orbax."""
    want = {p: (tuple(a.shape), np.dtype(a.dtype)) for p, a in t5x.flatten(abstract_params).items()}
    have = t5x.flatten(_dict_tree(saved))   # ArrayMetadata leaves: np.shape reads their .shape
    found = [f for f in param_check.problems(have, want, check_dtype=False) if f[0] != 'unexpected']
    param_check.raise_first(source, 'the model config', found)


def restore_params(checkpoint_dir: str, abstract_params: Any = None):
    """The `params` of a checkpoint_<N> dir, without its optimizer state.

    abstract_params: a tree of jax.ShapeDtypeStruct with .sharding (restored as sharded jax.Arrays, as training lays
    them out; each one must be saved with its shape, see check_restorable); None restores numpy arrays of the saved
    shapes and dtypes (for conversion on one host; load_trained checks them against the model config).
    """
    state_dir = os.path.join(checkpoint_dir, STATE_ITEM)
    checkpointer = ocp.PyTreeCheckpointer()
    saved = _saved_params(checkpointer, state_dir)
    if abstract_params is None:
        abstract_params = saved
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_params)
    else:
        check_restorable(saved, abstract_params, source=f'training checkpoint {checkpoint_dir}')
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={'params': abstract_params}, restore_args={'params': restore_args}, partial_restore=True))
    return restored['params']


def load_params(path: str):
    """(params as numpy, step) of a training checkpoint (see find_trained_checkpoint for `path`), unchecked."""
    found = find_trained_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f'{path}: not a training checkpoint (no checkpoint_<N>/ with state/ and meta/)')
    checkpoint_dir, step = found
    return _numpy_tree(restore_params(checkpoint_dir)), step


def load_trained(path: str, config=None):
    """(model config, params as numpy, step) of a training checkpoint (see find_trained_checkpoint for `path`).

    config: used when given; else the one recorded in the checkpoint's meta; else inferred from the shapes (T5 only).
    The parameters are checked against the config by name and shape. Vocabulary rows trained in an HF tokenizer
    vocabulary's swapped ids are put back into the tokenizer's order (what HF export and serving expect).
    """
    params, step = load_params(path)
    checkpoint_dir, _ = find_trained_checkpoint(path)
    flat = t5x.flatten(params)
    record = read_meta(checkpoint_dir).get('model')
    if config is None and record is not None:
        config = model_from_record(record)
    elif config is None:
        try:
            config = t5x.infer_config(flat)
        except ValueError as e:
            raise ValueError(f'{checkpoint_dir} records no model config (written before configs were saved) '
                             f'and is not a T5 ({e}); pass --hf_config with the config.json it was '
                             'finetuned from') from None
    t5x.check_params(flat, config, source=f'training checkpoint {checkpoint_dir}')
    if record is not None and record.get('vocabulary_swaps'):  # back to the tokenizer's own ids
        order = vocab_rows.order_from_swaps(record['vocabulary_size'], record['vocabulary_swaps'])
        params = vocab_rows.reorder_vocabulary_rows(config, params, vocab_rows.inverse(order))
    return config, params, step


def _dict_tree(tree):
    """Nested plain dicts (orbax may hand back its own mapping types), leaves untouched."""
    return {k: _dict_tree(v) for k, v in tree.items()} if hasattr(tree, 'items') else tree


def _numpy_tree(tree):
    """Nested dicts of numpy arrays (orbax may hand back its own mapping types)."""
    if hasattr(tree, 'items'):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def trained_vocabulary(path: str):
    """The vocabulary of a training checkpoint (see find_trained_checkpoint for `path`): MODEL_DIR/vocabulary.model,
    else the kind its metadata records (hf_tokenizer.run_vocabulary); None when neither tells."""
    found = find_trained_checkpoint(path)
    if found is None:
        return None
    record = (read_meta(found[0]).get('model') or {}).get('vocabulary')
    return hf_tokenizer.run_vocabulary(found[0], record)
