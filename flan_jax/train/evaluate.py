"""Evaluation alone (`flan-jax eval --checkpoint PATH`): restore params, run the Evaluator, log to MODEL_DIR."""
from __future__ import annotations

import os

import jax

from flan_jax import models
from flan_jax.checkpoints import trained
from flan_jax.evaluation.evaluator import Evaluator
from flan_jax.train import loop, partitioning, peft
from flan_jax.train.metrics_log import MetricsWriter


def _resolve(path: str) -> tuple[str, int]:
    """(checkpoint_<step> dir, step) from that dir, a MODEL_DIR (its latest checkpoint) or MODEL_DIR/best."""
    found = trained.find_trained_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--checkpoint={os.path.abspath(path)}: no checkpoint_<step> found")
    return found


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


def abstract_params(cfg: loop.TrainConfig, mesh) -> dict:
    """ShapeDtypeStructs of the params with the shardings training gives them on `mesh`."""
    shapes = models.param_shapes(cfg.model)
    shardings = partitioning.param_shardings(shapes, models.param_logical_axes(cfg.model),
                                             partitioning.logical_rules(cfg.mesh), mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_params(cfg: loop.TrainConfig, checkpoint: str) -> tuple[dict, int]:
    """(params, step) of a checkpoint_<step> dir, MODEL_DIR/best or a MODEL_DIR's latest, laid out on cfg's mesh.
    Params only: the optimizer state is neither read nor needed (an eval config may set another optimizer)."""
    checkpoint_dir, step = _resolve(checkpoint)
    mesh = partitioning.make_mesh(cfg.mesh)
    abstract = abstract_params(cfg, mesh)
    if peft.enabled(cfg.model):  # a PEFT checkpoint holds the PEFT params; the base comes from its recorded reference
        trainable = trained.restore_params(checkpoint_dir, {peft.PEFT_KEY: abstract[peft.PEFT_KEY]})
        return peft.with_base(cfg.model, cfg.mesh, mesh, trainable, trained.read_meta(checkpoint_dir), checkpoint), step
    return trained.restore_params(checkpoint_dir, abstract), step


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
    loop.log_eval(writer, step, results)
    writer.close()
    return results
