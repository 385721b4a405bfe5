"""Held-out benchmark suites of the Flan-T5 paper (Chung et al. 2022): BBH, MMLU, TyDiQA-GoldP, MGSM.

Each suite module reads its benchmark in the published file layout and returns `SuiteTask`s: rendered few-shot prompts,
targets, and the suite's own answer extraction and scoring. `runner.py` runs a model over them.
"""
from __future__ import annotations

import importlib

SUITES = ("bbh", "mmlu", "tydiqa", "mgsm")


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"--suite={name!r}: unknown suite (choose from {', '.join(SUITES)})")
    return importlib.import_module(f"flan_jax.evaluation.suites.{name}")
