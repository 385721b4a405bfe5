"""A user's own data: Hugging Face `datasets` sources (local files, `save_to_disk`) and chat `messages` records.

Offline throughout: HF_DATASETS_OFFLINE is set before `datasets` is imported (and patched, should another test
have imported it first); the datasets cache goes to the test's temporary directory.
"""
import io
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import seqio  # noqa: E402

from flan_jax.cli import data as data_cli  # noqa: E402
from flan_jax.data import registry  # noqa: E402
from flan_jax.data.sources import FunctionSource  # noqa: E402
from flan_jax.data.sources.files import JsonlSource  # noqa: E402
from flan_jax.data.sources.hf_datasets import DatasetsSource  # noqa: E402
from flan_jax.packing import PackedPrefixLMFeatureConverter  # noqa: E402

datasets = pytest.importorskip("datasets")

TWO_TURNS = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "8"}]}
# The two examples TWO_TURNS must become: the conversation so far -> each assistant turn.
EXPECTED_TURNS = [
    ("<|system|>\nAnswer briefly.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n", "4"),
    ("<|system|>\nAnswer briefly.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4\n<|user|>\nAnd doubled?\n"
     "<|assistant|>\n", "8")]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    datasets.disable_progress_bars()


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def qa_files(tmp_path):
    return {split: _write_jsonl(tmp_path / f"{split}.jsonl", [{"q": f"{split} q{i}", "a": f"a{i}"} for i in range(n)])
            for split, n in (("train", 7), ("validation", 3))}


def test_datasets_json_gives_the_jsonl_records_counts_and_shards(qa_files, tmp_path):
    theirs = DatasetsSource("json", data_files=qa_files, cache_dir=str(tmp_path / "cache"))
    ours = JsonlSource(qa_files)
    assert theirs.splits == ("train", "validation")
    for split in ours.splits:
        assert theirs.num_examples(split) == ours.num_examples(split)
        assert list(theirs.records(split)) == list(ours.records(split))
        for shard in range(3):
            assert list(theirs.records(split, shard, 3)) == list(ours.records(split, shard, 3))
    assert theirs.first_records("train", 2) == [(0, {"q": "train q0", "a": "a0"}), (1, {"q": "train q1", "a": "a1"})]


def test_save_to_disk_directory_gives_the_same_records(qa_files, tmp_path):
    saved = str(tmp_path / "saved")
    datasets.load_dataset("json", data_files=qa_files, cache_dir=str(tmp_path / "cache")).save_to_disk(saved)
    source = DatasetsSource(saved, map_fn=lambda r: {"question": r["q"], "answer": r["a"]})
    assert source.splits == ("train", "validation") and source.num_examples("train") == 7
    assert [r["question"] for _, r in source.records("validation")] == [f"validation q{i}" for i in range(3)]
    single = str(tmp_path / "single")
    datasets.load_from_disk(saved)["validation"].save_to_disk(single)  # a lone Dataset: one split, "train"
    assert DatasetsSource(single).splits == ("train",)
    assert list(DatasetsSource(single).records("train", 1, 2)) == list(JsonlSource(
        {"train": qa_files["validation"]}).records("train", 1, 2))


def test_missing_file_split_and_directory_fail_in_one_line_naming_them(qa_files, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as info:
        DatasetsSource("json", data_files={**qa_files, "test": str(tmp_path / "nope.jsonl")}, cache_dir=cache)
    assert "split 'test'" in str(info.value) and "nope.jsonl" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError) as info:
        DatasetsSource("json", data_files=qa_files, split_map={"train": "train", "test": "test"}, cache_dir=cache)
    assert str(info.value) == ("DatasetsSource(json): split 'test': the dataset has no split 'test' "
                               "(it has ['train', 'validation'])")
    with pytest.raises(FileNotFoundError, match=r"DatasetsSource\(/no/such/dir\): no directory '/no/such/dir'$"):
        DatasetsSource("/no/such/dir")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        list(DatasetsSource("json", data_files=qa_files, cache_dir=cache).records("test"))


def test_two_turn_conversation_yields_one_example_per_assistant_turn(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS])
    (task,) = registry.register_chat_task("t_chat_two", JsonlSource({"train": path}), collection="test")
    assert task == "t_chat_two_zs_noopt" and registry.task_info(task).num_examples == {"train": 2}
    examples = list(registry.iter_examples(registry.task_spec("t_chat_two"), "zs_noopt", "train"))
    assert [(e["inputs"], e["targets"]) for e in examples] == EXPECTED_TURNS


