"""Parameters of a trained checkpoint, laid out on the run's mesh (eval, export, inference tools)."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax

from flan_jax import models
from flan_jax.checkpoints import run_dir as trained
from flan_jax.train import partitioning, peft_state as peft


def _resolve(path: str) -> tuple[str, int]:
    """(checkpoint_<step> dir, step) from that dir, a MODEL_DIR (its latest checkpoint) or MODEL_DIR/best."""
    found = trained.find_trained_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--checkpoint={os.path.abspath(path)}: no checkpoint_<step> found")
    return found


def abstract_params(cfg, mesh) -> dict:
    """ShapeDtypeStructs of the params with the shardings training gives them on `mesh`."""
    shapes = models.param_shapes(cfg.model)
    shardings = partitioning.param_shardings(shapes, models.param_logical_axes(cfg.model),
                                             partitioning.logical_rules(cfg.mesh), mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_params(cfg, checkpoint: str) -> tuple[dict, int]:
    """(params, step) of a checkpoint_<step> dir, MODEL_DIR/best or a MODEL_DIR's latest, laid out on cfg's mesh.
    Params only: the optimizer state is neither read nor needed (an eval config may set another optimizer)."""
    checkpoint_dir, step = _resolve(checkpoint)
    mesh = partitioning.make_mesh(cfg.mesh)
    abstract = abstract_params(cfg, mesh)
    if peft.enabled(cfg.model):  # a PEFT checkpoint holds the PEFT params; the base comes from its recorded reference
        trainable = trained.restore_params(checkpoint_dir, {peft.PEFT_KEY: abstract[peft.PEFT_KEY]})
        return peft.with_base(cfg.model, cfg.mesh, mesh, trainable, trained.read_meta(checkpoint_dir), checkpoint), step
    return trained.restore_params(checkpoint_dir, abstract), step


def merged_params(cfg, checkpoint: Optional[str]) -> tuple[Any, dict, int]:
    """(base model config, merged base-shaped params, step) of a PEFT checkpoint (LoRA folds into the kernels)."""
    params, step = restore_params(cfg, checkpoint or cfg.model_dir)
    base_cfg, merged = models.merge_peft(cfg.model, jax.device_get(params))
    return base_cfg, merged, step
