"""Training side of parameter-efficient tuning (LoRA, adapters, prompt and prefix tuning; models/peft.py builds them).

The trainable set is exactly `params['peft']`; everything else is the frozen base. A PEFT train state is the usual
{step, params, opt_state, nonfinite_step} with `params = {'peft': ...}` only, so the optimizer holds state for the
PEFT parameters alone and a checkpoint holds only them. The frozen base travels beside the state (a `FrozenBase`):
the jitted step takes it as an argument it does not differentiate, and eval joins the two trees.

Checkpoints record where the base came from (`meta['peft_base']`: path, step, format), and so does
MODEL_DIR/peft_base.json; resume and `flan-jax eval` reload the base from that record, so a PEFT run directory plus
its base checkpoint is the whole model. The base is one of: our own MODEL_DIR (its latest checkpoint, pinned to that
step) or checkpoint_<step> directory, a T5X checkpoint, or a Hugging Face `save_pretrained` directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from etils import epath

from flan_jax import models
from flan_jax.checkpoints import run_dir as trained
from flan_jax.data import registry
from flan_jax.models import quant
from flan_jax.pipeline import batches as data_lib
from flan_jax.train import checkpointing, init_from, optim, partitioning, state as state_lib

PEFT_KEY = state_lib.PEFT_KEY
REFERENCE_FILE = "peft_base.json"
META_KEY = "peft_base"

enabled = state_lib.peft_enabled
split_params = state_lib.split_trainable  # (trainable {'peft': ...}, frozen base) of a full parameter tree


def base_config(model_cfg):
    """The model config of the frozen base (no PEFT)."""
    return dataclasses.replace(model_cfg, peft=None) if enabled(model_cfg) else model_cfg


def join_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def parameter_counts(model_cfg) -> dict:
    """{'trainable_parameters', 'total_parameters'} of a model config (trainable = total without PEFT)."""
    total = models.count_params(model_cfg)
    if not enabled(model_cfg):
        return {"trainable_parameters": float(total), "total_parameters": float(total)}
    trainable = _size(models.param_shapes(model_cfg)[PEFT_KEY])
    return {"trainable_parameters": float(trainable), "total_parameters": float(total)}


# --- train state ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FrozenBase:
    params: Any          # the base parameter tree on the mesh, laid out as StateLayout.frozen (never updated)
    reference: dict      # {"path", "step", "format"}: where it was loaded from (recorded in checkpoints)


def init_trainable(model_cfg, rng, frozen: dict, label_token_ids=None, prompt=None) -> dict:
    """{'peft': ...} initialized for `model_cfg` (prompt init may read the base's embeddings, take the class labels'
    token ids, or a saved prompt)."""
    trainable = models.init_peft(model_cfg, rng, frozen, label_token_ids=label_token_ids)
    if prompt is not None:
        trainable = {**trainable, "prompt": jnp.asarray(prompt, jnp.float32)}
    return {PEFT_KEY: trainable}


LABEL_SCAN_EXAMPLES = 64   # train examples read per option task whose records carry their own options
MAX_CLASS_LABELS = 10      # ...whose distinct options there count as class labels only if they are this few


def mixture_class_labels(mixture_or_task_name: str) -> list[str]:
    """Class labels of the mixture's option tasks, in order of first appearance (prompt init 'labels'): a task's
    fixed options, or the options of a task whose records carry their own when those form a small closed set (its
    first LABEL_SCAN_EXAMPLES train examples show at most MAX_CLASS_LABELS distinct ones; numbers or free answers
    are no class labels)."""

    labels, seen_base = [], set()
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name)):
        try:
            info = registry.task_info(task.name)
        except KeyError:  # not one of ours: nothing declares its options
            continue
        if not info.has_options or info.base_task in seen_base:
            continue
        seen_base.add(info.base_task)
        options = registry.task_spec(info.base_task).fixed_options
        if options is None:
            ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, use_cached=False)
            found = []
            for ex in ds.take(LABEL_SCAN_EXAMPLES).as_numpy_iterator():
                found += [o.decode() for o in ex["options"] if o.decode() not in found]
            options = found if len(found) <= MAX_CLASS_LABELS else ()
        labels += [o for o in options if o not in labels]
    return labels


def prompt_init_inputs(cfg) -> dict:
    """init_trainable's label_token_ids / prompt for cfg's PeftConfig.prompt_init."""
    peft_cfg = cfg.model.peft
    if peft_cfg.method != "prompt" or peft_cfg.prompt_init == "vocab":
        return {}
    if peft_cfg.prompt_init.endswith(".npy"):
        return {"prompt": models.load_prompt(peft_cfg.prompt_init, cfg.model)}
    labels = mixture_class_labels(cfg.input.mixture_or_task_name)
    if not labels:
        raise ValueError(f"PeftConfig.prompt_init='labels': no option task with fixed options in "
                         f"{cfg.input.mixture_or_task_name!r}; use 'vocab' or a .npy file")
    vocabulary = data_lib.targets_vocabulary(cfg.input)
    logging.info("prompt init from %d class labels of %s", len(labels), cfg.input.mixture_or_task_name)
    return {"label_token_ids": [vocabulary.encode(label) for label in labels]}


def init_or_restore(cfg, layout: state_lib.StateLayout, optimizer, ckpt: checkpointing.Checkpointer):
    """(state, first step, FrozenBase) in `layout` (train/state.py, PEFT): resume MODEL_DIR's latest PEFT checkpoint
    (its base reloaded from the recorded reference), else load INIT_CHECKPOINT as the base and initialize the PEFT
    parameters."""
    resumed = ckpt.restore_latest(layout.abstract)
    if resumed is not None:
        state, meta_ = resumed
        reference = reference_from_meta(meta_, cfg.model_dir)
        check_same_base(cfg.init_checkpoint, reference)
        base = FrozenBase(load_base(reference, layout.frozen, cfg.model), reference)
        logging.info("resumed PEFT from %s/checkpoint_%d on base %s", cfg.model_dir, meta_["step"], reference)
        return state, int(meta_["step"]), base
    if not cfg.init_checkpoint:
        raise ValueError("train.peft is set but INIT_CHECKPOINT (train.init_checkpoint) is not: PEFT trains on top of "
                         "a base checkpoint (a MODEL_DIR or checkpoint_<step> dir, T5X or Hugging Face)")
    reference = resolve_base(cfg.init_checkpoint)
    base = FrozenBase(load_base(reference, layout.frozen, cfg.model), reference)
    write_reference(cfg.model_dir, reference)
    init_inputs = prompt_init_inputs(cfg)
    state = state_lib.init_on_mesh(lambda rng, frozen: init_trainable(cfg.model, rng, frozen, **init_inputs),
                                   optimizer, layout, jax.random.PRNGKey(cfg.seed), base.params)
    return state, 0, base


def check_converter(model_cfg, converter) -> None:
    """Prompt tuning on packed rows needs the packer to reserve the prompt slots in every segment (peft/prompt.gin
    binds PackedEncDecFeatureConverter / PackedPrefixLMFeatureConverter.prompt_slots = PROMPT_LENGTH)."""
    method = model_cfg.peft.method if enabled(model_cfg) else None
    if method != "prompt":
        return
    options = getattr(converter, "packing_options", None)
    packs = options is not None or bool(getattr(converter, "pack", False))
    slots = (options or {}).get("prompt_slots", 0)
    if packs and slots != model_cfg.peft.prompt_length:
        raise ValueError(f"prompt tuning: the feature converter {type(converter).__name__} reserves {slots} prompt "
                         f"slots per packed segment, PeftConfig.prompt_length is {model_cfg.peft.prompt_length}; set "
                         "<Converter>.prompt_slots = %PROMPT_LENGTH (peft/prompt.gin does for ours)")


def full_params(state: dict, base: Optional[FrozenBase]) -> dict:
    """The parameters the model runs on: the state's own, joined with the frozen base for PEFT."""
    return state["params"] if base is None else join_params(state["params"], base.params)


