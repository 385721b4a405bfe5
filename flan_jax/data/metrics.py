"""seqio-style metric functions: `fn(targets, predictions) -> {name: value}`.

Scales: `accuracy` and `exact_match` are fractions in [0, 1]; `rouge_l` and `bleu` are x100 (as usually reported).
A target may be a single string or a list of reference strings (max over references). bytes are decoded as UTF-8.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def to_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return to_text(value.item())
    return str(value)


def _references(target: Any) -> list[str]:
    if isinstance(target, (list, tuple)) or (isinstance(target, np.ndarray) and target.ndim > 0):
        refs = [to_text(t) for t in target]
        if not refs:
            raise ValueError("metrics: a target has an empty list of references")
        return refs
    return [to_text(target)]


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any], name: str) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{name}: {len(targets)} targets but {len(predictions)} predictions")


def text_postprocessor(output_or_target, example=None, is_target=False) -> str:
    """seqio postprocess_fn: decode bytes and strip surrounding whitespace."""
    del example, is_target
    return to_text(output_or_target).strip()


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Fraction of predictions equal to the target (any reference), compared as stripped strings.

    Also used for rank classification, where the prediction is the highest-scoring option.
    """
    _check_lengths(targets, predictions, "accuracy")
    if not targets:
        return {"accuracy": float("nan")}
    hits = [to_text(p).strip() in {r.strip() for r in _references(t)} for t, p in zip(targets, predictions)]
    return {"accuracy": float(np.mean(hits))}


def _normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Fraction of predictions matching a reference exactly after whitespace normalization (case-sensitive)."""
    _check_lengths(targets, predictions, "exact_match")
    if not targets:
        return {"exact_match": float("nan")}
    hits = [_normalize_answer(to_text(p)) in {_normalize_answer(r) for r in _references(t)}
            for t, p in zip(targets, predictions)]
    return {"exact_match": float(np.mean(hits))}


_ROUGE_SCORER = None


def rouge_l(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Mean ROUGE-L F-measure x100, max over references (rouge_score, with stemming)."""
    global _ROUGE_SCORER
    _check_lengths(targets, predictions, "rouge_l")
    if not targets:
        return {"rouge_l": float("nan")}
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer  # lazy: it imports JAX and NLTK (~1.7 s); registration stays cheap
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for target, prediction in zip(targets, predictions):
        pred = to_text(prediction)
        scores.append(max(_ROUGE_SCORER.score(ref, pred)["rougeL"].fmeasure for ref in _references(target)))
    return {"rouge_l": 100.0 * float(np.mean(scores))}


def bleu(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults, 13a tokenization), x100 as sacrebleu reports it."""

    _check_lengths(targets, predictions, "bleu")
    if not targets:
        return {"bleu": float("nan")}
    refs = [_references(t) for t in targets]
    num_refs = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference position; pad shorter reference lists with their first reference.
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(num_refs)]
    import sacrebleu  # lazy: only BLEU-scored tasks need it, and task registration must stay cheap
    result = sacrebleu.corpus_bleu([to_text(p) for p in predictions], streams)
    return {"bleu": float(result.score)}
