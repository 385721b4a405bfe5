"""T0 / P3: promptsource YAML reading, sandboxed rendering, per-template tasks, diagnostics, mixtures (fixtures)."""
import io
import os
import random

import pytest
import seqio
import tensorflow_datasets as tfds

from flan_jax.cli import data as data_cli

from flan_jax.data import mixing, registry
from flan_jax.data.sources import promptsource as ps
from flan_jax.tasks import t0

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PS_DIR = os.path.join(FIXTURES, "promptsource")
DATA_DIR = os.path.join(FIXTURES, "t0_data")
TOY = t0.T0Dataset("toy_qa", "toy_qa", "train", "multiple_choice_qa", {"train": 30, "validation": 6})


def _templates(key):
    (file,) = [f for f in ps.read_templates_dir(PS_DIR) if f.key == key]
    return {t.name: t for t in file.templates}


def test_yaml_tags_metadata_and_broken_files():
    files = {f.key: f for f in ps.read_templates_dir(PS_DIR)}
    assert set(files) == {"super_glue/rte", "toy_qa", "broken"}
    assert files["broken"].error and "invalid YAML" in files["broken"].error and not files["broken"].templates
    rte = {t.name: t for t in files["super_glue/rte"].templates}
    assert rte["does this imply"].answer_choices == "Yes ||| No" and rte["does this imply"].original_task is True
    assert rte["generate entailed hypothesis"].answer_choices is None
    assert rte["generate entailed hypothesis"].original_task is False
    assert rte["GPT-3 style"].metrics == ("Accuracy",) and rte["GPT-3 style"].dataset_key == "super_glue/rte"


def test_render_loops_filters_zip_enumerate_and_answer_choices():
    toy = _templates("toy_qa")
    record = {"question": "Which is a fruit?", "choices": ["car", "apple", "shoe"], "answer_idx": 1}
    prompt, target, options = ps.CompiledTemplate(toy["numbered choices"]).apply(record)
    assert prompt == "Which is a fruit?\n1. car\n2. apple\n3. shoe\nAnswer:" and target == "apple"
    assert options == ["car", "apple", "shoe"]
    prompt, target, _ = ps.CompiledTemplate(toy["enumerate generative"]).apply(record)
    assert prompt == "0=car;1=apple;2=shoe; Which is a fruit?" and target == "APPLE"
    lettered = ps.CompiledTemplate(toy["Lettered, with a random pick!"])
    prompt, target, options = lettered.apply(record, random.Random(3))
    assert prompt.startswith("(A) car (B) apple (C) shoe") and target == "apple" and options[1] == "apple"
    # `choice` is deterministic given the rng, and varies with it.
    picks = {lettered.apply(record, random.Random(s))[0].split("Pick one: ")[1] for s in range(20)}
    assert len(picks) > 1 and lettered.apply(record, random.Random(5)) == lettered.apply(record, random.Random(5))
    rte = _templates("super_glue/rte")
    prompt, target, _ = ps.CompiledTemplate(rte["GPT-3 style"]).apply(
        {"premise": "P.", "hypothesis": "  It RAINS ", "label": 1})
    assert prompt == "P.\n\nQuestion: it rains True or False?" and target == "False"


def test_separator_in_data_is_protected_and_failures_have_reasons():
    toy = _templates("toy_qa")
    compiled = ps.CompiledTemplate(toy["numbered choices"])
    prompt, target, options = compiled.apply({"question": "A ||| B?", "choices": ["x|||y", "z"], "answer_idx": 0})
    assert prompt.startswith("A ||| B?") and target == "x|||y" and options == ["x|||y", "z"]
    with pytest.raises(ps.RenderError, match="empty_target"):
        ps.CompiledTemplate(_templates("super_glue/rte")["does this imply"]).apply(
            {"premise": "p", "hypothesis": "h", "label": -1})
    with pytest.raises(ps.RenderError, match="SecurityError|UndefinedError"):
        ps.CompiledTemplate(toy["sandbox escape attempt"]).apply({"question": "q", "choices": ["a"], "answer_idx": 0})
    with pytest.raises(ps.TemplateLoadError, match="syntax error"):
        ps.CompiledTemplate(toy["syntax error"])
    with pytest.raises(ps.RenderError, match="reserved_key"):
        compiled.apply({"answer_choices": 1})


@pytest.fixture(scope="module")
def diagnostics():
    return t0.register(PS_DIR, DATA_DIR, datasets=["super_glue_rte", "anli_r1", TOY])