def meta(base: Optional[FrozenBase]) -> dict:
    """Extra checkpoint metadata: the base reference of a PEFT run, nothing otherwise."""
    return {} if base is None else {META_KEY: base.reference}


# --- the base checkpoint -------------------------------------------------------------------------------------------
def resolve_base(init_checkpoint: str) -> dict:
    """The reference {"path", "step", "format"} of INIT_CHECKPOINT; a MODEL_DIR is pinned to its latest step now."""
    own = trained.find_trained_checkpoint(init_checkpoint)
    if own is not None:  # pinned as (the manager dir, the step), so a later save in that MODEL_DIR changes nothing
        return {"path": os.path.dirname(own[0]), "step": own[1], "format": "flan_jax"}
    path = os.path.abspath(init_checkpoint)
    if not os.path.exists(path):
        raise FileNotFoundError(f"INIT_CHECKPOINT={init_checkpoint}: no such checkpoint")
    fmt = "hf" if os.path.exists(os.path.join(path, "config.json")) else "t5x"
    return {"path": path, "step": None, "format": fmt}


def check_same_base(init_checkpoint: Optional[str], reference: dict) -> None:
    """A resumed run's INIT_CHECKPOINT, if set, must name the base its checkpoints were trained on."""
    if not init_checkpoint:
        return
    now = resolve_base(init_checkpoint) if os.path.exists(init_checkpoint) else {"path": init_checkpoint}
    if now["path"] != reference["path"] or (now.get("step") is not None and reference["step"] is not None
                                            and now["step"] != reference["step"]):
        raise ValueError(f"INIT_CHECKPOINT={init_checkpoint} is not the base this PEFT run was trained on "
                         f"({reference['path']} step {reference['step']}); unset it or use another MODEL_DIR")


