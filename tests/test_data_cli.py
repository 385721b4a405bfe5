"""`flan-jax data list|show|stats` run and print what they promise."""
import io
import os

import pytest

from flan_jax.cli import data as data_cli


def run(*argv):
    out = io.StringIO()
    assert data_cli.main(list(argv), out=out) == 0
    return out.getvalue()


def test_list_is_tab_separated_name_cluster_templates():
    lines = run("data", "list", "--collection", "default").strip().split("\n")
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert rows["parity_zs_opt"] == ["parity_zs_opt", "number_properties", "4"]
    assert all(len(r) == 3 for r in rows.values()) and len(rows) >= 40


def test_show_prints_rendered_pairs():
    text = run("show", "topic_zs_opt", "-n", "2", "--split", "validation")
    assert text.count("=== topic_zs_opt [validation #") == 2
    assert "OPTIONS:\n- sports\n- food\n- weather\n- music" in text and "TARGET: " in text


def test_stats_reports_rates_lengths_and_truncation():
    text = run("stats", "flan_default_eval", "-n", "20", "--feature_lengths", "inputs=16,targets=8")
    lines = text.strip().split("\n")
    rows = [line.split("\t") for line in lines if line.startswith("parity_zs_opt")]
    (row,) = rows
    assert row[1] == "1" and float(row[2]) == pytest.approx(1 / 15, abs=1e-3) and row[3] == "20"
    assert "trunc=" in row[4] and int(row[4].split("trunc=")[1]) > 0  # parity prompts exceed 16 tokens
    assert "truncated inputs" in lines[-3] and "skipped malformed records: none" in lines[-2]
    assert lines[-1] == "# present: 15 task(s) read; unreadable: 0"


def test_stats_reports_a_task_without_data_and_goes_on(tmp_path):
    """A TFDS dataset that is not prepared is named with the reason; the other tasks are still scanned."""
    from flan_jax.data import mixing, registry
    from flan_jax.data.sources import TfdsSource
    from flan_jax.data.templates import Template

    registry.register_task("absent_rte", TfdsSource("glue/rte", data_dir=str(tmp_path)),
                           [Template("{sentence1}", "{label}")], fields=["sentence1", "label"], cluster="nli")
    try:
        mixing.register_mixture("stats_with_absent", {"absent_rte_zs_noopt": 1.0, "parity_zs_opt": 1.0})
        lines = run("stats", "stats_with_absent", "-n", "5").strip().split("\n")
        (absent,) = [line for line in lines if line.startswith("absent_rte_zs_noopt")]
        assert f"MISSING: TFDS glue/rte is not prepared in {tmp_path}" in absent
        assert [line for line in lines if line.startswith("parity_zs_opt")][0].split("\t")[3] == "5"
        assert "# present: 1 task(s) read; unreadable: 1" in lines
    finally:
        registry.unregister_task("absent_rte")


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        data_cli.main(["stats", "parity_zs_opt", "--feature_lengths", "inputs=abc"])
    with pytest.raises(SystemExit, match="no task or mixture named 'nope'"):
        data_cli.main(["show", "nope"])


def test_show_mock_renders_a_tfds_task_offline():
    from flan_jax.data import registry
    from flan_jax.data.sources import TfdsSource
    from flan_jax.data.templates import Template

    labels = ["negative", "positive"]
    registry.register_task(
        "t_mock_sst2",
        TfdsSource("glue/sst2", map_fn=lambda r: {"sentence": r["sentence"], "answer": labels[r["label"]]},
                   num_examples={"train": 67349, "validation": 872}),
        [Template("{sentence}\nSentiment?", "{answer}"), Template("Review: {sentence}", "{answer}"),
         Template("How does this feel? {sentence}", "{answer}")],
        fields=["sentence", "answer"], fixed_options=labels, cluster="sentiment", collection="test",
        variants=["zs_opt"])
    text = run("show", "t_mock_sst2_zs_opt", "-n", "2", "--mock")
    assert text.count("=== t_mock_sst2_zs_opt [train #") == 2 and "OPTIONS:\n- negative\n- positive" in text


# --- skipped records, base names, nothing rendered (fixtures under tests/fixtures) ------------------------------
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PS_DIR = f"{FIXTURES}/promptsource"


