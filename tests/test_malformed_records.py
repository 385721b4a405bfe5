"""Malformed and hostile records: each one is rendered correctly or counted with its reason (or, with fail_fast,
stops the stream naming task, record index and field).

The main property draws >= 10k records per run in batches and pushes each batch through the registry's record path
(`registry.iter_examples`: normalization, template rendering, options, few-shot, CoT) for several variants; an
independent oracle written from the documented policy says, per record, what must come out. A smaller test sends
hostile records through the real seqio/tf.data pipeline (the chunked generator), where text must also survive the
conversion to tf.string.
"""
import collections

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flan_jax.data import registry
from flan_jax.data.sources import FunctionSource
from flan_jax.data.templates import Template

FIELDS = ("question", "answer")
RATIONALE = "why"
OPTIONS = "options"
# Literal braces and jinja-looking text in the templates themselves must stay literal too.
TEMPLATES = [Template("Q: {question}\nIs {{answer}} {{% raw %}} right?", "{answer}"),
             Template("{question}", "{answer}")]
VARIANTS = ("zs_opt", "fs_noopt", "cot")  # options shown / few-shot with options kept for scoring / rationale

# Text that must be copied literally: format, jinja, printf and shell syntax, markers that look like our own options
# block, control characters, NUL, bidi marks, astral-plane characters.
HOSTILE = ["", "{answer}", "{question}", "{0}", "{}", "{{ answer }}", "{% for x in y %}{{ x }}{% endfor %}",
           "{{", "}}", "}{", "%s %(answer)s", "${answer}", "\\{answer\\}", "OPTIONS:\n- fake", "- a\n- b",
           "\x00", "\t\r\n", "\u202e\u200f", "🙂𝔘", "Ωμέγα 中文", "So the answer is yes.", "'\"`"]
WRONG_TYPES = [0, 3.5, None, True, ["text"], {"text": 1}, (b"x",)]
BLANKS = ["", " ", "\n\t ", "\u3000"]
INVALID_UTF8 = [b"\xff\xfe", b"caf\xe9", b"\xc3\x28", b"ok \xed\xa0\x80 surrogate", b"\x80"]

_texts = st.builds(lambda h, t: h + t, st.sampled_from(HOSTILE), st.text(max_size=6))


