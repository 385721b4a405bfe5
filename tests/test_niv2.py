"""Super-NaturalInstructions: task JSON + split files (fixtures), encodings, test split, metrics, predictions."""
import io
import json
import os

import pytest
import seqio

from flan_jax.cli import data as data_cli

from flan_jax.data import mixing, registry
from flan_jax.data.sources import niv2
from flan_jax.tasks import niv2 as niv2_tasks

NIV2_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "niv2")


def test_splits_counts_and_schema_errors(tmp_path):
    assert niv2.read_split(NIV2_DIR, "train") == ["task001_reverse_word", "task002_count_letters"]
    assert niv2.task_summary(NIV2_DIR, "task001_reverse_word") == (120, "Text Manipulation")
    assert niv2.task_summary(NIV2_DIR, "task002_count_letters") == (12, "Counting")
    task = niv2.read_task(NIV2_DIR, "task002_count_letters")
    assert task["Definition"].startswith("Count the letters") and task["Instances"][0]["output"] == ["5", "5 letters"]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "bad.json").write_text(json.dumps({"Definition": ["d"], "Instances": [{"id": "1"}]}))
    with pytest.raises(niv2.NIv2Error, match=r"task 'bad': Instances\[0\] needs"):
        niv2.read_task(str(tmp_path), "bad")
    with pytest.raises(niv2.NIv2Error, match="no split file"):
        niv2.read_split(str(tmp_path), "test")


def test_tk_instruct_encodings():
    task = niv2.read_task(NIV2_DIR, "task001_reverse_word")
    assert niv2.encode(task, "lamp", "def") == (
        "Definition: Given a word, write it backwards.\n\nNow complete the following example -\nInput: lamp.\nOutput:")
    text = niv2.encode(task, "lamp", "def_pos1_neg1_expl")
    assert text == ("Definition: Given a word, write it backwards.\n\n"
                    " Positive Example 1 -\nInput: cat.\n Output: tac.\n"
                    " Explanation: The letters of cat in reverse order.\n\n"
                    " Negative Example 1 -\nInput: dog.\n Output: dog.\n"
                    " Explanation: This copies the word instead of reversing it.\n\n"
                    "Now complete the following example -\nInput: lamp.\nOutput:")
    assert niv2.encode(task, "x", "def_pos2").count("Positive Example") == 2
    assert niv2.Encoding.parse("pos2") == niv2.Encoding(False, 2, 0, False)
    with pytest.raises(ValueError, match="niv2 encoding 'def_two'"):
        niv2.Encoding.parse("def_two")


@pytest.fixture(scope="module")
def registration():
    return niv2_tasks.register(NIV2_DIR)


def test_register_tasks_missing_and_mixtures(registration):
    assert registration.missing == [("task999_missing_file", registration.missing[0][1])]
    assert "no file" in registration.missing[0][1]
    assert set(registry.list_tasks("niv2")) >= {"niv2_task001_reverse_word_zs_noopt",
                                                "niv2_task001_reverse_word_fs_noopt", "niv2tk_task003_first_letter_zs_noopt"}
    assert registry.task_info("niv2_task002_count_letters_zs_noopt").cluster == "counting"
    assert mixing.mixture_rates("niv2tk_eval") == {"niv2tk_task003_first_letter_zs_noopt": 1.0}
    assert mixing.mixture_rates("niv2tk_train") == {"niv2tk_task001_reverse_word_zs_noopt": 100.0,
                                                    "niv2tk_task002_count_letters_zs_noopt": 12.0}
    assert registry.task_spec("niv2_task003_first_letter").num_examples("test") == 100


