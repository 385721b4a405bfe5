"""The Flan 2021 collection: size, templates, mixtures, cheap registration, and rendering of TFDS mock data.

All data comes from `tfds.testing.mock_data` (one session for the module). Rendering goes through the registry's
Python path (`normalize_record` + `render_example`) on records read once per dataset; a few tasks and one mixture
also run through the full seqio pipeline (tokenized).
"""
import collections
import os
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import seqio  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import flan_jax.tasks.flan2021 as flan2021  # noqa: E402
from flan_jax.data import mixing, registry  # noqa: E402
from flan_jax.tasks.flan2021 import _common, nli, paraphrase, misc, summarization  # noqa: E402

MOCK_EXAMPLES = 110  # random mock records are sometimes unusable (e.g. an ARC answer key naming no choice)
MIN_RENDERED = 100


@pytest.fixture(scope="module")
def mock_records():
    """{base task: [(index, record)]} of the train split of every dataset, read under one mock_data session."""
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        records = {d.name: list(registry.task_spec(d.name).source.records("train")) for d in flan2021.datasets()}
    return records


def test_collection_size_clusters_and_templates():
    datasets = flan2021.datasets()
    assert len(datasets) >= 30
    assert len({d.cluster for d in datasets}) >= 10
    assert set(flan2021.CLUSTERS) == {d.cluster for d in datasets}
    for d in datasets:
        assert len(d.templates) >= 8, d.name
        spec = registry.task_spec(d.name)
        assert spec.collection == "flan2021" and spec.cluster == d.cluster
        assert spec.max_examples == {"train": _common.TRAIN_EXAMPLE_CAP}
        assert spec.num_examples("train") == min(d.num_examples["train"], 30_000)
    # Templates are ours and distinct within a dataset.
    for d in datasets:
        assert len({t.input for t in d.templates}) == len(d.templates), d.name
    tasks = registry.list_tasks("flan2021")
    assert len(tasks) >= 4 * 30
    for task in tasks:
        info = registry.task_info(task)
        assert info.splits == ("train", "validation")
        assert info.num_examples["validation"] > 0


def test_metrics_per_cluster():
    for task in registry.list_tasks("flan2021"):
        info = registry.task_info(task)
        if info.has_options:
            assert info.metric == "accuracy", task
        elif info.cluster == "translation":
            assert info.metric == "bleu", task
        elif info.cluster in ("summarization", "struct_to_text") or registry.task_spec(info.base_task).has_options:
            assert info.metric == "rouge_l", task
        elif info.base_task in ("squad_v1", "trivia_qa", "drop", "coqa"):
            assert info.metric == "exact_match,f1", task


def test_token_f1():
    result = _common.f1(["The Eiffel Tower", "blue"], ["eiffel tower!", "red"])
    assert result["f1"] == pytest.approx(50.0)
    assert _common.f1([["p q", "x y z"]], ["x y"])["f1"] == pytest.approx(100 * 0.8)  # max over references


def test_registration_is_cheap_and_builds_nothing():
    built = registry.datasets_built()
    start = time.perf_counter()
    flan2021.register()
    elapsed = time.perf_counter() - start
    assert registry.datasets_built() == built
    assert elapsed < 1.0, f"registering flan2021 took {elapsed:.2f}s"


def _mixture_bases(name):
    return {registry.task_info(task).base_task for task in mixing.mixture_rates(name)}


def test_train_rates_follow_flan2021_caps():
    rates = mixing.mixture_rates(flan2021.TRAIN_MIXTURE)
    per_dataset = collections.defaultdict(float)
    for task, rate in rates.items():
        info = registry.task_info(task)
        assert info.variant in ("zs_opt", "zs_noopt", "inv"), task
        per_dataset[info.base_task] += rate
    assert set(per_dataset) == {d.name for d in flan2021.datasets()}
    for d in flan2021.datasets():
        expected = min(d.num_examples["train"], 30_000, 3_000)
        assert per_dataset[d.name] == pytest.approx(expected), d.name
    assert max(per_dataset.values()) == pytest.approx(3_000)
    assert per_dataset["cb"] == pytest.approx(250)  # a small dataset keeps its size as its rate
    # Inversions take their share of templates: RTE has 9 templates + 3 inversions.
    assert rates["rte_inv"] == pytest.approx(2_490 * 3 / 12)


@pytest.mark.parametrize("cluster,left_out", [
    ("reading_comprehension", {"reading_comprehension", "reading_comprehension_commonsense", "commonsense"}),
    ("commonsense", {"reading_comprehension", "reading_comprehension_commonsense", "commonsense"}),
    ("reading_comprehension_commonsense",
     {"reading_comprehension", "reading_comprehension_commonsense", "commonsense"}),
    ("nli", {"nli", "paraphrase"}),
    ("paraphrase", {"nli", "paraphrase"}),
    ("sentiment", {"sentiment"}),
    ("translation", {"translation"}),
])
def test_heldout_mixtures(cluster, left_out):
    assert flan2021.held_out_clusters(cluster) == left_out
    train_name, eval_name = flan2021.heldout_mixture_names(cluster)
    by_cluster = collections.defaultdict(set)
    for d in flan2021.datasets():
        by_cluster[d.cluster].add(d.name)
    train_bases = _mixture_bases(train_name)
    expected_train = {n for c, names in by_cluster.items() if c not in left_out for n in names}
    assert train_bases == expected_train
    assert _mixture_bases(eval_name) == by_cluster[cluster]
    for task in mixing.mixture_rates(eval_name):
        assert registry.task_info(task).variant in ("zs_opt", "zs_noopt")


