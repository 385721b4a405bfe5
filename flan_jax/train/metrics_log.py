"""Where training and evaluation figures go: MODEL_DIR/metrics.jsonl (the contract other tools read), TensorBoard, console.

metrics.jsonl holds one JSON object per line: {"step", "split": "train"|"eval", "task", "metric", "value"}.
Throughput figures (steps_per_sec, tokens_per_sec, tflops_per_sec, mfu) count training steps only; the seconds an
evaluation or a checkpoint save took are train metrics of their own (eval_seconds, checkpoint_seconds) at that step.
"""
from __future__ import annotations

import json
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


def read_metrics(model_dir: str) -> list[dict]:
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
