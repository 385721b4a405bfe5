"""What `flan-jax train` prints around a run (process 0): the start banner, and the end summary with final and best
metrics, what the data cost (records skipped per task and why, examples truncated or dropped by packing) and the
commands to run next."""
from __future__ import annotations

import json
import math
import re
from typing import Optional

import jax
import seqio
from etils import epath

from flan_jax import models
from flan_jax.train import loop, partitioning, validation
from flan_jax.train.metrics_log import read_metrics

def targets_vocabulary(cfg):
    return seqio.get_mixture_or_task(cfg.input.mixture_or_task_name).output_features["targets"].vocabulary


def latest_checkpoint_step(model_dir: str) -> Optional[int]:
    """N of MODEL_DIR's newest checkpoint_N (what the loop resumes from), None for a fresh run."""
    root = epath.Path(model_dir)
    if not root.exists():
        return None
    steps = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    return max(steps) if steps else None


def start_banner(cfg) -> str:
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(models.param_shapes(cfg.model)))
    vocab = targets_vocabulary(cfg)
    dp, mp = partitioning.validate_mesh(cfg.mesh, jax.device_count())
    step = latest_checkpoint_step(cfg.model_dir)
    family = type(cfg.model).__name__.removesuffix("Config")
    lines = [f"model        {family}, {n_params / 1e6:,.1f}M parameters"
             + (" (+ PEFT)" if getattr(cfg.model, "peft", None) is not None else ""),
             f"vocabulary   {type(vocab).__name__}, {vocab.vocab_size} ids (embedding: {cfg.model.vocab_size} rows)",
             f"mixture      {cfg.input.mixture_or_task_name} (eval: {cfg.eval_mixture_or_task_name or 'none'}; "
             f"BEST_METRIC={cfg.best_metric})",
             f"devices      {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); "
             f"mesh data={dp} model={mp}",
             f"MODEL_DIR    {cfg.model_dir}",
             f"start        {f'resuming from checkpoint_{step}' if step is not None else 'fresh'}, "
             f"to step {cfg.train_steps}"]
    return "\n".join(["=== flan-jax train", *lines])


def end_summary(cfg, results: dict) -> str:
    groups = [g for g in validation.AGGREGATES if g in results] or sorted(results)
    lines = ["=== flan-jax train: done"]
    lines += [f"final eval   {g}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[g].items()))
              for g in groups]
    best_file = epath.Path(cfg.model_dir) / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    if best:
        lines.append(f"best         {best['path']} ({best['metric']}={best['value']:.4f} at step {best['step']})")
    ckpt = best["path"] if best else cfg.model_dir
    convert = (f"flan-jax convert --merge-peft --to hf --gin_file={cfg.model_dir}/config.gin {cfg.model_dir}_hf"
               if getattr(cfg.model, "peft", None) is not None
               else f"flan-jax convert --from t5x --to hf {ckpt} {cfg.model_dir}_hf")
    lines += data_summary(cfg.model_dir)
    lines += ["next:", f"  flan-jax eval --gin_file={cfg.model_dir}/config.gin --checkpoint={ckpt}",
              f"  python scripts/plot_metrics.py {cfg.model_dir}", f"  {convert}"]
    return "\n".join(lines)


def data_summary(model_dir: str) -> list:
    """Lines on what the data cost, from the latest counters in metrics.jsonl (restored on resume, so a resumed run
    reports the whole run): packing's examples in / truncated / dropped, and each task's skipped records by reason."""
    latest = {}
    for row in read_metrics(model_dir):
        if row["split"] == "train":
            latest[(row["task"], row["metric"])] = row["value"]
    packed = {metric: value for (_, metric), value in latest.items() if metric.startswith("packing_")}
    errors = {}
    for (task, metric), value in latest.items():
        if metric.startswith("data_errors/") and value:
            errors.setdefault(task, {"data_errors": 0})[metric] = value
            errors[task]["data_errors"] += value
    lines = loop.data_lines(packed, errors, data_label="data        ", skipped_label="skipped     ")
    if lines and not errors:
        lines.append("skipped      no malformed records")
    return lines
