"""Parameters of a trained checkpoint, laid out on the run's mesh (eval, export, inference tools)."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax

from flan_jax import models
from flan_jax.checkpoints import run_dir as trained
from flan_jax.train import checkpointing, partitioning, peft_state as peft, state as state_lib


def _resolve(path: str) -> tuple[str, int]:
    """(checkpoint_<step> dir, step) from that dir, a MODEL_DIR (its latest checkpoint) or MODEL_DIR/best."""
    found = trained.find_trained_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--checkpoint={os.path.abspath(path)}: no checkpoint_<step> found")
    return found


def restore_params(cfg, checkpoint: str) -> tuple[dict, int]:
    """(params, step) of a checkpoint_<step> dir, MODEL_DIR/best or a MODEL_DIR's latest, laid out on cfg's mesh.
    Params only: the optimizer state is neither read nor needed (an eval config may set another optimizer)."""
    checkpoint_dir, step = _resolve(checkpoint)
    abstract = state_lib.abstract_params(cfg.model, cfg.mesh, partitioning.make_mesh(cfg.mesh))
    if not state_lib.peft_enabled(cfg.model):
        return checkpointing.restore_params(checkpoint_dir, abstract), step
    # A PEFT checkpoint holds the PEFT params; the base comes from its recorded reference.
    trainable_abstract, frozen_abstract = state_lib.split_trainable(abstract)
    trainable = checkpointing.restore_params(checkpoint_dir, trainable_abstract)
    meta = trained.read_meta(checkpoint_dir)
    return peft.with_base(cfg.model, frozen_abstract, trainable, meta, checkpoint), step


def merged_params(cfg, checkpoint: Optional[str]) -> tuple[Any, dict, int]:
    """(base model config, merged base-shaped params, step) of a PEFT checkpoint (LoRA folds into the kernels)."""
    params, step = restore_params(cfg, checkpoint or cfg.model_dir)
    base_cfg, merged = models.merge_peft(cfg.model, jax.device_get(params))
    return base_cfg, merged, step