def load_base(reference: dict, frozen_abstract, model_cfg) -> dict:
    """The base parameters named by `reference`, laid out as `frozen_abstract` (ShapeDtypeStructs with shardings).
    QLoRA: a quantized `frozen_abstract` gets the checkpoint quantized once, here; full-precision params in it come
    back quantized as the model config says (eval and merge run on the base the LoRA factors were trained on)."""
    mode = model_cfg.peft.base_quantization if enabled(model_cfg) else None
    params = _load_full(reference, quant.full_precision(frozen_abstract), model_cfg)
    if not mode:
        return params
    if not quant.any_quantized(frozen_abstract):   # a full-precision layout given (eval): XLA lays the result out
        return jax.jit(lambda p: quant.quantize_tree(p, mode))(params)
    shardings = jax.tree.map(lambda a: a.sharding, frozen_abstract)
    return jax.jit(lambda p: quant.quantize_tree(p, mode), out_shardings=shardings)(params)


def _load_full(reference: dict, frozen_abstract, model_cfg) -> dict:
    path, fmt = reference["path"], reference["format"]
    if fmt == "flan_jax":
        checkpoint_dir = os.path.join(path, f"{checkpointing.STEP_PREFIX}_{reference['step']}")
        if trained.find_trained_checkpoint(checkpoint_dir) is None:
            raise FileNotFoundError(f"PEFT base checkpoint {checkpoint_dir} does not exist")
        return checkpointing.restore_params(checkpoint_dir, frozen_abstract)
    params, _, _ = init_from.load_checkpoint_params(path, base_config(model_cfg))
    cast = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, frozen_abstract)
    return jax.device_put(cast, jax.tree.map(lambda a: a.sharding, frozen_abstract))


def write_reference(model_dir: str, reference: dict) -> None:
    if jax.process_index() == 0:
        epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
        (epath.Path(model_dir) / REFERENCE_FILE).write_text(json.dumps(reference, indent=1) + "\n")


def reference_from_meta(meta: dict, where: str) -> dict:
    if META_KEY not in meta:
        raise ValueError(f"checkpoint in {where} has no base reference ({META_KEY}): it is not a PEFT checkpoint "
                         "(unset train.peft to load it as a full model)")
    return meta[META_KEY]


def with_base(model_cfg, frozen_abstract, trainable: dict, meta_: dict, where: str) -> dict:
    """Full parameters of a restored PEFT checkpoint: its PEFT params joined with the base it records, laid out as
    `frozen_abstract` (the frozen part of state.abstract_params)."""
    reference = reference_from_meta(meta_, where)
    return join_params(trainable, load_base(reference, frozen_abstract, model_cfg))


# --- export --------------------------------------------------------------------------------------------------------
def save_merged(base_cfg, params: dict, step: int, out_dir: str, source: str) -> str:
    """Writes `params` as one of our train-state checkpoints (OUT/checkpoint_<step>, a fresh default Adafactor state)
    that `flan-jax eval` with the base's run config, or INIT_CHECKPOINT, reads."""
    optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = state_lib.new_state(params, optimizer, step)
    ckpt = checkpointing.Checkpointer(out_dir, keep=None, async_save=False)
    ckpt.save(step, state, {"step": int(step), "seed": 0, "batches_consumed": int(step), "merged_from": source})
    ckpt.close()
    return os.path.join(out_dir, f"{checkpointing.STEP_PREFIX}_{step}")
