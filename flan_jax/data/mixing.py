"""Mixing rates as plain functions over {task: number of examples}, and seqio Mixture registration.

Recipes:
  FLAN 2021  example-proportional, each dataset capped at 30k training examples, mixing rate capped at 3k:
             `example_proportional_rates(counts, example_cap=30_000, rate_cap=3_000)`.
  T0         every template is its own task; a dataset over 500k examples counts as 500000 / num_templates:
             `t0_rates(counts, num_templates)`.
  Temperature  rate ∝ n^(1/T): `temperature_rates(counts, T)` (T=1 is proportional, large T tends to uniform).
  Flan 2022  submixtures weighted flan2021 0.40, t0 0.32, niv2 0.20, cot 0.05, dialog 0.03:
             `weighted_submixture_rates({"flan2021": rates, ...}, FLAN2022_SUBMIX_WEIGHTS)`.
Counts come from the tasks' declared `num_input_examples` (`num_train_examples`), so no dataset is built.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import seqio

FLAN2021_EXAMPLE_CAP = 30_000
FLAN2021_RATE_CAP = 3_000
T0_LARGE_DATASET_THRESHOLD = 500_000
FLAN2022_SUBMIX_WEIGHTS = {"flan2021": 0.40, "t0": 0.32, "niv2": 0.20, "cot": 0.05, "dialog": 0.03}
FLAN2022_EXAMPLE_CAPS = {"flan2021": 30_000, "t0": 20_000, "niv2": 5_000, "cot": 100_000, "dialog": 200_000}


def _check_counts(counts: Mapping[str, float], what: str) -> None:
    if not counts:
        raise ValueError(f"{what}: no tasks given")
    for task, n in counts.items():
        if n is None or n < 0:
            raise ValueError(f"{what}: task {task!r} has invalid example count {n!r}")


def example_proportional_rates(num_examples: Mapping[str, int], *, example_cap: int | None = None,
                               rate_cap: int | None = None) -> dict[str, float]:
    """rate = min(n, example_cap, rate_cap) per task (unnormalized, as seqio takes them)."""
    _check_counts(num_examples, "example_proportional_rates")
    caps = [c for c in (example_cap, rate_cap) if c is not None]
    return {task: float(min([n] + caps)) for task, n in num_examples.items()}


def t0_rates(num_examples: Mapping[str, int], num_templates: Mapping[str, int] | int, *,
             large_dataset_threshold: int = T0_LARGE_DATASET_THRESHOLD) -> dict[str, float]:
    """T0 rule per template-task: n, or threshold / num_templates when the dataset has more than threshold examples.

    `num_examples` maps each template-task to its dataset's size; `num_templates` gives the number of templates of
    that dataset (a mapping per task, or one int for all).
    """
    _check_counts(num_examples, "t0_rates")
    rates = {}
    for task, n in num_examples.items():
        k = num_templates if isinstance(num_templates, int) else num_templates[task]
        if k < 1:
            raise ValueError(f"t0_rates: task {task!r} has num_templates={k}")
        rates[task] = float(large_dataset_threshold / k if n > large_dataset_threshold else n)
    return rates


def normalize(rates: Mapping[str, float]) -> dict[str, float]:
    """Scales rates to sum to 1."""
    total = float(sum(rates.values()))
    if total <= 0:
        raise ValueError(f"normalize: rates sum to {total}")
    return {task: r / total for task, r in rates.items()}


def temperature_rates(rates: Mapping[str, float], temperature: float) -> dict[str, float]:
    """Shares ∝ rate^(1/temperature), normalized to sum to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature_rates: temperature must be > 0, got {temperature}")
    _check_counts(rates, "temperature_rates")
    return normalize({task: float(r) ** (1.0 / temperature) for task, r in rates.items()})


def weighted_submixture_rates(submixtures: Mapping[str, Mapping[str, float]],
                              weights: Mapping[str, float]) -> dict[str, float]:
    """Each submixture's rates are normalized to its weight (weights of the given submixtures renormalized).

    A task in several submixtures gets the sum. Submixtures without a weight are an error.
    """
    missing = sorted(set(submixtures) - set(weights))
    if missing:
        raise ValueError(f"weighted_submixture_rates: no weight for submixtures {missing}")
    total_weight = sum(weights[name] for name in submixtures)
    if total_weight <= 0:
        raise ValueError("weighted_submixture_rates: weights sum to 0")
    combined: dict[str, float] = {}
    for name, rates in submixtures.items():
        for task, share in normalize(rates).items():
            combined[task] = combined.get(task, 0.0) + share * weights[name] / total_weight
    return combined


def num_train_examples(task_names: Sequence[str], split: str = "train") -> dict[str, int]:
    """Declared example counts of seqio tasks (no dataset is built)."""
    counts = {}
    for name in task_names:
        n = seqio.get_mixture_or_task(name).num_input_examples(split)
        if n is None:
            raise ValueError(f"task {name!r} declares no num_input_examples for split {split!r}; "
                             "declare num_examples on its source to use count-based rates")
        counts[name] = int(n)
    return counts


def register_mixture(name: str, rates: Mapping[str, float]) -> seqio.Mixture:
    """(Re-)registers a seqio Mixture with explicit per-task rates."""
    if not rates:
        raise ValueError(f"mixture {name!r}: no tasks")
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, [(task, float(rate)) for task, rate in sorted(rates.items())])


def register_proportional_mixture(name: str, task_names: Sequence[str], *, example_cap: int | None = None,
                                  rate_cap: int | None = None, temperature: float = 1.0,
                                  split: str = "train") -> seqio.Mixture:
    """Example-proportional (optionally capped, optionally temperature-scaled) mixture of registered tasks.

    FLAN 2021: `register_proportional_mixture(name, tasks, example_cap=30_000, rate_cap=3_000)`.
    """
    rates = example_proportional_rates(num_train_examples(task_names, split), example_cap=example_cap,
                                       rate_cap=rate_cap)
    if temperature != 1.0:
        rates = temperature_rates(rates, temperature)
    return register_mixture(name, rates)


def register_weighted_mixture(name: str, submixtures: Mapping[str, str],
                              weights: Mapping[str, float] = FLAN2022_SUBMIX_WEIGHTS) -> seqio.Mixture:
    """Flattens registered mixtures into one with submixture weights, e.g. Flan 2022:

    `register_weighted_mixture("flan2022", {"flan2021": "flan2021_train", "t0": "t0_train", ...})`.
    """
    rates = weighted_submixture_rates({key: mixture_rates(mixture) for key, mixture in submixtures.items()},
                                      weights)
    return register_mixture(name, rates)


def mixture_rates(name: str) -> dict[str, float]:
    """{task: rate} of a registered mixture or {name: 1.0} for a task (submixtures are flattened by seqio)."""
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        return {task.name: float(provider.get_rate(task)) for task in provider.tasks}
    return {provider.name: 1.0}