def test_test_split_is_first_100_instances_tk_encoded(registration):
    ds = seqio.get_mixture_or_task("niv2tk_task003_first_letter_zs_noopt").get_dataset(
        None, split="test", shuffle=False)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 100
    first = examples[0]["inputs_pretokenized"].decode()
    assert first.startswith("Definition: What is the first letter of the word?\n\n Positive Example 1 -\n"
                            "Input: zebra.\n Output: z.\n\n Positive Example 2 -")
    assert first.endswith("Input: apple.\nOutput:") and examples[0]["targets_pretokenized"] == b"a"
    refs = niv2.test_references(NIV2_DIR, ["task003_first_letter"])
    assert len(refs) == 100 and refs[99]["id"] == "task003-99" and refs[0]["category"] == "Text Manipulation"


def test_score_per_category_max_over_references():
    result = niv2.score(["The 5.", "tac", "nope"], [["5", "5 letters"], ["tac"], ["abc"]],
                        ["Counting", "Text Manipulation", "Text Manipulation"])
    assert result["exact_match"] == pytest.approx(200 / 3)   # "The 5." normalizes to "5"
    assert result["exact_match_counting"] == 100.0 and result["exact_match_text_manipulation"] == 50.0
    assert result["rouge_l_text_manipulation"] == pytest.approx(50.0)
    assert 0 < result["rouge_l"] <= 100
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        niv2.score(["a", "b"], [["a"]])


def test_write_predictions_official_format(tmp_path):
    path = str(tmp_path / "out" / "predicted_examples.jsonl")
    niv2.write_niv2_predictions(path, ["task003-0", "task003-1"], ["a", "r\u00e9"])
    lines = open(path, encoding="utf-8").read().splitlines()
    assert [json.loads(line) for line in lines] == [{"id": "task003-0", "prediction": "a"},
                                                    {"id": "task003-1", "prediction": "r\u00e9"}]
    assert niv2.read_niv2_predictions(path) == {"task003-0": "a", "task003-1": "r\u00e9"}
    with pytest.raises(ValueError, match="duplicate ids"):
        niv2.write_niv2_predictions(path, ["x", "x"], ["a", "b"])


def test_cli_list(registration):
    out = io.StringIO()
    assert data_cli.main(["list", "--collection", "niv2", "--niv2-dir", NIV2_DIR], out=out) == 0
    lines = out.getvalue().splitlines()
    assert "niv2_task001_reverse_word\ttask001_reverse_word\t120" in lines
    assert any(line.startswith("# SKIPPED\ttask999_missing_file") for line in lines)


def test_a_broken_task_file_skips_that_task_counted_not_the_mixture(tmp_path, caplog):
    """A file whose instances are counted at registration but that fails to load later (invalid JSON) costs its own
    records, counted per task as record_is_none with the reason kept on the source; the other tasks still stream."""
    import shutil
    from flan_jax.data import render
    shutil.copytree(NIV2_DIR, tmp_path / "niv2")
    broken = tmp_path / "niv2" / "tasks" / "task002_count_letters.json"
    broken.write_text(broken.read_text()[:-40])                       # torn: its "id" keys are still counted
    result = niv2_tasks.register(str(tmp_path / "niv2"))
    assert "task002_count_letters" in result.base_tasks
    render.reset_data_error_counts()
    with caplog.at_level("WARNING"):
        ds = seqio.get_mixture_or_task("niv2_task002_count_letters_zs_noopt").get_dataset(
            None, split="train", shuffle=False)
        assert list(ds.as_numpy_iterator()) == []
        good = seqio.get_mixture_or_task("niv2_task001_reverse_word_zs_noopt").get_dataset(
            None, split="train", shuffle=False)
        assert len(list(good.as_numpy_iterator())) == 120
    assert render.data_error_counts("niv2_task002_count_letters_zs_noopt", "train") == {"record_is_none": 12}
    assert "task002_count_letters" in caplog.text and "invalid JSON" in caplog.text
    source = registry.task_spec("niv2_task002_count_letters").source
    assert source.read_error_counts() == {"bad_task_file": 12}
    assert "invalid JSON" in source.first_read_errors()["bad_task_file"]
    niv2_tasks.register(NIV2_DIR)   # the fixture's registration back for the tests that follow
