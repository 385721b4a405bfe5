"""Held-out evaluation: teacher-forced loss, rank classification over options, greedy generation + seqio metrics.

Validation examples are read once per task and kept as numpy; each `evaluate(params)` call only runs the model.
Tasks with options are scored by rank classification (every option scored, argmax taken); others are decoded greedily.
Per-task figures are aggregated into `mean_seen` (tasks whose base task is trained on) and `mean_heldout` (the rest).

EvalOptions adds, when asked: few-shot prompts (k exemplars of each task's train split before the test input, see
few_shot.py) and, for rank classification, calibration figures: `ece` (expected calibration error of the option
probabilities) and contextual calibration (Zhao et al. 2021): the option distribution of the content-free inputs
"N/A", "" and "[MASK]", placed after the same few-shot context, averaged into p_cf; the prediction is then
argmax diag(p_cf)^-1 p, reported as `calibrated_<metric>` and `calibrated_ece` beside the raw figures. The evaluator
sees rendered prompts, so the content-free input replaces the whole rendered test input (template included).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from flan_jax import models
from flan_jax.data import metrics as metrics_lib
from flan_jax.data import registry
from flan_jax.data.vocabularies import special_ids
from flan_jax.evaluation import calibration, few_shot, inference, scoring
from flan_jax.evaluation.suites.common import CONTENT_FREE_INPUTS


@dataclasses.dataclass
class TaskEvalData:
    name: str
    inputs: np.ndarray            # [N, Lin] int32, padded, EOS-terminated
    targets: np.ndarray           # [N, Lt]
    target_strings: list
    options: list                 # per example: list of option strings (empty for generative tasks)
    seen: bool
    task: seqio.Task
    input_strings: list = dataclasses.field(default_factory=list)   # the rendered zero-shot inputs
    contexts: list = dataclasses.field(default_factory=list)        # per example: the few-shot text before it
    truncated: int = 0                                              # few-shot prompts cut to the input length

    @property
    def has_options(self) -> bool:
        return any(len(o) > 0 for o in self.options)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    few_shot: int = 0                  # exemplars of `few_shot_split` before every test input (0: zero-shot)
    few_shot_split: str = "train"
    calibrate: bool = False            # rank tasks: ece, calibrated_<metric>, calibrated_ece
    ece_bins: int = 10

    def __post_init__(self):
        if not isinstance(self.few_shot, int) or self.few_shot < 0:
            raise ValueError(f"EvalOptions.few_shot={self.few_shot!r}: expected an int >= 0")
        if not isinstance(self.ece_bins, int) or self.ece_bins < 1:
            raise ValueError(f"EvalOptions.ece_bins={self.ece_bins!r}: expected an int >= 1")


def base_task_name(task_name: str) -> str:
    try:
        return registry.task_info(task_name).base_task
    except KeyError:  # tasks registered outside our registry are their own base task
        return task_name


def load_task_eval_data(task: seqio.Task, feature_lengths: Mapping[str, int], max_examples: Optional[int],
                                                seen: bool, split: str = "validation") -> TaskEvalData:
    ds = task.get_dataset(sequence_length=dict(feature_lengths), split=split, shuffle=False, num_epochs=1)
    if max_examples:
        ds = ds.take(max_examples)
    inputs, targets, target_strings, options, input_strings = [], [], [], [], []
    for ex in ds.as_numpy_iterator():
        input_strings.append(ex["inputs_pretokenized"].decode("utf-8") if "inputs_pretokenized" in ex else None)
        inputs.append(ex["inputs"])
        targets.append(ex["targets"])
        raw_target = ex["targets_pretokenized"].decode("utf-8")
        target_strings.append(task.postprocess_fn(raw_target, example=ex, is_target=True)
                                                    if task.postprocess_fn else raw_target)
        opts = ex.get("options")
        options.append([o.decode("utf-8") for o in opts] if opts is not None else [])
    if not inputs:
        raise ValueError(f"eval task {task.name!r} has no examples in split {split!r}")
    # Run the model on the lengths this task needs, not the training feature lengths (prompts are often a fraction of
    # them); bucketed so tasks share compiled shapes. Padding is masked, so scores do not depend on it.
    pad = {k: task.output_features[k].vocabulary.pad_id for k in ("inputs", "targets")}
    inputs = inference.pad_rows(inputs, feature_lengths["inputs"], pad["inputs"])
    targets = inference.pad_rows(targets, feature_lengths["targets"], pad["targets"])
    inputs = inputs[:, :inference.round_up(inference.longest(inputs, pad["inputs"]), 32, feature_lengths["inputs"])]
    targets = targets[:, :inference.round_up(inference.longest(targets, pad["targets"]), 8,
                                             feature_lengths["targets"])]
    return TaskEvalData(task.name, inputs, targets, target_strings, options, seen, task, input_strings,
                        [""] * len(inputs))


def with_few_shot(d: TaskEvalData, k: int, split: str, feature_lengths: Mapping[str, int]) -> TaskEvalData:
    """d with every input preceded by k exemplars of the task's `split`; never the evaluated example itself."""
    if any(s is None for s in d.input_strings):
        raise ValueError(f"few-shot eval: task {d.name!r} has no 'inputs_pretokenized' feature to build prompts from")
    pool = few_shot.exemplar_pool(d.task, split, 2 * k + 1, feature_lengths)
    contexts = [few_shot.context(few_shot.select_exemplars(pool, k, text, d.name)) for text in d.input_strings]
    vocab = d.task.output_features["inputs"].vocabulary
    inputs, truncated = encode_prompts(vocab, [c + t for c, t in zip(contexts, d.input_strings)],
                                       feature_lengths["inputs"])
    if truncated:
        logging.warning("few-shot eval: %s: %d of %d prompts longer than %d tokens kept their last tokens", d.name,
                        truncated, len(inputs), feature_lengths["inputs"])
    return dataclasses.replace(d, inputs=inputs, contexts=contexts, truncated=truncated)