@st.composite
def field_values(draw):
    """(kind, value); kind 'missing' means the key is absent."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "ok", "missing", "wrong_type", "blank", "utf8_bytes",
                                 "invalid_utf8", "enormous"]))
    if kind == "missing":
        return kind, None
    if kind == "wrong_type":
        return kind, draw(st.sampled_from(WRONG_TYPES))
    if kind == "blank":
        return kind, draw(st.sampled_from(BLANKS))
    if kind == "utf8_bytes":
        return kind, ("b" + draw(_texts)).encode("utf-8")
    if kind == "invalid_utf8":
        return kind, draw(st.sampled_from(INVALID_UTF8)) + draw(_texts).encode("utf-8", "surrogatepass")
    if kind == "enormous":
        return kind, draw(st.sampled_from(HOSTILE)) + "x" * draw(st.sampled_from([100_000, 300_000]))
    return kind, "t" + draw(_texts)  # non-blank


@st.composite
def records(draw):
    shape = draw(st.sampled_from(["dict"] * 12 + ["none", "list", "str", "int"]))
    if shape == "none":
        return None
    if shape != "dict":
        return {"list": [("question", "q")], "str": "question: q", "int": 7}[shape]
    record = {}
    for field in FIELDS + (RATIONALE,):
        kind, value = draw(field_values())
        if kind != "missing":
            record[field] = value
    kind = draw(st.sampled_from(["len2to5", "len2to5", "len2to5", "len0", "len1", "len100", "missing", "none",
                                 "a_string", "a_set", "bad_item", "blank_item"]))
    if kind in ("missing",):
        return record
    if kind in ("none", "a_string", "a_set"):
        record[OPTIONS] = {"none": None, "a_string": "yes,no", "a_set": {"yes", "no"}}[kind]
        return record
    n = {"len0": 0, "len1": 1, "len100": 100}.get(kind) or draw(st.integers(2, 5))
    options = [f"o{i}" + draw(st.sampled_from(HOSTILE)) if i < 3 else f"o{i}" for i in range(n)]
    if kind == "bad_item" and n:
        options[draw(st.integers(0, n - 1))] = draw(st.sampled_from(WRONG_TYPES))
    if kind == "blank_item" and n:
        options[draw(st.integers(0, n - 1))] = draw(st.sampled_from(BLANKS))
    # Usually the answer is one of the options (as text or as bytes of it); sometimes it is not.
    answer = record.get("answer")
    if n and draw(st.integers(0, 4)) > 0 and isinstance(answer, (str, bytes)):
        options[draw(st.integers(0, n - 1))] = answer.decode("utf-8", "replace") if isinstance(answer, bytes) \
            else answer
    record[OPTIONS] = options
    return record


# --------------------------------------------------------------------------------------------------------------------
# The oracle: the documented policy, written independently of the registry's code.
# --------------------------------------------------------------------------------------------------------------------
class Bad(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _text(value, field):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")  # undecodable bytes are kept as U+FFFD, not dropped
    if not isinstance(value, str):
        raise Bad(f"wrong_type:{field}")
    if value.strip() == "":
        raise Bad(f"empty_field:{field}")
    return value


def expected(record, variant):
    """('ok', {field: text, 'options': [...]}) or ('bad', reason): fields in declared order, then options."""
    try:
        if record is None:
            raise Bad("record_is_none")
        if not isinstance(record, dict):
            raise Bad("record_not_a_mapping")
        values = {}
        for field in FIELDS + ((RATIONALE,) if variant == "cot" else ()):
            if field not in record:
                raise Bad(f"missing_field:{field}")
            values[field] = _text(record[field], field)
        options = record.get(OPTIONS)
        if options is None:
            raise Bad(f"missing_field:{OPTIONS}")
        if not isinstance(options, (list, tuple)):
            raise Bad(f"wrong_type:{OPTIONS}")
        options = [_text(o, OPTIONS) for o in options]
        if len(options) < 2:
            raise Bad(f"too_few_options:{OPTIONS}")
        if variant != "cot" and values["answer"] not in options:
            raise Bad("target_not_in_options")
        values[OPTIONS] = options
        return "ok", values
    except Bad as e:
        return "bad", e.reason


def check_rendered(example, values, variant):
    """What a correctly processed record looks like in each variant."""
    assert values["question"] in example["inputs"]  # copied literally: no format/jinja evaluation of data
    if variant == "cot":
        assert example["targets"] == f"{values[RATIONALE]} So the answer is {values['answer']}."
        assert example["options"] == []
        return
    assert example["targets"] == values["answer"]
    assert example["options"] == values[OPTIONS]
    if variant == "zs_opt":
        block = "OPTIONS:\n" + "\n".join("- " + o for o in values[OPTIONS])
        assert example["inputs"].endswith(block)


# --------------------------------------------------------------------------------------------------------------------
# Running a batch through the registry's record path
# --------------------------------------------------------------------------------------------------------------------
_BATCH: list = []


def _register(policy):
    source = FunctionSource(lambda split: list(_BATCH), splits=("train",), name="hypothesis_batch")
    # Re-registering also drops the cached few-shot exemplar pool of the previous batch.
    return registry.register_task(f"t_malformed_{policy}", source, TEMPLATES, fields=list(FIELDS),
                                  options_field=OPTIONS, rationale_field=RATIONALE, cluster="test",
                                  collection="test", record_policy=policy, variants=list(VARIANTS),
                                  shuffle_buffer_size=None)


def _stream(task_name):
    info = registry.task_info(task_name)
    return registry.iter_examples(registry.task_spec(info.base_task), info.variant, "train")


BATCH_SIZE = 100
BATCHES = 105  # >= 10k records per run
_PROPERTY_SETTINGS = settings(max_examples=BATCHES, deadline=None, derandomize=False, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.large_base_example])


def test_every_generated_record_is_processed_or_counted():
    records_checked = collections.Counter()

    @_PROPERTY_SETTINGS
    @given(batch=st.lists(records(), min_size=BATCH_SIZE, max_size=BATCH_SIZE))
    def check(batch):
        _BATCH[:] = batch
        task_names = _register("skip_and_count")
        for task_name in task_names:
            variant = registry.task_info(task_name).variant
            registry.reset_data_error_counts()
            outcomes = [expected(r, variant) for r in batch]
            produced = list(_stream(task_name))
            want_ok = [values for status, values in outcomes if status == "ok"]
            want_bad = collections.Counter(reason for status, reason in outcomes if status == "bad")
            counted = registry.data_error_counts(task_name)
            # Every record accounted for: rendered, or counted with the reason the policy gives.
            assert len(produced) + sum(counted.values()) == len(batch), (task_name, counted)
            assert counted == dict(want_bad), task_name
            assert len(produced) == len(want_ok)
            for example, values in zip(produced, want_ok):
                check_rendered(example, values, variant)
            records_checked[variant] += len(batch)

    check()
    assert min(records_checked[v] for v in VARIANTS) >= 10_000, records_checked


def test_fail_fast_names_task_record_index_and_field():
    runs = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(records(), min_size=1, max_size=30))
    def check(batch):
        _BATCH[:] = batch
        task_name = [n for n in _register("fail_fast") if n.endswith("zs_opt")][0]
        outcomes = [expected(r, "zs_opt") for r in batch]
        first_bad = next((i for i, (status, _) in enumerate(outcomes) if status == "bad"), None)
        stream = _stream(task_name)
        if first_bad is None:
            assert len(list(stream)) == len(batch)
            return
        produced = []
        with pytest.raises(registry.MalformedRecordError) as info:
            for example in stream:
                produced.append(example)
        reason = outcomes[first_bad][1]
        message = str(info.value)
        assert len(produced) == first_bad
        assert info.value.reason == reason
        assert repr(task_name) in message and f"record {first_bad}" in message, message
        if ":" in reason:  # field-specific reasons name the field
            assert reason.split(":", 1)[1] in message
        runs.append(first_bad)

    check()
    assert runs, "no batch with a malformed record was generated"


# --------------------------------------------------------------------------------------------------------------------
# The same through seqio / tf.data (text must also survive conversion to tf.string)
# --------------------------------------------------------------------------------------------------------------------
PIPELINE_RECORDS = [
    {"question": "plain", "answer": "yes", OPTIONS: ["yes", "no"], RATIONALE: "r"},
    {"question": "{answer} {{ x }} {% if %}", "answer": "{0}", OPTIONS: ["{0}", "{}"], RATIONALE: "r"},
    {"question": "nul\x00byte", "answer": "yes", OPTIONS: ["yes", "no"], RATIONALE: "r"},
    {"question": b"caf\xe9", "answer": "yes", OPTIONS: ["yes", "no"], RATIONALE: "r"},
    {"question": "x" * 200_000, "answer": "no", OPTIONS: ["yes", "no"], RATIONALE: "r"},
    {"question": "opts", "answer": "o7", OPTIONS: [f"o{i}" for i in range(100)], RATIONALE: "r"},
    {"question": "one option", "answer": "yes", OPTIONS: ["yes"], RATIONALE: "r"},
    {"question": "", "answer": "yes", OPTIONS: ["yes", "no"], RATIONALE: "r"},
    {"question": 5, "answer": "yes", OPTIONS: ["yes", "no"], RATIONALE: "r"},
    None,
]


def _pipeline(records):
    import seqio

    _BATCH[:] = records
    task_name = [n for n in _register("skip_and_count") if n.endswith("zs_opt")][0]
    registry.reset_data_error_counts()
    ds = seqio.get_mixture_or_task(task_name).get_dataset({"inputs": 64, "targets": 16}, split="train",
                                                         shuffle=False)
    return list(ds.as_numpy_iterator()), registry.data_error_counts(task_name)


def test_hostile_text_through_seqio_pipeline():
    """The chunked tf.data generator yields or counts every record; text is copied literally, then truncated."""
    examples, counted = _pipeline(PIPELINE_RECORDS)
    assert counted == {"too_few_options:options": 1, "empty_field:question": 1, "wrong_type:question": 1,
                       "record_is_none": 1}
    assert len(examples) == len(PIPELINE_RECORDS) - 4
    pretokenized = [e["inputs_pretokenized"].decode("utf-8") for e in examples]
    assert any("{answer} {{ x }} {% if %}" in p for p in pretokenized)
    assert any("nul\x00byte" in p for p in pretokenized)
    assert any("caf\ufffd" in p for p in pretokenized)
    assert any(len(e["options"]) == 100 for e in examples)
    assert all(len(e["inputs"]) <= 64 and e["inputs"][-1] == 1 for e in examples)  # truncated, EOS kept


def test_lone_surrogate_does_not_kill_the_input_pipeline():
    bad = {"question": "lone \ud800 surrogate", "answer": "yes", OPTIONS: ["yes", "no"], RATIONALE: "r"}
    examples, counted = _pipeline([PIPELINE_RECORDS[0], bad, PIPELINE_RECORDS[0]])
    assert len(examples) + sum(counted.values()) == 3


def test_file_sources_skip_and_count_bad_bytes_and_keep_reading(tmp_path):
    """One line that is not UTF-8 costs that record, not the file; a TSV cell longer than csv's 131,072-character
    field limit is read whole; a line over MAX_RECORD_BYTES is skipped and counted."""
    from flan_jax.data.sources import files
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n'
                      b'{"question": "c", "answer": "3"}\n')
    source = files.JsonlSource({"train": str(jsonl)})
    records = [r for _, r in source.records("train")]
    assert records[0] == {"question": "a", "answer": "1"} and records[1] is None
    assert records[2] == {"question": "c", "answer": "3"}
    assert source.read_error_counts() == {"invalid_utf8": 1}
    assert source.first_read_errors()["invalid_utf8"].endswith("train.jsonl:2")

    long_cell = "x" * 200_000
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"question\tanswer\n{long_cell}\t1\nb\t2\n", encoding="utf-8")
    rows = [r for _, r in files.TsvSource({"train": str(tsv)}).records("train")]
    assert rows == [{"question": long_cell, "answer": "1"}, {"question": "b", "answer": "2"}]

    big = tmp_path / "big.jsonl"
    big.write_text('{"question": "' + "y" * (files.MAX_RECORD_BYTES + 10) + '", "answer": "1"}\n'
                   '{"question": "d", "answer": "4"}\n', encoding="utf-8")
    source = files.JsonlSource({"train": str(big)})
    assert [r for _, r in source.records("train")] == [None, {"question": "d", "answer": "4"}]
    assert source.read_error_counts() == {"record_too_large": 1}


def test_csv_and_parquet_sources_read_records_and_count_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flan_jax.data.sources import files
    path = tmp_path / "train.csv"
    path.write_bytes(b'text,label\n"a, quoted\nreview",positive\nbad\xff,negative\nonly one cell\n'
                     b'"plain",negative\n')
    source = files.CsvSource({"train": str(path)})
    assert source.num_examples("train") == 4
    rows = [r for _, r in source.records("train")]
    assert rows == [{"text": "a, quoted\nreview", "label": "positive"}, None, None,
                    {"text": "plain", "label": "negative"}]
    assert source.read_error_counts() == {"invalid_utf8": 1, "wrong_cell_count": 1}

    table = pa.table({"text": ["x", "y", "z"], "label": ["positive", "negative", "positive"]})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    source = files.ParquetSource({"train": str(tmp_path / "train.parquet")}, batch_size=2)
    assert source.num_examples("train") == 3
    assert [r["text"] for _, r in source.records("train")] == ["x", "y", "z"]