def test_datasets_source_feeds_a_chat_task(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS, TWO_TURNS])
    source = DatasetsSource("json", data_files={"train": path}, cache_dir=str(tmp_path / "cache"))
    registry.register_chat_task("t_chat_hf", source, collection="test")
    examples = list(registry.iter_examples(registry.task_spec("t_chat_hf"), "zs_noopt", "train"))
    assert [(e["inputs"], e["targets"]) for e in examples] == EXPECTED_TURNS * 2


def _decode(vocabulary, ids):
    return vocabulary.decode([int(i) for i in ids])


def test_packed_prefix_lm_loss_falls_on_assistant_tokens_only():
    conversations = [TWO_TURNS, {"messages": [{"role": "user", "content": "Name a colour."},
                                              {"role": "assistant", "content": "Blue."}]}]
    registry.register_chat_task("t_chat_pack", FunctionSource(lambda split: conversations, splits=("train",)),
                                collection="test")
    task = seqio.get_mixture_or_task("t_chat_pack_zs_noopt")
    lengths = {"inputs": 128, "targets": 16}
    ds = task.get_dataset(lengths, split="train", shuffle=False, num_epochs=1)
    rows = list(PackedPrefixLMFeatureConverter()(ds, lengths).as_numpy_iterator())
    assert len(rows) < 3  # packed: some row holds two examples
    vocabulary = task.output_features["targets"].vocabulary
    with_loss, without_loss = [], []
    for row in rows:
        tokens, weights, segments = row["decoder_target_tokens"], row["decoder_loss_weights"], row["decoder_segment_ids"]
        assert not np.any(weights[segments == 0])
        for s in range(1, segments.max() + 1):
            in_segment = (segments == s) & (tokens != vocabulary.eos_id)
            with_loss.append(_decode(vocabulary, tokens[in_segment & (weights > 0)]))
            without_loss.append(_decode(vocabulary, tokens[in_segment & (weights == 0)]))
            assert weights[segments == s].sum() == len(with_loss[-1]) + 1  # + the target's EOS
    assert sorted(with_loss) == ["4", "8", "Blue."]
    assert sorted(without_loss) == sorted([EXPECTED_TURNS[0][0], EXPECTED_TURNS[1][0],
                                           "<|user|>\nName a colour.\n<|assistant|>\n"])


MALFORMED = [
    {"messages": [{"role": "user", "content": "hello?"}]},                                # no assistant turn
    {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},  # unknown role
    {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},   # content not a str
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},  # blank reply
    {"messages": "user: hi"},
    {"text": "no messages at all"},
]


def test_malformed_conversations_are_skipped_and_counted_by_reason(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS, *MALFORMED, TWO_TURNS])
    with open(path, "a") as f:
        f.write("{not json\n")
    registry.reset_data_error_counts()
    registry.register_chat_task("t_chat_bad", JsonlSource({"train": path}), collection="test")
    examples = list(registry.iter_examples(registry.task_spec("t_chat_bad"), "zs_noopt", "train"))
    assert [(e["inputs"], e["targets"]) for e in examples] == EXPECTED_TURNS * 2
    assert registry.data_error_counts("t_chat_bad_zs_noopt") == {
        "chat_no_assistant_turn": 1, "chat_unknown_role": 1, "chat_content_not_a_string": 1,
        "chat_empty_assistant_turn": 1, "wrong_type:messages": 1, "missing_field:messages": 1, "record_is_none": 1}


def test_data_show_prints_a_chat_task(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [TWO_TURNS, MALFORMED[0]])
    registry.register_chat_task("t_chat_show", JsonlSource({"train": path}), collection="test")
    out = io.StringIO()
    assert data_cli.main(["show", "t_chat_show_zs_noopt", "-n", "5", "--split", "train"], out=out) == 0
    text = out.getvalue()
    assert text.count("=== t_chat_show_zs_noopt [train #") == 2
    assert "<|user|>\nAnd doubled?\n<|assistant|>\n" in text and "TARGET: 8" in text
    assert "skipped 1 record(s) of those read: 1 chat_no_assistant_turn" in text
