"""The one training loop: step a TrainState through batches, and at set periods log, evaluate and checkpoint.

SFT and PEFT (train/loop.py), the reward model and DPO (train/preference/loop.py) run through `Trainer`; what differs
between them (how a host batch reaches the step, extra train figures, what an evaluation is, checkpoint metadata)
comes from a `Hooks` object. PPO (train/rl/ppo.py) keeps its own iteration structure and takes its eval and
checkpoint points from the same `Periods`.

Shared by all: metrics.jsonl rows through MetricsWriter (train figures at log points, every eval result), the console
progress line, throughput over training steps only (eval and checkpoint seconds are left out of the log window), the
non-finite stop (state['nonfinite_step'], read at log and checkpoint points), keep-best, and resume from the latest
checkpoint (the caller restores; the loop starts at `start`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from flan_jax.train import checkpointing, optim
from flan_jax.train.metrics_log import MetricsWriter, ProgressPrinter


class NonFiniteLossError(RuntimeError):
    pass


class Interrupted(SystemExit):
    """SIGTERM or SIGINT stopped the run after a checkpoint was saved. Exits with 128 + the signal number (143 for
    SIGTERM, 130 for SIGINT), as a shell reports a process a signal ended: schedulers see a non-zero status."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class StopSignals:
    """While active, the first SIGTERM/SIGINT only sets `received` (the loop finishes its step and saves); a second
    one ends the process at once. Handlers can only be set from the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # the second signal: no cleanup wanted
        self.received = signum
        if jax.process_index() == 0:
            print(f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  "(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self) -> Optional[int]:
        """The signal every process acts on at this step, or None: with several processes, each one's flag is
        gathered so that all of them stop (and save) at the same step, whichever got the signal."""
        if jax.process_count() == 1:
            return self.received
        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        return int(np.max(flags)) or None


@dataclasses.dataclass(frozen=True)
class Periods:
    """When a run logs, evaluates and checkpoints, in steps (PPO: iterations)."""
    train_steps: int
    log: int = 10
    eval: int = 0         # 0: evaluate at the last step only
    checkpoint: int = 0   # 0: checkpoint at the end only

    def log_due(self, step: int) -> bool:
        return step % self.log == 0 or step == self.train_steps

    def eval_due(self, step: int) -> bool:
        """A periodic evaluation before the last step (the last step's comes with the end of the run)."""
        return bool(self.eval) and step % self.eval == 0 and step < self.train_steps

    def checkpoint_due(self, step: int) -> bool:
        """A periodic checkpoint (the end of the run always saves)."""
        return bool(self.checkpoint) and step % self.checkpoint == 0


class Window:
    """Steps and paused seconds (eval, checkpoints) since the last train log line."""

    def __init__(self):
        self.started, self.steps, self.paused = time.time(), 0, 0.0

    def seconds(self) -> float:
        return max(time.time() - self.started - self.paused, 1e-9)  # training steps only


class Hooks:
    """What one kind of training adds to the loop; the defaults add nothing."""
    progress_keys: tuple = ()   # train figures shown on the console line after the loss
    pause_metrics = True        # write eval_seconds / checkpoint_seconds train rows where they happen
    has_eval = False
    nonfinite_hint = "Lower LEARNING_RATE or set SKIP_NONFINITE_UPDATES=True to skip such updates."

    def device_batch(self, host_batch):
        """The step's batch from the iterator's host batch (hooks may also count what it holds)."""
        return host_batch

    def train_values(self, step: int, seconds: float, steps_per_sec: float) -> dict:
        """Train figures of the log window beside the step's metrics, steps_per_sec and learning_rate."""
        return {}

    def after_train_log(self, step: int, writer: MetricsWriter) -> None:
        """Rows of their own after the step's train row."""

    def evaluate(self, state) -> dict:
        """{task: {metric: value}} of the state's parameters."""
        raise NotImplementedError

    def eval_line(self, step: int, results: dict) -> str:
        raise NotImplementedError

    def meta(self, step: int) -> dict:
        """The checkpoint's JSON metadata."""
        return {"step": int(step)}

    def after_save(self, step: int, kept_steps) -> None:
        """Called once checkpoint_<step> was written; kept_steps: the checkpoints the directory keeps."""


def log_eval(writer: MetricsWriter, step: int, results: dict) -> dict:
    """Writes eval results (one row per task and metric); returns them flat ({'task/metric': value})."""
    flat = {}
    for task, values in results.items():
        writer.write(step, "eval", task, values)
        flat.update({f"{task}/{m}": v for m, v in values.items()})
    return flat


class Trainer:
    """One run's loop over `step_fn(state, batch) -> (state, metrics)` from step `start` to periods.train_steps.

    A context manager: leaving it waits for checkpoint writes and closes the checkpointer and the metrics writer.
    """

    def __init__(self, state, step_fn: Callable, batches: Iterator, *, start: int, periods: Periods, hooks: Hooks,
                 ckpt: checkpointing.Checkpointer, writer: MetricsWriter, schedule: Callable,
                 skip_nonfinite_updates: bool = False):
        self.state, self.step_fn, self.batches = state, step_fn, batches
        self.start = self.step = start
        self.periods, self.hooks, self.ckpt, self.writer = periods, hooks, ckpt, writer
        self.schedule, self.skip_nonfinite_updates = schedule, skip_nonfinite_updates
        self.progress = ProgressPrinter(periods.train_steps)
        self.window = Window()
        self.metrics: Any = None
        self.last_eval: dict = {}

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.ckpt.close()
            self.writer.close()
        except OSError as e:   # a full disk fails the closing writes too; the error that stopped the run is the news
            if exc is None:
                raise
            logging.warning("closing the run's writers failed as well: %s", e)

    def run(self, stop_after_steps: Optional[int] = None) -> dict:
        """Trains to the last step, evaluates there and checkpoints; returns the last eval results.

        stop_after_steps: stop (after checkpointing) once this many steps were run in this call; used to test resume.
        A run already at its last step does nothing. SIGTERM/SIGINT: see `interrupt`.
        """
        if self.start >= self.periods.train_steps:
            if jax.process_index() == 0:
                print(f"already trained to step {self.start} (TRAIN_STEPS={self.periods.train_steps}) in "
                      f"{self.ckpt.model_dir}; nothing to do", flush=True)
            return self.last_eval
        with StopSignals() as signals:
            while self.step < self.periods.train_steps:
                self.train_one_step()
                signum = signals.agreed()
                if signum is not None:
                    self.interrupt(signum)
                if stop_after_steps is not None and self.step - self.start >= stop_after_steps:
                    break
            self.finish()
        return self.last_eval

    def interrupt(self, signum: int) -> None:
        """Saves this step (input position included), waits for the write, names it, and raises Interrupted."""
        self.check_finite()
        self.timed("checkpoint_seconds", self.save)
        self.ckpt.wait()
        if jax.process_index() == 0:
            print(f"interrupted at step {self.step}, saved checkpoint_{self.step}; rerun the same command to resume",
                  flush=True)
        raise Interrupted(signum, self.step)

    def train_one_step(self) -> None:
        batch = self.hooks.device_batch(next(self.batches))
        self.state, self.metrics = self.step_fn(self.state, batch)
        self.step += 1
        self.window.steps += 1
        periods, step = self.periods, self.step
        if periods.log_due(step):
            self.log_train()
            self.check_finite()
        if self.hooks.has_eval and periods.eval_due(step):
            self.timed("eval_seconds", self.evaluate)
        if periods.checkpoint_due(step):
            self.check_finite()
            self.timed("checkpoint_seconds", self.save)

    def finish(self) -> None:
        self.check_finite()
        if self.hooks.has_eval and self.step == self.periods.train_steps:
            self.timed("eval_seconds", self.evaluate)
        self.timed("checkpoint_seconds", self.save)

    def log_train(self) -> None:
        values = {k: float(v) for k, v in jax.device_get(self.metrics).items() if k != "finite"}
        seconds = self.window.seconds()
        values["steps_per_sec"] = self.window.steps / seconds
        # The schedule's own count: after a T5X restore it continues from T5X's step, not the loop's.
        values["learning_rate"] = optim.applied_learning_rate(self.schedule, self.state["opt_state"], self.step)
        values.update(self.hooks.train_values(self.step, seconds, values["steps_per_sec"]))
        self.writer.write(self.step, "train", "all", values)
        self.hooks.after_train_log(self.step, self.writer)
        self.progress.line(self.step, values["loss"], values["steps_per_sec"],
                           {k: values[k] for k in self.hooks.progress_keys})
        self.window = Window()

    def timed(self, metric: str, fn: Callable) -> None:
        """fn(), its seconds logged as train metric `metric` (unless fn returns False: nothing was done) and left out
        of the throughput of the log window it falls in."""
        t0 = time.time()
        result = fn()
        spent = time.time() - t0
        self.window.paused += spent
        if result is not False and self.hooks.pause_metrics:
            self.writer.write(self.step, "train", "all", {metric: spent})

    def evaluate(self) -> None:
        results = self.hooks.evaluate(self.state)
        flat = log_eval(self.writer, self.step, results)
        self.last_eval = results
        self.check_finite()
        self.ckpt.maybe_save_best(self.step, self.state, self.hooks.meta(self.step), flat)
        if jax.process_index() == 0:
            print(self.hooks.eval_line(self.step, results), flush=True)

    def save(self) -> bool:
        saved = self.ckpt.save(self.step, self.state, self.hooks.meta(self.step))
        if saved:
            self.hooks.after_save(self.step, self.ckpt.latest.all_steps())
        return saved

    def check_finite(self) -> None:
        bad = int(self.state["nonfinite_step"])
        if bad >= 0 and not self.skip_nonfinite_updates:
            self.ckpt.wait()
            raise NonFiniteLossError(
                    f"loss or gradients not finite at step {bad}; stopped before step {self.step} was checkpointed. "
                    f"Last good checkpoint: {self.ckpt.latest_step()} in {self.ckpt.model_dir}. "
                    + self.hooks.nonfinite_hint)
