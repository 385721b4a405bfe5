"""`flan-jax data list|show|stats` run and print what they promise."""
import io

import pytest

from flan_jax import data_cli


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
    assert "truncated inputs" in lines[-2] and "skipped malformed records: none" in lines[-1]


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        data_cli.main(["stats", "parity_zs_opt", "--feature_lengths", "inputs=abc"])
    with pytest.raises(SystemExit, match="no task or mixture named 'nope'"):
        data_cli.main(["show", "nope"])


def test_show_mock_renders_a_tfds_task_offline():
    from flan_jax import registry
    from flan_jax.sources import TfdsSource
    from flan_jax.templates import Template

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
