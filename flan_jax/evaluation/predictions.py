"""Per-task prediction files of an evaluation (`flan-jax eval --predictions_dir`), NIv2's official format included."""
from __future__ import annotations

import json
import os
import re
import tempfile

from flan_jax.data import registry
from flan_jax.data.sources import niv2
from flan_jax.evaluation import inference


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_in(folder: str, name: str, suffix: str = ".jsonl") -> str:
    """folder/<name><suffix> with every character outside [A-Za-z0-9._-] replaced: a task or example name taken from
    data ("../x", "a/b") cannot leave the folder."""
    stem = _UNSAFE.sub("_", name).strip(".")
    return os.path.join(folder, (stem or "_") + suffix)


def check_writable(folder: str, key: str) -> None:
    """Creates `folder` and writes a probe file, so a bad output setting fails before any evaluation runs; the error
    names the setting `key`."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{key}={folder!r}: cannot write there ({e.strerror or e})") from None


def write_predictions(evaluator, out_dir: str) -> list[str]:
    """One JSONL per eval task ({"index", "input", "target", "prediction"}); NIv2 tasks also go into the official
    prediction file niv2_predictions.jsonl ({"id", "prediction"}, ids of the first 100 test instances per task)."""
    os.makedirs(out_dir, exist_ok=True)
    written, niv2_ids, niv2_preds = [], [], []
    for d in evaluator.data:
        preds = evaluator.last_predictions[d.name]
        path = file_in(out_dir, d.name)
        with open(path, "w", encoding="utf-8") as f:
            for i, (tokens, target, pred) in enumerate(zip(d.inputs, d.target_strings, preds)):
                text = inference.tokens_to_text(evaluator.vocab, tokens)
                f.write(json.dumps({"index": i, "input": text, "target": target, "prediction": pred}) + "\n")
        written.append(path)
        ids = _niv2_ids(d.name, len(preds))
        if ids:
            niv2_ids += ids
            niv2_preds += preds
    if niv2_ids:
        path = os.path.join(out_dir, "niv2_predictions.jsonl")
        niv2.write_niv2_predictions(path, niv2_ids, niv2_preds)
        written.append(path)
    return written


def _niv2_ids(task_name: str, n: int):
    """Official instance ids for an NIv2 eval task (its examples are the first 100 test instances in file order)."""
    niv2_dir = os.environ.get("FLAN_JAX_NIV2_DIR")
    if not niv2_dir or not task_name.startswith("niv2"):
        return None
    reg = registry.collection_registration("niv2")
    base = next((t for t, names in (reg.base_tasks.items() if reg else ())
                 if any(task_name.startswith(name + "_") for name in names)), None)
    if base is None:
        return None
    ids = [row["id"] for row in niv2.test_references(niv2_dir, [base])]
    return ids[:n] if len(ids) >= n else None
