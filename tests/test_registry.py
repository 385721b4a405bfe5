"""Registry: variants, determinism, record policies, few-shot, seqio output; mixing rates; metrics."""
import collections

import pytest
import seqio

from flan_jax.data import mixing, registry, render as rendered_source
from flan_jax.data import metrics
from flan_jax.data.sources import FunctionSource
from flan_jax.data.templates import FewShotConfig, Template, TemplateError

COLORS = ["red", "green", "blue"]


def color_records(split):
    n = 60 if split == "train" else 20
    return [{"thing": f"item{split[0]}{i}", "answer": COLORS[i % 3], "options": list(COLORS),
             "why": f"because {i}"} for i in range(n)]


def color_source():
    return FunctionSource(color_records, num_examples={"train": 60, "validation": 20}, name="colors")


COLOR_TEMPLATES = [Template("What color is {thing}?", "{answer}"), Template("{thing}: color?", "{answer}"),
                   Template("Name the color of {thing}.", "{answer}")]


def register_colors(name="t_colors", **kwargs):
    kwargs.setdefault("options_field", "options")
    return registry.register_task(name, color_source(), COLOR_TEMPLATES, fields=["thing", "answer"],
                                  cluster="toy", collection="test", **kwargs)


def python_stream(task_name, split="train"):
    info = registry.task_info(task_name)
    return list(registry.iter_examples(registry.task_spec(info.base_task), info.variant, split))


def test_variants_per_task_kind():
    assert register_colors(rationale_field="why",
                           inversion_templates=[Template("Name a thing that is {answer}.", "{thing}")]) == [
        "t_colors_zs_opt", "t_colors_zs_noopt", "t_colors_fs_opt", "t_colors_fs_noopt", "t_colors_cot",
        "t_colors_inv"]
    assert register_colors("t_gen", options_field=None) == ["t_gen_zs_noopt", "t_gen_fs_noopt"]
    info = registry.task_info("t_colors_zs_opt")
    assert (info.base_task, info.variant, info.cluster, info.has_options, info.num_templates) == (
        "t_colors", "zs_opt", "toy", True, 3)
    assert info.num_examples == {"train": 60, "validation": 20} and info.metric == "accuracy"
    assert not registry.task_info("t_colors_inv").has_options
    assert registry.task_info("t_gen_zs_noopt").metric == "exact_match"
    assert "t_gen_fs_noopt" in registry.list_tasks("test") and "t_gen_fs_noopt" not in registry.list_tasks("other")
    # other test modules register tasks in the "test" collection too: look only at this test's base tasks
    assert [t for t in registry.list_tasks("test", variant="cot") if t.startswith(("t_colors", "t_gen"))] == [
        "t_colors_cot"]
    with pytest.raises(ValueError, match="variant 'zs_opt' not available"):
        register_colors("t_bad", options_field=None, variants=["zs_opt"])
    with pytest.raises(KeyError, match="t_nope"):
        registry.task_info("t_nope")


def test_registration_validates_templates_with_names():
    with pytest.raises(TemplateError, match=r"'t_bad'.*template 1.*\{colour\}"):
        registry.register_task("t_bad", color_source(), [COLOR_TEMPLATES[0], Template("{colour}?", "{answer}")],
                               fields=["thing", "answer"], cluster="toy")
    with pytest.raises(TemplateError, match=r"inversion template 0.*\{nope\}"):
        register_colors("t_bad", inversion_templates=[Template("{nope}", "{thing}")])
    with pytest.raises(ValueError, match="record_policy"):
        register_colors("t_bad", record_policy="ignore")


