"""Evaluation alone (`flan-jax eval --checkpoint PATH`): restore params, run the Evaluator, log to MODEL_DIR."""
from __future__ import annotations

import os
import re

import jax
import orbax.checkpoint as ocp

from flan_jax.evaluation.evaluator import Evaluator
from flan_jax.train import checkpointing, loop, optim, partitioning, peft
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


def write_predictions(evaluator: Evaluator, out_dir: str) -> list[str]:
    """One JSONL per eval task ({"index", "input", "target", "prediction"}); NIv2 tasks also go into the official
    prediction file niv2_predictions.jsonl ({"id", "prediction"}, ids of the first 100 test instances per task)."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    written, niv2_ids, niv2_preds = [], [], []
    for d in evaluator.data:
        preds = evaluator.last_predictions[d.name]
        path = os.path.join(out_dir, f"{d.name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i, (tokens, target, pred) in enumerate(zip(d.inputs, d.target_strings, preds)):
                text = evaluator.vocab.decode([int(t) for t in tokens if t > 1])
                f.write(json.dumps({"index": i, "input": text, "target": target, "prediction": pred}) + "\n")
        written.append(path)
        ids = _niv2_ids(d.name, len(preds))
        if ids:
            niv2_ids += ids
            niv2_preds += preds
    if niv2_ids:
        from flan_jax.sources.niv2 import write_niv2_predictions
        path = os.path.join(out_dir, "niv2_predictions.jsonl")
        write_niv2_predictions(path, niv2_ids, niv2_preds)
        written.append(path)
    return written


def _niv2_ids(task_name: str, n: int):
    """Official instance ids for an NIv2 eval task (its examples are the first 100 test instances in file order)."""
    niv2_dir = os.environ.get("FLAN_JAX_NIV2_DIR")
    if not niv2_dir or not task_name.startswith("niv2"):
        return None
    try:
        from tasks import niv2 as niv2_tasks
        from flan_jax.sources import niv2
    except ImportError:
        return None
    reg = niv2_tasks.LAST_REGISTRATION
    base = next((t for t, names in (reg.base_tasks.items() if reg else ())
                 if any(task_name.startswith(name + "_") for name in names)), None)
    if base is None:
        return None
    ids = [row["id"] for row in niv2.test_references(niv2_dir, [base])]
    return ids[:n] if len(ids) >= n else None


def restore_params(cfg: loop.TrainConfig, checkpoint: str) -> tuple[dict, int]:
    """(params, step) of a checkpoint_<step> dir or a MODEL_DIR's latest checkpoint, laid out on cfg's mesh."""
    mesh = partitioning.make_mesh(cfg.mesh)
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    abstract, _ = loop._abstract_state(cfg, optimizer, mesh)
    directory, step = _resolve(checkpoint)
    state, meta = checkpointing.Checkpointer(directory, async_save=False).restore(abstract, step=step)
    if peft.enabled(cfg.model):  # a PEFT checkpoint holds the PEFT params; the base comes from its recorded reference
        return peft.with_base(cfg.model, cfg.mesh, mesh, state["params"], meta, checkpoint), step
    return state["params"], step


def run_eval(cfg: loop.TrainConfig, checkpoint: str, predictions_dir: str = None) -> dict:
    if not cfg.eval_mixture_or_task_name:
        raise ValueError("EVAL_MIXTURE_OR_TASK_NAME is not set in the gin config")
    params, step = restore_params(cfg, checkpoint)
    evaluator = loop.make_evaluator(cfg)
    results = evaluator.evaluate(params)
    if predictions_dir:
        for path in write_predictions(evaluator, predictions_dir):
            print(f"wrote {path}")
    writer = MetricsWriter(cfg.model_dir)
    loop._log_eval(writer, step, results)
    writer.close()
    return results
