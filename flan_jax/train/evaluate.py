"""Evaluation alone (`flan-jax eval --checkpoint PATH`): restore params, run the Evaluator, log to MODEL_DIR."""
from __future__ import annotations

import os
import re

import jax
import orbax.checkpoint as ocp

from flan_jax.evaluation.evaluator import Evaluator
from flan_jax.train import checkpointing, loop, optim, partitioning
from flan_jax.train.metrics_log import MetricsWriter


def _resolve(path: str) -> tuple[str, int]:
    """(manager dir, step) from a checkpoint_<step> dir or a MODEL_DIR (its latest checkpoint)."""
    path = os.path.abspath(path.rstrip("/"))
    m = re.fullmatch(rf"{checkpointing.STEP_PREFIX}_(\d+)", os.path.basename(path))
    if m:
        return os.path.dirname(path), int(m.group(1))
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
            step_prefix=checkpointing.STEP_PREFIX, read_only=True))
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"--checkpoint={path}: no checkpoint_<step> found")
    return path, step


def run_eval(cfg: loop.TrainConfig, checkpoint: str) -> dict:
    if not cfg.eval_mixture_or_task_name:
        raise ValueError("EVAL_MIXTURE_OR_TASK_NAME is not set in the gin config")
    mesh = partitioning.make_mesh(cfg.mesh)
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    abstract, _ = loop._abstract_state(cfg, optimizer, mesh)
    directory, step = _resolve(checkpoint)
    state, _ = checkpointing.Checkpointer(directory, async_save=False).restore(abstract, step=step)
    evaluator = Evaluator(cfg.eval_mixture_or_task_name, cfg.input.task_feature_lengths, cfg.model,
                                                seen_base_tasks=loop.seen_base_tasks(cfg.input.mixture_or_task_name),
                                                examples_per_task=cfg.eval_examples_per_task, batch_size=cfg.eval_batch_size)
    results = evaluator.evaluate(state["params"])
    writer = MetricsWriter(cfg.model_dir)
    loop._log_eval(writer, step, results)
    writer.close()
    return results
