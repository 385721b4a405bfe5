"""The FLAN 2021 collection over TFDS: `import flan_jax.tasks.flan2021` registers every dataset and the mixtures.

Each dataset (`_common.Flan2021Dataset`, listed per cluster module) becomes registry tasks `<name>_<variant>`
(zs_opt / zs_noopt / fs_opt / fs_noopt for option datasets, zs_noopt / fs_noopt otherwise, plus `inv` where the
dataset declares input-inversion templates). Training reads at most 30k examples per dataset.

Mixtures (example-proportional, FLAN 2021 rates: rate = min(train examples, 30k cap, 3k rate cap)):
  flan2021_train                       every dataset
  flan2021_eval                        every dataset's zero-shot variant, rate 1 each (evaluate on "validation")
  flan2021_heldout_<cluster>_train     every dataset outside the held-out group of <cluster>
  flan2021_heldout_<cluster>_eval      the datasets of <cluster> only (zero-shot variant)
Held-out groups follow FLAN: reading comprehension, reading comprehension with commonsense and commonsense leave
training together; NLI and paraphrase leave training together; every other cluster leaves alone.

Within a dataset, its rate is shared between the zero-shot task and the inversion task in proportion to their
template counts (FLAN drew uniformly from a dataset's templates, inversions included). Few-shot variants are
registered for evaluation but not mixed into training, as in FLAN 2021.

Registration builds no dataset: split sizes are declared from the TFDS builders' published statistics.
"""
from __future__ import annotations

from flan_jax.data import mixing, registry
from flan_jax.data.sources import TfdsSource
from flan_jax.tasks.flan2021 import (closed_book_qa, commonsense, coreference, misc, nli, paraphrase, rc_commonsense,
                            reading_comprehension, sentiment, struct_to_text, summarization, translation)
from flan_jax.tasks.flan2021._common import COLLECTION, SUMMARY_METRICS, TRAIN_EXAMPLE_CAP, Flan2021Dataset

SEED = 0
RATE_CAP = mixing.FLAN2021_RATE_CAP
CLUSTER_MODULES = (nli, reading_comprehension, rc_commonsense, closed_book_qa, commonsense, sentiment, paraphrase,
                   coreference, struct_to_text, translation, summarization, misc)
CLUSTERS = tuple(module.CLUSTER for module in CLUSTER_MODULES)
# Clusters that leave training together when any one of them is held out (FLAN 2021's rule).
HELD_OUT_GROUPS = (frozenset({reading_comprehension.CLUSTER, rc_commonsense.CLUSTER, commonsense.CLUSTER}),
                   frozenset({nli.CLUSTER, paraphrase.CLUSTER}))
TRAIN_MIXTURE = "flan2021_train"
EVAL_MIXTURE = "flan2021_eval"


def datasets() -> list[Flan2021Dataset]:
    """Every dataset of the collection, in cluster order."""
    return [dataset for module in CLUSTER_MODULES for dataset in module.DATASETS]


def held_out_clusters(cluster: str) -> frozenset[str]:
    """The clusters left out of training when `cluster` is the held-out evaluation cluster."""
    if cluster not in CLUSTERS:
        raise ValueError(f"flan2021: unknown cluster {cluster!r}; clusters: {list(CLUSTERS)}")
    for group in HELD_OUT_GROUPS:
        if cluster in group:
            return group
    return frozenset({cluster})


def heldout_mixture_names(cluster: str) -> tuple[str, str]:
    return f"flan2021_heldout_{cluster}_train", f"flan2021_heldout_{cluster}_eval"


def zero_shot_task(name: str) -> str:
    """The zero-shot task of a base dataset: with options shown when it has options."""
    return f"{name}_zs_opt" if registry.task_spec(name).has_options else f"{name}_zs_noopt"


def train_rates(names) -> dict[str, float]:
    """{seqio task: rate} for training on base datasets `names` (FLAN 2021 rates, split zero-shot / inversion)."""
    counts = {name: registry.task_spec(name).num_examples("train") for name in names}
    dataset_rates = mixing.example_proportional_rates(counts, example_cap=TRAIN_EXAMPLE_CAP, rate_cap=RATE_CAP)
    rates = {}
    for name, rate in dataset_rates.items():
        spec = registry.task_spec(name)
        num_main, num_inv = len(spec.templates), len(spec.inversion_templates)
        rates[zero_shot_task(name)] = rate * num_main / (num_main + num_inv)
        if num_inv:
            rates[f"{name}_inv"] = rate * num_inv / (num_main + num_inv)
    return rates


def register_dataset(dataset: Flan2021Dataset, seed: int = SEED) -> list[str]:
    metric_fns = list(dataset.metric_fns)
    if not metric_fns and (dataset.fixed_options or dataset.options_field):
        # Option variants score accuracy; the generative inversions of a classification dataset score ROUGE-L.
        metric_fns = list(SUMMARY_METRICS)
    source = TfdsSource(dataset.tfds_name, split_map=dataset.splits, map_fn=dataset.map_fn,
                        num_examples=dataset.num_examples)
    return registry.register_task(
        dataset.name, source, list(dataset.templates), fields=dataset.fields, cluster=dataset.cluster,
        collection=COLLECTION, fixed_options=dataset.fixed_options, options_field=dataset.options_field,
        inversion_templates=list(dataset.inversion_templates), metric_fns=metric_fns or None,
        max_examples=TRAIN_EXAMPLE_CAP, seed=seed)


def register(seed: int = SEED) -> None:
    """Registers every dataset's tasks and all Flan 2021 mixtures (cheap: no dataset is built)."""
    all_datasets = datasets()
    names = [d.name for d in all_datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"flan2021: duplicate dataset names {sorted(n for n in names if names.count(n) > 1)}")
    for dataset in all_datasets:
        register_dataset(dataset, seed)
    mixing.register_mixture(TRAIN_MIXTURE, train_rates(names))
    mixing.register_mixture(EVAL_MIXTURE, {zero_shot_task(n): 1.0 for n in names})
    for cluster in CLUSTERS:
        left_out = held_out_clusters(cluster)
        train_name, eval_name = heldout_mixture_names(cluster)
        mixing.register_mixture(train_name, train_rates([d.name for d in all_datasets if d.cluster not in left_out]))
        mixing.register_mixture(eval_name, {zero_shot_task(d.name): 1.0 for d in all_datasets if d.cluster == cluster})


register()