def _listed_names(*argv):
    return [line.split("\t")[0] for line in run("list", *argv).splitlines() if line and not line.startswith("#")]


def test_show_reports_skipped_records_with_reason_and_line(tmp_path):
    from flan_jax.data import registry
    from flan_jax.data.sources.files import JsonlSource
    from flan_jax.data.templates import Template

    path = tmp_path / "train.jsonl"
    path.write_text('{"q": "one", "a": "1"}\n{"q": "two"\n["a list"]\n{"q": "three"}\n{"q": "four", "a": "4"}\n')
    registry.register_task("t_skips", JsonlSource({"train": str(path)}), [Template("{q}?", "{a}")],
                           fields=["q", "a"], cluster="c", collection="test", variants=["zs_noopt"])
    text = run("show", "t_skips_zs_noopt", "-n", "5")
    assert text.count("=== t_skips_zs_noopt [train #") == 2
    assert (f"# t_skips_zs_noopt [train]: shown 2; skipped 3 record(s) of those read: 1 invalid_json (first at "
            f"{path}:2); 1 missing_field:a; 1 not_a_json_object (first at {path}:3)") in text
    assert "# t_skips_zs_noopt [train]: shown 2; skipped 3 record(s)" in run("show", "t_skips_zs_noopt")  # per pass
    last = run("stats", "t_skips_zs_noopt").strip().splitlines()[-2]
    assert last.startswith("# skipped malformed records: {'t_skips_zs_noopt': {") and all(
        f"'{reason}': 1" in last for reason in ("invalid_json", "not_a_json_object", "missing_field:a"))


def test_show_accepts_every_name_data_list_prints():
    t0_names = _listed_names("--collection", "t0", "--promptsource-dir", PS_DIR)
    niv2_names = _listed_names("--collection", "niv2", "--niv2-dir", f"{FIXTURES}/niv2")
    cot_names = _listed_names("--collection", "cot", "--cot-dir", f"{FIXTURES}/cot")
    assert "t0_super_glue_rte_gpt_3_style" in t0_names and "niv2tk_task001_reverse_word" in niv2_names
    assert "cot_arith" in cot_names
    for names, flags in ((t0_names, ["--promptsource-dir", PS_DIR, "--mock"]),
                         (niv2_names, ["--niv2-dir", f"{FIXTURES}/niv2"]),
                         (cot_names, ["--cot-dir", f"{FIXTURES}/cot", "--mock"])):
        for name in names:
            text = run("show", name, "-n", "1", *flags)
            assert f"=== {name}_" in text, name                   # base names show each of their variants
    text = run("show", "t0_super_glue_rte_gpt_3_style", "-n", "1", "--promptsource-dir", PS_DIR, "--mock")
    assert [line.split(" [")[0] for line in text.splitlines() if line.startswith("# t0_")] == [
        f"# t0_super_glue_rte_gpt_3_style_{v}" for v in ("fs_noopt", "fs_opt", "zs_noopt", "zs_opt")]


def test_show_fails_naming_the_reason_when_no_record_renders(capsys):
    from flan_jax.tasks import t0

    toy = t0.T0Dataset("toy_qa", "toy_qa", "train", "multiple_choice_qa", {"train": 30, "validation": 6})
    t0.register(PS_DIR, f"{FIXTURES}/t0_data", datasets=[toy])
    out = io.StringIO()
    assert data_cli.main(["show", "t0_toy_qa_sandbox_escape_attempt", "--split", "validation"], out=out) == 1
    summary = [line for line in out.getvalue().splitlines() if line.startswith("# ")]
    assert summary == [f"# t0_toy_qa_sandbox_escape_attempt_{v} [validation]: shown 0; skipped 6 record(s) of those "
                       f"read: 6 SecurityError: access to attribute '__class__' of 'str' object is unsafe."
                       for v in ("fs_noopt", "zs_noopt")]
    assert ("flan-jax data show: t0_toy_qa_sandbox_escape_attempt_zs_noopt [validation]: no record rendered: all 6 "
            "record(s) read were dropped (6 SecurityError") in capsys.readouterr().err
    assert data_cli.main(["show", "t0_toy_qa_numbered_choices_zs_noopt", "--split", "validation"], out=out) == 0
