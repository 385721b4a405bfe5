"""ROUGE-L F1 between one candidate and a growing pool of texts, for near-duplicate filtering.

Tokens follow the `rouge-score` package's default tokenizer (lowercase, every run of characters other than a-z0-9 is
a separator, no stemming), so scores equal `rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure`.

The pool is tokenized once: each text becomes a row of integer token ids in a padded matrix that grows by doubling
as texts are added (adding is incremental, nothing already in the pool is touched again). A query runs the LCS
dynamic programme against every pool row at once: one vectorized numpy step per candidate token,
    row_i[j] = max(row_i[j-1], row_{i-1}[j], row_{i-1}[j-1] + 1 if cand[i] == ref[j])
where the max over j is a running maximum (np.maximum.accumulate). Rows that cannot reach the threshold whatever
their LCS (2 * min(len) / (len_a + len_b) <= threshold) are skipped before the programme runs.
"""
from __future__ import annotations

import re

import numpy as np

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_PAD = -1   # token id of padding: never equal to a real id


def tokenize(text: str) -> list[str]:
    """rouge-score's default tokenization (no stemmer)."""
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Plain O(len(a) * len(b)) LCS length (the reference for tests and single pairs)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric: 2 * LCS / (len_a + len_b); 0 when either has no token)."""
    ta, tb = tokenize(a), tokenize(b)
    return 2.0 * lcs_length(ta, tb) / (len(ta) + len(tb)) if ta and tb else 0.0


class RougePool:
    """Texts tokenized once into an int matrix; `max_score(text)` is the best ROUGE-L F1 of text against them."""

    def __init__(self, texts=()):
        self._ids: dict[str, int] = {}
        self._tokens = np.full((16, 8), _PAD, np.int32)
        self._lengths = np.zeros(16, np.int32)
        self.texts: list[str] = []
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, text: str, grow: bool) -> np.ndarray:
        words = tokenize(text)
        if grow:
            return np.array([self._ids.setdefault(w, len(self._ids)) for w in words], np.int32)
        return np.array([self._ids.get(w, -2) for w in words], np.int32)   # -2: unseen, matches nothing

    def add(self, text: str) -> None:
        ids = self._encode(text, grow=True)
        n = len(self.texts)
        rows, width = self._tokens.shape
        if n == rows or len(ids) > width:
            grown = np.full((rows * 2 if n == rows else rows, max(width, len(ids))), _PAD, np.int32)
            grown[:rows, :width] = self._tokens
            self._tokens = grown
            self._lengths = np.concatenate([self._lengths, np.zeros(grown.shape[0] - rows, np.int32)])
        self._tokens[n, :len(ids)] = ids
        self._lengths[n] = len(ids)
        self.texts.append(text)

    def scores(self, text: str, threshold: float = 0.0) -> np.ndarray:
        """[len(pool)] ROUGE-L F1 of `text` against each pool text; rows that cannot exceed `threshold` get 0."""
        out = np.zeros(len(self.texts), np.float64)
        cand = self._encode(text, grow=False)
        lengths = self._lengths[:len(self.texts)]
        if not len(cand) or not len(self.texts):
            return out
        reachable = 2.0 * np.minimum(lengths, len(cand)) / (lengths + len(cand)) > threshold
        rows = np.flatnonzero(reachable & (lengths > 0))
        if not len(rows):
            return out
        width = int(lengths[rows].max())
        ref = self._tokens[rows, :width]
        lcs = np.zeros((len(rows), width + 1), np.int32)
        for token in cand:
            diagonal = np.where(ref == token, lcs[:, :-1] + 1, lcs[:, 1:])
            lcs[:, 1:] = np.maximum.accumulate(diagonal, axis=1)
        best = lcs[np.arange(len(rows)), lengths[rows]]
        out[rows] = 2.0 * best / (lengths[rows] + len(cand))
        return out

    def max_score(self, text: str, threshold: float = 0.0) -> tuple[float, int]:
        """(best score, index of the most similar pool text) — (0.0, -1) for an empty pool."""
        scores = self.scores(text, threshold)
        if not len(scores):
            return 0.0, -1
        best = int(np.argmax(scores))
        return float(scores[best]), best