def test_every_cluster_has_heldout_mixtures():
    for cluster in flan2021.CLUSTERS:
        for name in flan2021.heldout_mixture_names(cluster):
            assert name in seqio.MixtureRegistry.names()
    with pytest.raises(ValueError, match="unknown cluster 'poetry'"):
        flan2021.held_out_clusters("poetry")


def test_every_task_renders_100_mock_examples_in_every_variant(mock_records):
    vocabulary = seqio.ByteVocabulary()
    tasks_by_base = collections.defaultdict(list)
    for task in registry.list_tasks("flan2021"):
        tasks_by_base[registry.task_info(task).base_task].append(registry.task_info(task))
    failures = []
    for base, infos in sorted(tasks_by_base.items()):
        spec = registry.task_spec(base)
        values = []
        for index, record in mock_records[base]:
            try:
                values.append((index, registry.normalize_record(spec, record)))
            except registry.MalformedRecordError:
                pass
        for info in infos:
            pool = values if info.variant.startswith("fs_") else ()
            rendered = 0
            for index, value in values:
                example = registry.render_example(spec, info.variant, "train", index, value, pool)
                assert example["inputs"].strip() and example["targets"].strip(), info.name
                if info.has_options:
                    assert example["targets"] in example["options"], info.name
                    if info.variant.endswith("_opt"):
                        assert "OPTIONS:" in example["inputs"], info.name
                assert vocabulary.decode(vocabulary.encode(example["inputs"])) == example["inputs"]
                rendered += 1
            if rendered < MIN_RENDERED:
                failures.append(f"{info.name}: {rendered}")
    assert not failures, failures


def test_few_shot_and_inversion_render_from_mock_data(mock_records):
    spec = registry.task_spec("rte")
    values = [(i, registry.normalize_record(spec, r)) for i, r in mock_records["rte"]]
    example = registry.render_example(spec, "fs_noopt", "train", 5, values[5][1], values)
    assert example["inputs"].count("?") >= 2  # exemplars + query
    assert values[5][1]["premise"] in example["inputs"]
    inverted = registry.render_example(spec, "inv", "train", 5, values[5][1])
    assert inverted["targets"] in (values[5][1]["hypothesis"], values[5][1]["premise"])
    assert inverted["options"] == []


def test_malformed_records_are_rejected_by_map_fns():
    anli = next(d for d in flan2021.datasets() if d.name == "anli_r1")
    assert anli.map_fn({"context": "p", "hypothesis": "h", "label": 7}) is None
    assert anli.map_fn({"context": "p", "hypothesis": "h", "label": 2})["answer"] == "no"
    stsb = next(d for d in flan2021.datasets() if d.name == "stsb")
    assert stsb.map_fn({"sentence1": "a", "sentence2": "b", "label": 3.6})["answer"] == "4"
    assert stsb.map_fn({"sentence1": "a", "sentence2": "b", "label": -1.0}) is None
    assert _common.linearize_table({"column_header": ["subject", "predicate", "object", "name"],
                                    "content": ["Alan", "born in", "Paris", "x"], "row_number": [0, 0, 0, 1]}) \
        == "Alan | born in | Paris; name: x"


def test_label_orders_match_tfds_class_names():
    """The hard-coded label tuples follow each builder's ClassLabel order."""
    checks = [
        ("anli/r1", "label", ["e", "n", "c"], nli._ENC),
        ("super_glue/cb", "label", ["entailment", "contradiction", "neutral"], nli._ECN),
        ("glue/wnli", "label", ["not_entailment", "entailment"], nli._NOT_E),
        ("super_glue/rte", "label", ["entailment", "not_entailment"], nli._E_NOT),
        ("glue/qqp", "label", ["not_duplicate", "duplicate"], paraphrase.YES_NO),
        ("trec", "label-coarse", ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"], misc.QUESTION_TYPES),
        ("ag_news_subset", "label", ["World", "Sports", "Business", "Sci/Tech"], summarization.NEWS_TOPICS),
    ]
    for name, feature, class_names, ours in checks:
        assert tfds.builder(name).info.features[feature].names == class_names, name
        assert len(ours) == len(class_names), name


def test_seqio_pipeline_tokenizes_mock_data():
    lengths = {"inputs": 256, "targets": 64}
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE), \
            _common.serialized_tfds_load():
        for task_name in ("rte_zs_opt", "squad_v1_fs_noopt", "wmt16_ende_inv"):
            ds = seqio.get_mixture_or_task(task_name).get_dataset(lengths, split="validation", shuffle=False)
            examples = list(ds.as_numpy_iterator())
            assert len(examples) == 4, task_name
            for ex in examples:
                assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS
                assert len(ex["inputs"]) <= 256
        mixture = seqio.get_mixture_or_task(flan2021.heldout_mixture_names("coreference")[1])
        ds = mixture.get_dataset(lengths, split="validation", shuffle=False, seed=0)
        examples = list(ds.take(6).as_numpy_iterator())
        assert len(examples) == 6
        assert all(np.all(ex["targets"] > 0) for ex in examples)