def encode_prompts(vocab, prompts: Sequence[str], limit: int) -> tuple[np.ndarray, int]:
    """(int32 [N, W] EOS-terminated and padded, number truncated): W the longest row rounded up to a multiple of 32
    (tasks share compiled shapes); a prompt longer than limit keeps its last tokens (the test input is at the end)."""
    rows, truncated = inference.encode_prompts(vocab, prompts, limit)
    width = inference.round_up(max(len(r) for r in rows), 32, limit)
    return inference.pad_rows(rows, width, vocab.pad_id), truncated


class Evaluator:
    def __init__(self, eval_mixture_or_task: str, feature_lengths: Mapping[str, int], model_cfg, *,
                              seen_base_tasks: set, examples_per_task: Optional[int] = 64, batch_size: int = 32,
                              split: str = "validation", options: EvalOptions = EvalOptions()):
        self.model_cfg = model_cfg
        self.options = options
        self.feature_lengths = dict(feature_lengths)
        self.batch_size = batch_size
        mixture = seqio.get_mixture_or_task(eval_mixture_or_task)
        tasks = seqio.get_subtasks(mixture)
        self.data = [load_task_eval_data(t, feature_lengths, examples_per_task, base_task_name(t.name) in seen_base_tasks,
                                                                          split) for t in tasks]
        if options.few_shot:
            self.data = [with_few_shot(d, options.few_shot, options.few_shot_split, feature_lengths)
                         for d in self.data]
        self.vocab = tasks[0].output_features["targets"].vocabulary
        self.ids = special_ids(self.vocab)
        self._option_logits = jax.jit(functools.partial(models.option_logits, model_cfg))
        self._rank = functools.partial(inference.rank_scores, model_cfg)   # (params, tokens, option tokens)
        self._greedy = functools.partial(inference.greedy_tokens, model_cfg, eos_id=self.ids.eos)

    # --- batching ------------------------------------------------------------------------------------------------------
    def _batches(self, inputs: np.ndarray):
        """inference.Batch of `inputs` rows, batch_size rows each."""
        for real, padded in inference.fixed_batches(len(inputs), self.batch_size):
            yield real, padded, inputs[padded]

    def _teacher_forced_loss(self, params, d: TaskEvalData) -> float:
        total, tokens = 0.0, 0.0
        for real, padded in inference.fixed_batches(len(d.inputs), self.batch_size):
            tgt = d.targets[padded]
            # The targets as the one option of each input: teacher forcing in either model family.
            logits = self._option_logits(params, d.inputs[padded], tgt[:, None, :])
            tok_loss = -scoring.token_log_probs(logits, jnp.asarray(tgt))
            w = (tgt != self.ids.pad).astype(np.float32)
            w[len(real):] = 0.0  # the rows repeated to fill the last batch do not count
            total += float(jnp.sum(tok_loss * w))
            tokens += float(w.sum())
        return total / max(tokens, 1.0)

    def _option_scores(self, params, inputs: np.ndarray, options: list) -> np.ndarray:
        """[N, K] log-likelihood of each example's options (K = most options; absent ones -inf)."""
        limit = self.feature_lengths["targets"]
        encoded = [inference.encode_options(self.vocab, opts, limit) for opts in options]
        width = inference.round_up(max(len(o) for opts in encoded for o in opts), 8, limit)
        return inference.option_scores(functools.partial(self._rank, params), self._batches(inputs), encoded, width,
                                       self.ids.pad)

    def _rank_classify(self, params, d: TaskEvalData) -> list:
        return inference.argmax_options(self._option_scores(params, d.inputs, d.options), d.options)

    def _content_free_priors(self, params, d: TaskEvalData) -> np.ndarray:
        """[N, K] p_cf of every example: its few-shot context followed by each content-free input, scored on its
        options; examples sharing context and options share the three rows."""
        keys = [(c, tuple(o)) for c, o in zip(d.contexts or [""] * len(d.options), d.options)]
        unique = list(dict.fromkeys(keys))
        prompts = [c + cf for c, _ in unique for cf in CONTENT_FREE_INPUTS]
        inputs, _ = encode_prompts(self.vocab, prompts, self.feature_lengths["inputs"])
        scores = self._option_scores(params, inputs, [list(o) for _, o in unique for _ in CONTENT_FREE_INPUTS])
        n_cf = len(CONTENT_FREE_INPUTS)
        prior = {key: calibration.content_free_prior(scores[u * n_cf:(u + 1) * n_cf], np.isfinite(
            scores[u * n_cf:(u + 1) * n_cf])) for u, key in enumerate(unique)}
        return np.stack([prior[key] for key in keys])

    def _calibration_metrics(self, params, d: TaskEvalData, scores: np.ndarray) -> dict:
        valid = np.isfinite(scores)
        probs = calibration.option_probs(scores, valid)
        calibrated = calibration.calibrate(probs, self._content_free_priors(params, d))
        values = {}
        for prefix, p in (("", probs), ("calibrated_", calibrated)):
            preds = inference.argmax_options(np.where(valid, p, -1.0), d.options)
            correct = [metrics_lib.accuracy([t], [a])["accuracy"] == 1.0 for t, a in zip(d.target_strings, preds)]
            values[f"{prefix}ece"] = calibration.expected_calibration_error(
                np.max(np.where(valid, p, 0.0), axis=-1), correct, self.options.ece_bins)
            if prefix:
                for fn in d.task.predict_metric_fns or d.task.metric_fns:
                    values.update({prefix + k: float(v) for k, v in fn(d.target_strings, preds).items()})
        return values

    def _generate(self, params, d: TaskEvalData) -> list:
        # An exact match ends with EOS by the longest reference's length; 8 spare steps keep near misses readable in
        # the prediction files without decoding the whole training target length.
        max_len = inference.round_up(d.targets.shape[1] + 8, 8, self.feature_lengths["targets"])
        decoded = inference.generate(self.vocab, lambda tokens, _: self._greedy(params, tokens, max_decode_len=max_len),
                                     self._batches(d.inputs), len(d.inputs))
        if not d.task.postprocess_fn:
            return [o.text for o in decoded]
        return [d.task.postprocess_fn(o.text, example={}, is_target=False) for o in decoded]

    # --- evaluation ----------------------------------------------------------------------------------------------------
    def evaluate(self, params) -> dict:
        """{task: {metric: value}} including the `mean_seen` / `mean_heldout` aggregates."""
        results = {}
        self.last_predictions = {}
        for d in self.data:
            values = {"loss": self._teacher_forced_loss(params, d)}
            calibration_values = {}
            if d.has_options:
                scores = self._option_scores(params, d.inputs, d.options)
                preds = inference.argmax_options(scores, d.options)
                if self.options.calibrate:
                    calibration_values = self._calibration_metrics(params, d, scores)
            else:
                preds = self._generate(params, d)
            self.last_predictions[d.name] = preds
            for fn in d.task.predict_metric_fns or d.task.metric_fns:
                values.update({k: float(v) for k, v in fn(d.target_strings, preds).items()})
            results[d.name] = {**values, **calibration_values}
        for agg, want_seen in (("mean_seen", True), ("mean_heldout", False)):
            group = [results[d.name] for d in self.data if d.seen == want_seen]
            metrics = sorted({m for r in group for m in r})
            if group:
                results[agg] = {m: float(np.mean([r[m] for r in group if m in r])) for m in metrics}
        logging.info("eval: %s", {k: v for k, v in results.items() if k.startswith("mean")})
        return results
