"""Where training and evaluation figures go: MODEL_DIR/metrics.jsonl (the contract other tools read), TensorBoard, console.

metrics.jsonl holds one JSON object per line: {"step", "split": "train"|"eval", "task", "metric", "value"}.
Throughput figures (steps_per_sec, tokens_per_sec, tflops_per_sec, mfu) count training steps only; the seconds an
evaluation or a checkpoint save took are train metrics of their own (eval_seconds, checkpoint_seconds) at that step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Mapping, Optional

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, model_dir: str, enable_tensorboard: bool = True):
        self.is_writer = jax.process_index() == 0
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._tb = {}
        self._model_dir = model_dir
        self._enable_tb = enable_tensorboard and self.is_writer

    def _tensorboard(self, split: str):
        if split not in self._tb:
            self._tb[split] = SummaryWriter(os.path.join(self._model_dir, "tb", split))
        return self._tb[split]

    def write(self, step: int, split: str, task: str, values: Mapping[str, float]) -> None:
        if not self.is_writer:
            return
        with open(self.path, "a") as f:
            for metric, value in values.items():
                value = float(value)
                f.write(json.dumps({"step": int(step), "split": split, "task": task, "metric": metric,
                                                        "value": value if math.isfinite(value) else str(value)}) + "\n")
        if self._enable_tb:
            tb = self._tensorboard(split)
            for metric, value in values.items():
                tag = metric if task in ("", "all") else f"{task}/{metric}"
                tb.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        for tb in self._tb.values():
            tb.flush()

    def close(self) -> None:
        for tb in self._tb.values():
            tb.close()
        self._tb = {}


def parse_metric_lines(lines) -> tuple[list[dict], int]:
    """(rows, count of lines skipped): a line that is not a JSON object (a write torn by a kill, or a torn line with
    the next run's row appended to it) is skipped."""
    rows, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def read_metrics(model_dir: str) -> list[dict]:
    """metrics.jsonl's rows; torn lines are skipped with a warning."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        rows, skipped = parse_metric_lines(f)
    if skipped:
        logging.warning("%s: skipped %d line(s) that are not whole JSON rows (torn writes)", path, skipped)
    return rows


def truncate_metrics(model_dir: str, step: int) -> int:
    """Drops metrics.jsonl rows past `step` (and torn lines): a resumed run writes those steps again. Returns the
    number of rows dropped. Written to a temporary file and renamed, so a kill leaves the old or the new file."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return 0
    with open(path, errors="replace") as f:
        rows, skipped = parse_metric_lines(f)
    kept = [row for row in rows if int(row["step"]) <= step]
    dropped = len(rows) - len(kept) + skipped
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(path + ".tmp", path)
        logging.info("%s: dropped %d row(s) past step %d", path, dropped, step)
    return dropped


class ProgressPrinter:
    """One console line per log period: step, loss, steps/s, ETA."""

    def __init__(self, total_steps: int, stream=sys.stdout):
        self.total_steps = total_steps
        self.stream = stream

    def line(self, step: int, loss: float, steps_per_sec: float, extra: Optional[Mapping[str, float]] = None) -> None:
        if jax.process_index() != 0:
            return
        remaining = max(self.total_steps - step, 0)
        eta = remaining / steps_per_sec if steps_per_sec > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        tail = "".join(f"  {k} {v:.4g}" for k, v in (extra or {}).items())
        print(f"step {step:6d}/{self.total_steps}  loss {loss:.4f}  {steps_per_sec:.2f} steps/s  ETA {eta_s}{tail}",
                    file=self.stream, flush=True)
