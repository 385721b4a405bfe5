"""The train suite's --case / --dtype filters pick cases by label and fail early, naming the labels there are."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import benchmark  # noqa: E402
from bench import train as train_bench  # noqa: E402


def test_case_filter_keeps_matching_labels_only():
    everything = [c[0] for c in train_bench.selected_cpu_cases(quick=False)]
    assert "llama_small_8l" in everything and "t5_small" in everything
    assert [c[0] for c in train_bench.selected_cpu_cases(False, "llama")] == ["llama_small_8l"]
    assert [c[0] for c in train_bench.selected_cpu_cases(False, "t5_")] == ["t5_tiny", "t5_small"]


def test_unknown_case_names_the_labels():
    with pytest.raises(ValueError, match=r"--case 'gpt2'.*llama_small_8l"):
        train_bench.selected_cpu_cases(False, "gpt2")


def test_case_is_a_train_suite_option(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["packing", "--case", "llama"])
    assert "apply to the train suite, not 'packing'" in capsys.readouterr().err
