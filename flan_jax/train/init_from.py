"""Start finetuning from a public checkpoint (T5X legacy/orbax, a Hugging Face `save_pretrained` directory) or from
one of our own training checkpoints (MODEL_DIR/checkpoint_<N>, MODEL_DIR/best, or a MODEL_DIR for its latest).

Default: load the parameters only and start a fresh Adafactor state at step 0. Restoring T5X's Adafactor slots and step
(`restore_optimizer_state=True`, T5X checkpoints only) reproduces T5X's finetuning exactly: at step ~1.1M the decay
rate 1 - t^-0.8 is ~1, so the pretraining second-moment estimates keep steering the first updates. A fresh state
instead estimates them from the finetuning gradients from the first step (beta2 starts at 0). HF checkpoints carry no
optimizer state, so the fresh state is the default that works for every source.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
import optax

from flan_jax import models
from flan_jax.checkpoints.t5x import flatten
from flan_jax import checkpoints
from flan_jax.checkpoints import run_dir as trained
from flan_jax.checkpoints import vocab_rows


def _flat(tree):
    """(path 'a/b/c', leaf) pairs, the checkpoints' own flattening."""
    return flatten(tree).items()


def load_checkpoint_params(path: str, model_cfg, *, with_optimizer_state: bool = False, vocabulary=None):
    """(params, slots or None, step or None), checked against model_cfg's parameter shapes by name.

    vocabulary: the training vocabulary; an HF tokenizer vocabulary (flan_jax.data.vocabularies.hf) swaps a few ids, and
    an HF checkpoint's vocabulary rows are then put into those ids."""
    if trained.find_trained_checkpoint(path) is not None:
        if with_optimizer_state:
            raise ValueError(f"INIT_CHECKPOINT={path} is one of our training checkpoints: only its params are loaded "
                             "(set train.restore_optimizer_state = False; to continue that run with its optimizer "
                             "state, train again with its MODEL_DIR)")
        params, _ = trained.load_params(path)
        slots = step = None
    elif os.path.exists(os.path.join(path, "config.json")):
        if with_optimizer_state:
            raise ValueError(f"INIT_CHECKPOINT={path} is a Hugging Face checkpoint: it has no Adafactor state "
                             "to restore (set train.restore_optimizer_state = False)")
        _, params = checkpoints.load_hf(path)
        slots = step = None
        if getattr(vocabulary, "hf_order", None) is not None:
            params = vocab_rows.reorder_vocabulary_rows(model_cfg, params, vocabulary.hf_order)
    elif with_optimizer_state:
        params, opt = checkpoints.load_t5x(path, with_optimizer_state=True)
        slots, step = opt["slots"], opt["step"]
    else:
        params, slots, step = checkpoints.load_t5x(path), None, None
    want = dict(_flat(jax.tree.map(lambda s: s.shape, models.param_shapes(model_cfg),
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))))
    have = {k: tuple(np.shape(v)) for k, v in _flat(params)}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: checkpoint {have[k]} vs model config {tuple(want[k])}"
                 for k in sorted(set(want) & set(have)) if tuple(want[k]) != have[k]]
    if problems:
        raise ValueError(f"INIT_CHECKPOINT={path} does not fit the gin model config: " + "; ".join(problems[:10]))
    return params, slots, step


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def adafactor_state_from_slots(opt_state_template, slots: dict, step: int):
    """Fills optax's Adafactor state with T5X slots and step, so updates continue exactly as T5X's would.

    v_row / v_col / v go to the factored second moments (v_row drops the largest dim, v_col the second largest in
    both), T5X's momentum `m` to the optimizer's EMA of updates; the step becomes the factored count and the
    learning-rate schedule's count (a warmup or rsqrt schedule continues from T5X's step rather than from 0). A slot
    with no place in this optimizer (e.g. `m` when AdafactorConfig.beta1 is None) is an error naming it.
    """
    used = set()

    def put(kind, tree, slot_kind=None):
        slot_kind = slot_kind or kind
        def one(path, template):
            key = _key(path)
            value = slots.get(key, {}).get(slot_kind)
            if value is None:
                return template
            if tuple(value.shape) != tuple(template.shape):
                raise ValueError(f"T5X slot {key}/{slot_kind} has shape {value.shape}, optax expects {template.shape}")
            used.add((key, slot_kind))
            return np.asarray(value, template.dtype)
        return jax.tree_util.tree_map_with_path(one, tree)

    def fill(state):
        if isinstance(state, optax.FactoredState):
            return state._replace(count=np.asarray(step, np.int32), v_row=put("v_row", state.v_row),
                                  v_col=put("v_col", state.v_col), v=put("v", state.v))
        if isinstance(state, optax.EmaState):
            return state._replace(count=np.asarray(step, np.int32), ema=put("ema", state.ema, "m"))
        if isinstance(state, optax.ScaleByScheduleState):
            return state._replace(count=np.asarray(step, np.int32))
        return state

    kinds = (optax.FactoredState, optax.EmaState, optax.ScaleByScheduleState)
    filled = jax.tree.map(fill, opt_state_template, is_leaf=lambda x: isinstance(x, kinds))
    unmapped = sorted(f"{key}/{kind}" for key, per in slots.items() for kind in per if (key, kind) not in used)
    if unmapped:
        hint = " (T5X momentum: set AdafactorConfig.beta1 to restore it)" if any(
            u.endswith("/m") for u in unmapped) else ""
        raise ValueError(f"T5X optimizer slot {unmapped[0]} has no place in this Adafactor state{hint}; "
                         f"{len(unmapped)} unmapped: {', '.join(unmapped[:5])}")
    return filled


def initial_params_and_opt_state(init_checkpoint: str, model_cfg, opt_state_template,
                                 restore_optimizer_state: bool, vocabulary=None):
    """(params, opt_state or None, step): what the loop puts into a fresh train state."""
    params, slots, step = load_checkpoint_params(init_checkpoint, model_cfg, vocabulary=vocabulary,
                                                 with_optimizer_state=restore_optimizer_state)
    if not restore_optimizer_state:
        return params, None, 0
    return params, adafactor_state_from_slots(opt_state_template, slots, step), int(step)
