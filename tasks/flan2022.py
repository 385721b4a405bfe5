"""The Flan 2022 mixture (`flan2022`) over whichever collections are registered.

`register(promptsource_dir=None, niv2_dir=None, cot_dir=None, t0_data_dir=None)`, or importing this module (which
reads $FLAN_JAX_PROMPTSOURCE_DIR, $FLAN_JAX_NIV2_DIR, $FLAN_JAX_COT_DIR). Flan 2021 is always included; T0-SF (T0
sans the datasets also in Flan 2021) and NIv2 when their folders are given; CoT always includes TFDS gsm8k plus the
files of a CoT folder. Collections that are absent are recorded in `MISSING` and printed by
`flan-jax data stats flan2022`.

Rates (Longpre et al. 2023, arXiv:2301.13688; caps from google-research/FLAN flan/v2/mixtures.py, collection
weights from flan/v2/run_example.py): each dataset's rate is min(train examples, its collection's cap) (flan2021 30k,
t0 20k, niv2 5k, cot 100k), shared equally by its template types (zs_opt, zs_noopt, fs_opt, fs_noopt, whichever exist; CoT
datasets use their cot variant), with input-inversion variants (Flan 2021) taking 0.3 of the dataset's rate.
Collections are then weighted flan2021 0.40, t0 0.32, niv2 0.20, cot 0.05 (dialog 0.03 has no data here), the
weights of present collections renormalized to 1.
"""
from __future__ import annotations

import os

from flan_jax.data import mixing, registry
import flan_jax.tasks.flan2021
from flan_jax.tasks import niv2, t0
from flan_jax.tasks import cot, niv2, t0

MIXTURE = "flan2022"
TEMPLATE_TYPES = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")
INVERSION_SHARE = 0.3
CAPS = mixing.FLAN2022_EXAMPLE_CAPS
WEIGHTS = mixing.FLAN2022_SUBMIX_WEIGHTS
MISSING: dict[str, str] = {}


def dataset_rates(groups: dict[str, list[str]], cap: int, *, variants=TEMPLATE_TYPES,
                  inversion_share: float = 0.0) -> dict[str, float]:
    """{seqio task: rate}: each group (one dataset's base tasks) gets min(train examples, cap), split evenly over its
    base tasks and their available `variants`; `inv` variants take `inversion_share` of the group's rate."""
    rates, registered = {}, set(registry.list_tasks())
    for group, bases in groups.items():
        n = sum(registry.task_spec(b).num_examples("train") or 0 for b in bases) / len(bases)
        total = float(min(n, cap))
        if total <= 0:
            continue
        main = [f"{b}_{v}" for b in bases for v in variants if f"{b}_{v}" in registered]
        inversions = [f"{b}_inv" for b in bases if f"{b}_inv" in registered]
        share = inversion_share if inversions else 0.0
        for task in main:
            rates[task] = total * (1 - share) / len(main)
        for task in inversions:
            rates[task] = total * share / len(inversions)
    return rates


def _train_bases(collection: str) -> list[str]:
    return [b for b in registry.list_base_tasks(collection) if "train" in registry.task_spec(b).source.splits]


def submixtures() -> dict[str, dict[str, float]]:
    """{collection: {task: rate}} of the registered collections (Flan 2021 is imported if needed)."""

    subs = {"flan2021": dataset_rates({b: [b] for b in _train_bases("flan2021")}, CAPS["flan2021"],
                                      inversion_share=INVERSION_SHARE)}
    t0_bases = set(registry.list_base_tasks("t0"))
    t0_groups = {d: names for d, names in t0.LAST_DIAGNOSTICS.registered.items()
                 if t0.LAST_DIAGNOSTICS.datasets[d].role == "train" and not t0.LAST_DIAGNOSTICS.datasets[d].in_flan2021
                 and set(names) <= t0_bases}
    if t0_groups:
        subs["t0"] = dataset_rates(t0_groups, CAPS["t0"])
    if niv2.LAST_REGISTRATION is not None:
        subs["niv2"] = dataset_rates({t: [niv2.LAST_REGISTRATION.base_tasks[t][0]]
                                      for t in niv2.LAST_REGISTRATION.train_tasks
                                      if t in niv2.LAST_REGISTRATION.base_tasks}, CAPS["niv2"])
    cot_bases = _train_bases("cot")
    if cot_bases:
        subs["cot"] = dataset_rates({b: [b] for b in cot_bases}, CAPS["cot"], variants=("cot",))
    return {name: rates for name, rates in subs.items() if rates}


def register(promptsource_dir: str | None = None, niv2_dir: str | None = None, cot_dir: str | None = None,
             t0_data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Registers the collections whose folders are given, then the `flan2022` mixture; returns its submixtures."""

    if promptsource_dir:
        t0.register(promptsource_dir, t0_data_dir)
    if niv2_dir:
        niv2.register(niv2_dir)
    if cot_dir or not registry.list_base_tasks("cot"):
        cot.register(cot_dir)
    subs = submixtures()
    MISSING.clear()
    hints = {"t0": "no T0 tasks registered (pass --promptsource-dir or set $FLAN_JAX_PROMPTSOURCE_DIR)",
             "niv2": "no NIv2 tasks registered (pass --niv2-dir or set $FLAN_JAX_NIV2_DIR)",
             "dialog": "no dialog collection in flan_jax", "cot": "no CoT tasks registered"}
    for name in WEIGHTS:
        if name not in subs:
            MISSING[name] = hints.get(name, "not registered")
    mixing.register_mixture(MIXTURE, mixing.weighted_submixture_rates(subs, WEIGHTS))
    return subs


def describe_missing() -> str:
    if not MISSING:
        return "all Flan 2022 collections present"
    return "; ".join(f"{name} (weight {WEIGHTS[name]}): {why}" for name, why in MISSING.items())


def _register_from_env() -> None:
    # flan_jax.tasks.t0 / flan_jax.tasks.niv2 / flan_jax.tasks.cot already registered what their environment variables name on import.
    register()


_register_from_env()