def test_same_seed_same_stream_other_seed_other_templates_and_count_preserved():
    register_colors(seed=1)
    first, second = python_stream("t_colors_zs_opt"), python_stream("t_colors_zs_opt")
    assert first == second and len(first) == 60
    register_colors(seed=2)
    other = python_stream("t_colors_zs_opt")
    assert len(other) == 60
    assert [e["template_index"] for e in first] != [e["template_index"] for e in other]
    assert len({e["template_index"] for e in first}) == 3  # templates are actually mixed
    # the seqio pipeline yields the same examples, one per record
    ds = seqio.get_mixture_or_task("t_colors_zs_opt").get_dataset(None, split="train", shuffle=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 60
    assert [r["inputs_pretokenized"].decode() for r in rows] == [e["inputs"] for e in other]


def test_options_feature_holds_scored_strings():
    register_colors(options_style="random")
    markers_seen = set()
    for example in python_stream("t_colors_zs_opt"):
        assert example["targets"] in example["options"] and len(example["options"]) == 3
        markers_seen.add(example["options"][0])
    assert "red" in markers_seen and len(markers_seen) > 2  # option texts and letter/number markers both occur
    for example in python_stream("t_colors_zs_noopt"):
        assert example["options"] == COLORS and "OPTIONS" not in example["inputs"]
    register_colors()
    example = python_stream("t_colors_zs_opt")[0]
    assert example["inputs"].endswith("\n\nOPTIONS:\n- red\n- green\n- blue")


def test_braces_in_data_survive_the_seqio_pipeline():
    records = [{"thing": "{answer} {{x}} {0}", "answer": "red"}]
    registry.register_task("t_braces", FunctionSource(lambda s: records, num_examples={"train": 1, "validation": 1}),
                           [Template("Q: {thing}", "{answer}")], fields=["thing", "answer"], cluster="toy",
                           collection="test", variants=["zs_noopt"])
    ds = seqio.get_mixture_or_task("t_braces_zs_noopt").get_dataset(None, split="train", shuffle=False)
    (row,) = list(ds.as_numpy_iterator())
    assert row["inputs_pretokenized"].decode() == "Q: {answer} {{x}} {0}"
    assert bytes((row["inputs"][:-1] - 3).astype("uint8")).decode() == "Q: {answer} {{x}} {0}"  # ByteVocabulary: byte + 3, then EOS
    assert row["inputs"][-1] == 1 and list(row["options"]) == []


def test_few_shot_never_includes_the_example_and_fits():
    register_colors(few_shot=FewShotConfig(num_exemplars=3, max_input_length=150, exemplar_pool_size=10))
    examples = python_stream("t_colors_fs_opt")
    kept_counts = collections.Counter()
    for index, example in enumerate(examples):
        text = example["inputs"]
        assert len(text.encode()) <= 150
        assert text.count(f"itemt{index}?") + text.count(f"itemt{index}:") + text.count(f"itemt{index}.") == 1
        kept_counts[sum(text.count(f"itemt{j}") for j in range(10))] += 1
    assert sum(kept_counts.values()) == 60 and max(kept_counts) >= 1  # exemplars were actually used
    # validation examples draw exemplars from train only
    for example in python_stream("t_colors_fs_noopt", "validation"):
        assert example["inputs"].count("itemv") == 1


def test_malformed_records_skip_and_count_or_fail_fast():
    records = [{"thing": "a", "answer": "red"}, {"answer": "red"}, {"thing": 3, "answer": "red"},
               {"thing": "  ", "answer": "red"}, {"thing": "b", "answer": "purple"}, None,
               {"thing": b"c", "answer": "blue"}]
    source = FunctionSource(lambda split: records, num_examples={"train": 7, "validation": 7})
    kwargs = dict(fields=["thing", "answer"], cluster="toy", collection="test", fixed_options=COLORS)
    registry.register_task("t_bad_records", source, COLOR_TEMPLATES, **kwargs)
    registry.reset_data_error_counts()
    kept = python_stream("t_bad_records_zs_opt")
    assert [e["targets"] for e in kept] == ["red", "blue"]
    assert registry.data_error_counts()["t_bad_records_zs_opt"] == {
        "missing_field:thing": 1, "wrong_type:thing": 1, "empty_field:thing": 1, "target_not_in_options": 1,
        "record_is_none": 1}
    registry.register_task("t_bad_records", source, COLOR_TEMPLATES, record_policy="fail_fast", **kwargs)
    with pytest.raises(registry.MalformedRecordError, match=r"'t_bad_records_zs_opt'.*record 1.*missing_field:thing"):
        python_stream("t_bad_records_zs_opt")


def test_cot_variant_targets_and_postprocessing():
    register_colors(rationale_field="why")
    example = python_stream("t_colors_cot")[4]
    assert example["targets"] == "because 4 So the answer is green." and example["options"] == []
    task = seqio.get_mixture_or_task("t_colors_cot")
    assert task.postprocess_fn(example["targets"].encode(), is_target=True) == "green"


def test_sharding_partitions_records():
    register_colors()
    source = rendered_source.RenderedSource(registry.task_spec("t_colors"), "zs_opt")
    shards = [[r["inputs"] for r in source.get_dataset("train", shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator()]
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 30
    whole = [e["inputs"].encode() for e in python_stream("t_colors_zs_opt")]
    assert sorted(shards[0] + shards[1]) == sorted(whole)


def test_max_examples_caps_split_and_declared_counts():
    register_colors(max_examples=25)
    assert seqio.get_mixture_or_task("t_colors_zs_opt").num_input_examples("train") == 25
    assert len(python_stream("t_colors_zs_opt")) == 25 and len(python_stream("t_colors_zs_opt", "validation")) == 20


# ---------------------------------------------------------------------------------------------------------------
# mixing
# ---------------------------------------------------------------------------------------------------------------

def test_flan2021_caps():
    rates = mixing.example_proportional_rates({"a": 1_000, "b": 10_000, "c": 500_000},
                                              example_cap=mixing.FLAN2021_EXAMPLE_CAP,
                                              rate_cap=mixing.FLAN2021_RATE_CAP)
    assert rates == {"a": 1000.0, "b": 3000.0, "c": 3000.0}
    assert mixing.example_proportional_rates({"a": 40_000, "b": 10}, example_cap=30_000) == {"a": 30000.0, "b": 10.0}


def test_t0_rule():
    rates = mixing.t0_rates({"big_t1": 1_000_000, "big_t2": 1_000_000, "small_t1": 20_000}, {"big_t1": 8, "big_t2": 8,
                                                                                            "small_t1": 5})
    assert rates == {"big_t1": 62_500.0, "big_t2": 62_500.0, "small_t1": 20_000.0}
    assert mixing.t0_rates({"x": 500_000}, 10) == {"x": 500_000.0}  # the rule applies strictly above 500k


def test_temperature_and_submixture_weights():
    shares = mixing.temperature_rates({"a": 100, "b": 400}, temperature=2.0)
    assert shares["a"] == pytest.approx(10 / 30) and shares["b"] == pytest.approx(20 / 30)
    assert mixing.temperature_rates({"a": 100, "b": 400}, 1.0) == pytest.approx({"a": 0.2, "b": 0.8})
    combined = mixing.weighted_submixture_rates({"flan2021": {"x": 1, "y": 3}, "cot": {"z": 5}},
                                                {"flan2021": 0.4, "cot": 0.1})
    assert combined == pytest.approx({"x": 0.2, "y": 0.6, "z": 0.2})
    full = mixing.weighted_submixture_rates({k: {f"{k}_t": 1.0} for k in mixing.FLAN2022_SUBMIX_WEIGHTS},
                                            mixing.FLAN2022_SUBMIX_WEIGHTS)
    assert full["t0_t"] == pytest.approx(0.32) and sum(full.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no weight"):
        mixing.weighted_submixture_rates({"other": {"x": 1}}, mixing.FLAN2022_SUBMIX_WEIGHTS)


def test_register_mixture_uses_declared_counts():
    register_colors(max_examples=25)
    register_colors("t_gen", options_field=None)
    rates = mixing.example_proportional_rates(mixing.num_train_examples(["t_colors_zs_opt", "t_gen_zs_noopt"]))
    assert rates == {"t_colors_zs_opt": 25.0, "t_gen_zs_noopt": 60.0}
    mixing.register_mixture("t_mix", rates)
    assert mixing.mixture_rates("t_mix") == rates
    mixing.register_proportional_mixture("t_mix_capped", list(rates), rate_cap=30)
    assert mixing.mixture_rates("t_mix_capped") == {"t_colors_zs_opt": 25.0, "t_gen_zs_noopt": 30.0}
    mixing.register_mixture("t_mix_other", {"t_gen_fs_noopt": 7.0})
    mixing.register_weighted_mixture("t_mix_weighted", {"a": "t_mix", "b": "t_mix_other"}, {"a": 0.75, "b": 0.25})
    assert mixing.mixture_rates("t_mix_weighted") == pytest.approx(
        {"t_colors_zs_opt": 0.75 * 25 / 85, "t_gen_zs_noopt": 0.75 * 60 / 85, "t_gen_fs_noopt": 0.25})


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------

def test_metrics():
    assert metrics.accuracy(["a", b"b", "c"], ["a", "b", "x"]) == {"accuracy": pytest.approx(2 / 3)}
    assert metrics.exact_match([["x y", "z"], "q"], ["x  y", "Q"]) == {"exact_match": 0.5}
    assert metrics.rouge_l(["the cat sat"], ["the cat sat"])["rouge_l"] == pytest.approx(100.0)
    assert metrics.rouge_l([["dog", "the cat"]], ["the cat"])["rouge_l"] == pytest.approx(100.0)
    assert 0 < metrics.rouge_l(["the cat sat on the mat"], ["the cat"])["rouge_l"] < 100
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.accuracy(["a", "b"], ["a"])


def test_unknown_names_get_did_you_mean_from_the_registry():
    import flan_jax.tasks  # noqa: F401  (the default collection)
    from flan_jax.pipeline import batches

    assert registry.suggest_names("parity_zs_opts")[0] == "parity_zs_opt"
    # uppercase has no options: its _opt variants do not exist, its noopt ones are suggested
    assert registry.suggest_names("uppercase_zs_opt")[0] == "uppercase_zs_noopt"
    assert "flan_default_train" in registry.suggest_names("flan_default_trian")
    with pytest.raises(ValueError, match="did you mean 'uppercase_zs_noopt'"):
        batches.resolve_mixture_or_task("uppercase_zs_opt")
    assert registry.did_you_mean("qqqqqqqqqqqq") == ""
