"""Runs a model over SuiteTasks: tokenizes the prompts, rank-classifies or greedily decodes in fixed-shape batches, and
scores; tokens, batches, ranking and decoding are flan_jax.evaluation.inference's.

Batch shapes come from a small fixed set, so the compiled programs are shared by every task: widths from a ladder of
multiples of 64 about 2^(1/4) apart (little padding, and the attention cost grows with the square of the width), and
for each width as many rows as fit `max_batch_tokens` (at most `batch_size`): long prompts run in smaller batches, which
keeps the [rows, heads, L, L] attention logits small (4 x 2048 ran 2.7x more examples/s than 16 x 2048 on 2 CPU
cores). Generation pools the examples of every task with the same decode length, sorted by prompt length, so batches
are full and evenly long; all batches of a pool are dispatched before any result is read back (no host sync per batch).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from flan_jax.evaluation import calibration, inference
from flan_jax.evaluation.suites.common import SuiteTask


@dataclasses.dataclass(frozen=True)
class RunOptions:
    batch_size: int = 16               # most rows per batch
    max_input_len: int = 2048          # longer prompts keep their last tokens (the test question); counted
    max_decode_len: int = 256          # generation when the task does not fix it
    calibrate: bool = False
    max_batch_tokens: int = 8192       # rows per batch: min(batch_size, max_batch_tokens // width), at least 1

    def __post_init__(self):
        for key in ("batch_size", "max_input_len", "max_decode_len", "max_batch_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"--{key}={getattr(self, key)!r}: expected an int >= 1")


@dataclasses.dataclass
class TaskResult:
    name: str
    metrics: dict                      # {metric: value}; percent, plus "calibrated_*" with calibration
    records: list                      # per example: {"index", "target", "prediction", "raw", ...}
    seconds: float                     # pooled generation: this task's share of the pool's time (by padded tokens)
    truncated: int
    generated_tokens: int = 0


class SuiteRunner:
    def __init__(self, model_cfg, params, vocab, options: RunOptions = RunOptions()):
        self.model = inference.InferenceModel(model_cfg, params, vocab)
        self.params, self.vocab, self.opts = params, vocab, options

    # --- tokens ----------------------------------------------------------------------------------------------------
    def _encode_prompts(self, prompts):
        """(EOS-terminated ids per prompt, number truncated); a prompt keeps its last max_input_len tokens."""
        return inference.encode_prompts(self.vocab, prompts, self.opts.max_input_len)

    def rows_per_batch(self, width: int) -> int:
        return max(1, min(self.opts.batch_size, self.opts.max_batch_tokens // width))

    def _ladder(self, rows):
        """inference.Batch of rows: sorted by length, widths from the ladder, rows_per_batch(width) rows."""
        return inference.ladder_batches(rows, self.opts.max_input_len, self.rows_per_batch, self.model.ids.pad)

    def _batches(self, rows):
        """(indices, padded [B, W] tokens) of every batch of rows."""
        return ((idx, arr) for idx, _, arr in self._ladder(rows))

    # --- rank classification ---------------------------------------------------------------------------------------
    def _option_scores(self, rows, options):
        """[N, K] log-likelihood of every option (K = most options; missing ones -inf)."""
        enc = [inference.encode_options(self.vocab, opts) for opts in options]
        width = inference.pow2_at_least(max(len(t) for opts in enc for t in opts), 8)
        return inference.option_scores(self.model.rank, self._ladder(rows), enc, width, self.model.ids.pad)

    def _run_rank(self, task: SuiteTask, rows):
        options = [list(e.options) for e in task.examples]
        scores = self._option_scores(rows, options)
        valid = np.isfinite(scores)
        probs = calibration.option_probs(scores, valid)
        answers = inference.argmax_options(probs, options)
        records = [{"index": i, "target": e.target, "prediction": a, "options": list(e.options),
                    "probs": [float(x) for x in probs[i][:len(e.options)]]}
                   for i, (e, a) in enumerate(zip(task.examples, answers))]
        metrics = dict(task.score([e.target for e in task.examples], answers))
        if self.opts.calibrate:
            cal = self._calibrated_answers(task, probs, valid)
            for rec, a in zip(records, cal):
                rec["calibrated_prediction"] = a
            metrics.update({f"calibrated_{k}": v for k, v in
                            task.score([e.target for e in task.examples], cal).items()})
        return metrics, records

    def _calibrated_answers(self, task: SuiteTask, probs, valid):
        """Per example: argmax of diag(p_cf)^-1 p, p_cf from that example's own content-free prompts (they share the
        few-shot context; prompts are cached, so a task with one context costs 3 extra rows)."""
        cf_prompts = sorted({p for e in task.examples for p in e.content_free})
        if not cf_prompts:
            raise ValueError(f"--calibrate: task {task.name} has no content-free prompts")
        cf_rows, _ = self._encode_prompts(cf_prompts)
        opts = [list(task.examples[0].options)] * len(cf_prompts)
        if any(list(e.options) != opts[0] for e in task.examples):
            raise ValueError(f"--calibrate: task {task.name} has options that differ between examples")
        cf_scores = dict(zip(cf_prompts, self._option_scores(cf_rows, opts)))
        answers = []
        for i, e in enumerate(task.examples):
            p_cf = calibration.content_free_prior(np.stack([cf_scores[p] for p in e.content_free]))
            q = calibration.calibrate(probs[i], p_cf)
            answers.append(e.options[int(np.argmax(np.where(valid[i], q, -1.0)))])
        return answers

    # --- generation ------------------------------------------------------------------------------------------------
    def _decode_len(self, task: SuiteTask) -> int:
        if task.max_decode_len is None:
            return self.opts.max_decode_len
        if task.max_decode_len > 0:
            return task.max_decode_len
        longest = max(len(self.vocab.encode(t if isinstance(t, str) else max(t, key=len))) for t in
                      (e.target for e in task.examples))
        # An exact match ends by then; a few spare steps keep misses readable.
        return inference.pow2_at_least(longest + 8, 16)

    def _generate_rows(self, rows, length: int):
        """(raw text per row, generated tokens per row, padded tokens per row: its batch's rows x width shared by the
        real rows of that batch)."""
        batches = list(self._ladder(rows))
        decoded = inference.generate(self.vocab, lambda tokens, _: self.model.greedy(tokens, length), batches,
                                     len(rows))
        cost = [0.0] * len(rows)
        for idx, _, arr in batches:
            for i in idx:
                cost[i] = arr.size / len(idx)
        return [o.text for o in decoded], [o.num_tokens for o in decoded], cost

    def _generate_result(self, task: SuiteTask, raw, seconds: float, truncated: int, tokens: int) -> TaskResult:
        answers = [task.extract(r) for r in raw]
        records = [{"index": i, "target": e.target, "prediction": a, "raw": r, "input": e.prompt}
                   for i, (e, a, r) in enumerate(zip(task.examples, answers, raw))]
        metrics = task.score([e.target for e in task.examples], answers)
        return TaskResult(task.name, metrics, records, seconds, truncated, tokens)

    def _run_rank_task(self, task: SuiteTask) -> TaskResult:
        start = time.perf_counter()
        rows, truncated = self._encode_prompts([e.prompt for e in task.examples])
        metrics, records = self._run_rank(task, rows)
        for rec, e in zip(records, task.examples):
            rec["input"] = e.prompt
        return TaskResult(task.name, metrics, records, time.perf_counter() - start, truncated)

    def _run_generate_pool(self, tasks, length: int) -> list:
        """TaskResults of generation tasks that share a decode length, their examples batched together."""
        start = time.perf_counter()
        rows, spans, truncated = [], [], []
        for task in tasks:
            task_rows, cut = self._encode_prompts([e.prompt for e in task.examples])
            spans.append((len(rows), len(rows) + len(task_rows)))
            rows += task_rows
            truncated.append(cut)
        raw, tokens, cost = self._generate_rows(rows, length)
        seconds, total = time.perf_counter() - start, sum(cost)
        return [self._generate_result(task, raw[a:b], seconds * sum(cost[a:b]) / total, cut, sum(tokens[a:b]))
                for task, (a, b), cut in zip(tasks, spans, truncated)]

    def run_many(self, tasks) -> list:
        """TaskResult of every task, in order; generation tasks with the same decode length run as one pool."""
        results, pools = [None] * len(tasks), {}
        for n, task in enumerate(tasks):
            if task.kind == "rank":
                results[n] = self._run_rank_task(task)
            else:
                pools.setdefault(self._decode_len(task), []).append(n)
        for length, members in pools.items():
            for n, result in zip(members, self._run_generate_pool([tasks[n] for n in members], length)):
                results[n] = result
        return results

    def run(self, task: SuiteTask) -> TaskResult:
        return self.run_many([task])[0]
