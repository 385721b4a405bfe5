"""Contextual calibration for rank classification (Zhao et al. 2021, "Calibrate Before Use").

The model's option probabilities for content-free inputs ("N/A", "", "[MASK]" placed in the same prompt) estimate its
bias towards each option. With p_cf their mean, renormalized over the options, W = diag(p_cf)^-1 and b = 0, the
calibrated distribution of an example is q = normalize(W p) and the prediction is argmax q.
"""
from __future__ import annotations

import numpy as np


def option_probs(log_scores: np.ndarray, valid: np.ndarray = None) -> np.ndarray:
    """Softmax over the options of [..., K] sequence log-likelihoods (invalid options get probability 0)."""
    s = np.asarray(log_scores, np.float64)
    if valid is not None:
        s = np.where(valid, s, -np.inf)
    s = s - np.max(s, axis=-1, keepdims=True)
    p = np.exp(s)
    return p / np.sum(p, axis=-1, keepdims=True)


def content_free_prior(content_free_log_scores: np.ndarray, valid: np.ndarray = None) -> np.ndarray:
    """p_cf [K] from [C, K] scores of the C content-free prompts: mean of their option distributions, renormalized."""
    scores = np.asarray(content_free_log_scores)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"content-free scores must be [num_content_free, K], got shape {scores.shape}")
    p_cf = option_probs(scores, valid).mean(axis=0)
    return p_cf / p_cf.sum()


def calibrate(probs: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """q = normalize(diag(p_cf)^-1 p) along the last axis; options with p_cf = 0 stay at 0."""
    p_cf = np.asarray(p_cf, np.float64)
    inv = np.divide(1.0, p_cf, out=np.zeros_like(p_cf), where=p_cf > 0)
    q = np.asarray(probs, np.float64) * inv
    return q / np.sum(q, axis=-1, keepdims=True)


def expected_calibration_error(confidences, correct, num_bins: int = 10) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017): sum over equal-width confidence bins of |bin| / n times
    |accuracy(bin) - mean confidence(bin)|. `confidences` [N] in [0, 1] (the probability of the predicted option),
    `correct` [N] booleans. Bins are (lo, hi], the first also holds 0."""
    conf = np.asarray(confidences, np.float64)
    hits = np.asarray(correct, np.float64)
    if conf.shape != hits.shape or conf.ndim != 1:
        raise ValueError(f"ECE: confidences {conf.shape} and correct {hits.shape} must be equal-length vectors")
    if num_bins < 1:
        raise ValueError(f"ECE: num_bins={num_bins}: expected >= 1")
    if conf.size == 0:
        return float("nan")
    if np.any((conf < 0) | (conf > 1 + 1e-9)):
        raise ValueError("ECE: confidences must lie in [0, 1]")
    bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += members.sum() * abs(hits[members].mean() - conf[members].mean())
    return float(total / conf.size)