def test_register_one_task_per_template_with_diagnostics(diagnostics):
    assert diagnostics.registered["super_glue_rte"] == ["t0_super_glue_rte_does_this_imply",
                                                        "t0_super_glue_rte_gpt_3_style"]
    assert diagnostics.registered["toy_qa"] == ["t0_toy_qa_numbered_choices", "t0_toy_qa_lettered_with_a_random_pick",
                                                "t0_toy_qa_enumerate_generative",
                                                "t0_toy_qa_sandbox_escape_attempt"]
    reasons = {(d, t): r for d, t, r in diagnostics.skipped}
    assert reasons[("super_glue_rte", "generate entailed hypothesis")] == "not an original-task template"
    assert "does not compile" in reasons[("toy_qa", "syntax error")]
    assert "['missing_column']" in reasons[("toy_qa", "unknown field")]
    assert "no templates.yaml for anli" in reasons[("anli_r1", "*")]
    assert diagnostics.sources == {"super_glue_rte": "tfds:super_glue/rte",
                                   "toy_qa": f"jsonl:{os.path.join(DATA_DIR, 'toy_qa')}"}
    info = registry.task_info("t0_super_glue_rte_does_this_imply_zs_noopt")
    assert info.has_options and info.collection == "t0" and info.metric == "accuracy"
    assert "t0_toy_qa_enumerate_generative_zs_opt" not in registry.list_tasks("t0")  # no choices -> no options


def test_rendered_tasks_on_jsonl_and_tfds_mock(diagnostics):
    ds = seqio.get_mixture_or_task("t0_toy_qa_numbered_choices_zs_noopt").get_dataset(
        None, split="validation", shuffle=False)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 6
    assert examples[0]["inputs_pretokenized"].decode() == "Which is a fruit?\n1. car\n2. apple\n3. shoe\nAnswer:"
    assert examples[0]["targets_pretokenized"] == b"apple" and list(examples[0]["options"]) == [b"car", b"apple",
                                                                                                 b"shoe"]
    # The sandbox escape renders nothing: every record is counted, with its reason, on the source.
    source = registry.task_spec("t0_toy_qa_sandbox_escape_attempt").source
    assert list(seqio.get_mixture_or_task("t0_toy_qa_sandbox_escape_attempt_zs_noopt").get_dataset(
        None, split="validation", shuffle=False).as_numpy_iterator()) == []
    assert sum(source.render_error_counts().values()) == 6
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = seqio.get_mixture_or_task("t0_super_glue_rte_does_this_imply_zs_opt").get_dataset(
            None, split="validation", shuffle=False)
        examples = list(ds.as_numpy_iterator())
    assert len(examples) == 12
    for ex in examples:
        assert ex["targets_pretokenized"] in (b"Yes", b"No") and list(ex["options"]) == [b"Yes", b"No"]
        assert b"Yes or no?\n\nOPTIONS:\n- Yes\n- No" in ex["inputs_pretokenized"]


def test_mixtures_and_t0_cap_rule(diagnostics):
    train = mixing.mixture_rates(t0.TRAIN_MIXTURE)
    assert train == {f"{n}_zs_noopt": 30.0 for n in diagnostics.registered["toy_qa"]}
    assert mixing.mixture_rates(t0.EVAL_MIXTURE) == {f"{n}_zs_noopt": 1.0
                                                     for n in diagnostics.registered["super_glue_rte"]}
    # T0's rule: a dataset over 500k examples counts 500000 / num_templates per template task.
    assert mixing.t0_rates({"a": 3_600_000, "c": 1000}, {"a": 4, "c": 2}) == {"a": 125_000.0, "c": 1000.0}
    assert {d.name for d in t0.DATASETS if d.role == "eval"} == {
        "anli_r1", "anli_r2", "anli_r3", "super_glue_cb", "super_glue_rte", "super_glue_wsc_fixed", "winogrande_xl",
        "super_glue_copa", "story_cloze_2016", "hellaswag", "super_glue_wic"}


def test_task_names_are_unique_and_safe():
    taken = set()
    assert t0.task_name("d", "Hello, World!", taken) == "t0_d_hello_world"
    assert t0.task_name("d", "hello world", taken) == "t0_d_hello_world_2"


def test_cli_lists_tasks_and_skipped_templates():
    out = io.StringIO()
    assert data_cli.main(["list", "--collection", "t0", "--promptsource-dir", PS_DIR], out=out) == 0
    lines = out.getvalue().splitlines()
    rows = [line.split("\t") for line in lines if not line.startswith("#")]
    assert ["t0_super_glue_rte_gpt_3_style", "super_glue_rte", "1"] in rows
    skipped = [line for line in lines if line.startswith("# SKIPPED")]
    assert any("broken" in line and "unreadable templates.yaml" in line for line in skipped)
    assert any("commonsense_qa" in line and "no templates.yaml" in line for line in skipped)
    with pytest.raises(SystemExit, match="--promptsource-dir"):
        data_cli.main(["list", "--collection", "t0"])
