"""Runs a model over SuiteTasks: tokenizes the prompts, rank-classifies or greedily decodes in fixed-shape batches, and
scores. Shapes are bucketed to powers of two so the few compiled programs are shared by every task."""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from flan_jax.evaluation import calibration, scoring
from flan_jax.evaluation.suites.common import SuiteTask
from flan_jax.models import decoding


@dataclasses.dataclass(frozen=True)
class RunOptions:
    batch_size: int = 16
    max_input_len: int = 2048          # longer prompts keep their last tokens (the test question); counted
    max_decode_len: int = 256          # generation when the task does not fix it
    calibrate: bool = False


@dataclasses.dataclass
class TaskResult:
    name: str
    metrics: dict                      # {metric: value}; percent, plus "calibrated_*" with calibration
    records: list                      # per example: {"index", "target", "prediction", "raw", ...}
    seconds: float
    truncated: int
    generated_tokens: int = 0


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n - 1).bit_length()))


class SuiteRunner:
    def __init__(self, model_cfg, params, vocab, options: RunOptions = RunOptions()):
        self.params, self.vocab, self.opts = params, vocab, options
        self._rank = jax.jit(functools.partial(scoring.rank_classification_scores, model_cfg))
        self._greedy = jax.jit(functools.partial(decoding.greedy_decode, model_cfg),
                               static_argnames=("max_decode_len",))

    # --- tokens ----------------------------------------------------------------------------------------------------
    def _encode_prompts(self, prompts):
        """(padded int32 [N, L], number truncated); EOS-terminated, left-truncated to max_input_len."""
        limit, truncated, rows = self.opts.max_input_len, 0, []
        for p in prompts:
            ids = list(self.vocab.encode(p))
            if len(ids) + 1 > limit:
                ids, truncated = ids[len(ids) + 1 - limit:], truncated + 1
            rows.append(ids + [1])
        return rows, truncated

    def _batches(self, rows):
        """Yields (indices, padded [B, L] array); rows sorted by length, the last batch filled with repeats."""
        order = np.argsort([len(r) for r in rows], kind="stable")
        bs = self.opts.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            width = _pow2(max(len(rows[i]) for i in idx), 64)
            arr = np.zeros((bs, width), np.int32)
            for j, i in enumerate(np.pad(idx, (0, bs - len(idx)), mode="edge")):
                arr[j, :len(rows[i])] = rows[i]
            yield idx, arr

    # --- rank classification ---------------------------------------------------------------------------------------
    def _option_scores(self, rows, options):
        """[N, K] log-likelihood of every option (K = most options; missing ones -inf)."""
        k = max(len(o) for o in options)
        enc = [[list(self.vocab.encode(o)) + [1] for o in opts] for opts in options]
        lt = _pow2(max(len(t) for opts in enc for t in opts), 8)
        out = np.full((len(rows), k), -np.inf)
        for idx, arr in self._batches(rows):
            opt = np.zeros((len(arr), k, lt), np.int32)
            for j, i in enumerate(np.pad(idx, (0, len(arr) - len(idx)), mode="edge")):
                for m, t in enumerate(enc[i]):
                    opt[j, m, :len(t)] = t
            s = np.asarray(self._rank(self.params, arr, opt))
            for j, i in enumerate(idx):
                out[i, :len(enc[i])] = s[j, :len(enc[i])]
        return out

    def _run_rank(self, task: SuiteTask, rows):
        options = [list(e.options) for e in task.examples]
        scores = self._option_scores(rows, options)
        valid = np.isfinite(scores)
        probs = calibration.option_probs(scores, valid)
        answers = [options[i][int(np.argmax(probs[i]))] for i in range(len(options))]
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
        return _pow2(longest + 8, 16)   # an exact match ends by then; a few spare steps keep misses readable

    def _run_generate(self, task: SuiteTask, rows):
        length = self._decode_len(task)
        raw, tokens = [None] * len(rows), 0
        for idx, arr in self._batches(rows):
            out = np.asarray(self._greedy(self.params, arr, max_decode_len=length))
            for j, i in enumerate(idx):
                toks = [int(t) for t in out[j]]
                toks = toks[:toks.index(1)] if 1 in toks else toks
                tokens += len(toks)
                raw[i] = self.vocab.decode([t for t in toks if t > 0])
        answers = [task.extract(r) for r in raw]
        records = [{"index": i, "target": e.target, "prediction": a, "raw": r}
                   for i, (e, a, r) in enumerate(zip(task.examples, answers, raw))]
        return task.score([e.target for e in task.examples], answers), records, tokens

    def run(self, task: SuiteTask) -> TaskResult:
        start = time.perf_counter()
        rows, truncated = self._encode_prompts([e.prompt for e in task.examples])
        tokens = 0
        if task.kind == "rank":
            metrics, records = self._run_rank(task, rows)
        else:
            metrics, records, tokens = self._run_generate(task, rows)
        for rec, e in zip(records, task.examples):
            rec["input"] = e.prompt
        return TaskResult(task.name, metrics, records, time.perf_counter() - start, truncated, tokens)
