"""The embedded default collection: coverage, lengths, mixtures, determinism, cheap registration."""
import os
import subprocess
import sys

import seqio

import flan_jax.tasks  # noqa: F401  (registers the default collection)
from flan_jax.data import mixing, registry
from flan_jax.data.sources.generated import GeneratedSource
from flan_jax.tasks import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_collection_shape():
    bases = registry.list_base_tasks("default")
    clusters = {registry.task_spec(b).cluster for b in bases}
    assert len(bases) >= 10 and len(clusters) >= 4
    for base in bases:
        assert len(registry.task_spec(base).templates) >= 3, base
    option_tasks = [b for b in bases if registry.task_spec(b).has_options]
    generative = [b for b in bases if not registry.task_spec(b).has_options]
    assert len(option_tasks) >= 5 and len(generative) >= 3


def test_every_task_renders_100_examples_in_every_variant():
    for name in registry.list_tasks("default"):
        info = registry.task_info(name)
        spec = registry.task_spec(info.base_task)
        examples = list(registry.iter_examples(spec, info.variant, "validation"))
        assert len(examples) == 200 >= 100, name
        for example in examples:
            assert example["inputs"].strip() and example["targets"].strip(), name
            if info.has_options:
                assert example["targets"] in example["options"], name
            length_limit = 256 if info.variant.startswith("fs_") else 130
            assert len(example["inputs"].encode()) <= length_limit, (name, example["inputs"])
            target_limit = {"cot": 120, "inv": 60}.get(info.variant, 30)  # zs/fs targets stay short for tiny models
            assert len(example["targets"].encode()) < target_limit, name
        assert registry.data_error_counts(name) == {}, name


def test_mixtures():
    train = mixing.mixture_rates(default.TRAIN_MIXTURE)
    train_bases = {registry.task_info(t).base_task for t in train}
    assert all(registry.task_info(t).variant in ("zs_opt", "zs_noopt") for t in train)
    assert all(registry.task_info(t).cluster not in default.HELD_OUT_CLUSTERS for t in train)
    assert {rate for t, rate in train.items() if registry.task_info(t).has_options} == {20_000.0}
    assert {rate for t, rate in train.items() if not registry.task_info(t).has_options} == {10_000.0}
    evals = mixing.mixture_rates(default.EVAL_MIXTURE)
    eval_bases = [registry.task_info(t).base_task for t in evals]
    assert sorted(eval_bases) == registry.list_base_tasks("default")  # exactly one eval task per base task
    seen_option_evals = [t for t in evals if registry.task_info(t).base_task in train_bases
                         and registry.task_info(t).has_options]
    held_out = [t for t in evals if registry.task_info(t).base_task not in train_bases]
    assert len(seen_option_evals) >= 5 and held_out
    assert all(registry.task_info(t).cluster in default.HELD_OUT_CLUSTERS for t in held_out)
    assert all(registry.task_info(t).variant.startswith("zs_") for t in evals)


def test_generated_data_is_deterministic_in_seed():
    from flan_jax.data.sources import generated as gen

    a = GeneratedSource("parity", gen.gen_parity, seed=0)
    b = GeneratedSource("parity", gen.gen_parity, seed=0)
    c = GeneratedSource("parity", gen.gen_parity, seed=1)
    first = [r for _, r in a.first_records("train", 50)]
    assert first == [r for _, r in b.first_records("train", 50)]
    assert first != [r for _, r in c.first_records("train", 50)]
    assert a.record("validation", 3) != a.record("train", 3) or a.record("validation", 4) != a.record("train", 4)
    labels = {r["answer"] for r in first}
    assert labels == {"even", "odd"}


def test_seqio_dataset_of_a_default_task():
    ds = seqio.get_mixture_or_task("larger_number_zs_opt").get_dataset(
        {"inputs": 256, "targets": 64}, split="validation", shuffle=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 200
    for row in rows[:20]:
        assert row["targets_pretokenized"] in list(row["options"])
        assert row["inputs"][-1] == 1 and row["targets"][-1] == 1


def test_import_tasks_is_cheap_and_builds_nothing(tmp_path):
    code = ("import time, tensorflow, seqio\n"
            "t = time.time()\n"
            "import flan_jax.tasks\n"
            "elapsed = time.time() - t\n"
            "from flan_jax.data import registry\n"
            "from flan_jax.data.sources.generated import GeneratedSource\n"
            "print(elapsed, registry.datasets_built(), GeneratedSource.records_generated, len(registry.list_tasks()))\n")
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", FLAN_JAX_CACHE=str(cache))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    elapsed, built, generated, num_tasks = result.stdout.split()
    assert float(elapsed) < 2.0 and built == "0" and generated == "0" and int(num_tasks) >= 40
    assert not cache.exists() or not list(cache.iterdir())  # the vocabulary is trained on first use, not at import


def test_template_choice_is_independent_of_the_label():
    """Regression: record generation and template choice once shared a seed, so the template revealed the label."""
    import collections
    from flan_jax.data import registry
    spec = registry.task_spec("keyword_sentiment")
    counts = collections.Counter()
    for index, example in zip(range(2000), registry.iter_examples(spec, "zs_noopt", "train")):
        counts[(int(example["template_index"]), example["targets"])] += 1
    templates = {t for t, _ in counts}
    assert len(templates) >= 3
    for t in templates:
        pos, neg = counts[(t, "positive")], counts[(t, "negative")]
        assert min(pos, neg) / (pos + neg) > 0.35, (t, pos, neg)
