"""Self-Instruct: every instruction and instance filter, the prompt parsers, and our ROUGE-L vs rouge-score."""
import random
import string

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenize as rouge_score_tokenize

from flan_jax.generation import filters, prompts, rouge


@pytest.mark.parametrize("text, reason", [
    ("Sort these numbers quickly", None),
    ("Sort the numbers below.", None),
    ("Sort three numbers", "too_short"),
    ("", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    (" ".join(["word"] * 150), None),
    ("Describe the image in one sentence.", "blocked_keyword"),
    ("Make a Graph of the data given.", "blocked_keyword"),
    ("Draw a cat using only ASCII characters.", "blocked_keyword"),
    ("Go to the store and buy some milk.", "blocked_keyword"),
    ("Read the FILE and count its lines.", "blocked_keyword"),
    ("Find a mapping between the two lists.", None),   # "map" only as a whole word
    ("Explain the plot twist of the story.", "blocked_keyword"),
    ("Write a program that adds two numbers.", "write_a_program"),
    ("write a program to reverse a string please.", "write_a_program"),
    ("Write a poem about programs and computers.", None),
    ("- List three fruits that are red.", "starts_with_punctuation"),
    ("\"Quote\" the sentence given below please.", "starts_with_punctuation"),
    ("¿Cómo se dice hello en español, por favor?", "starts_non_ascii"),
    ("Éclairez the following French sentence for me.", "starts_non_ascii"),
    ("3 ways to say hello in different languages.", None),
])
def test_rule_filter(text, reason):
    assert filters.rule_filter(text) == reason


@pytest.mark.parametrize("inp, out, reason", [
    ("2 + 2", "4", None),
    ("", "A haiku about rain.", None),
    ("2 + 2", "", "empty_output"),
    ("2 + 2", "   ", "empty_output"),
    ("Hello there", "hello there ", "input_equals_output"),
    ("The list is:", "1, 2", "ends_with_colon"),
    ("x", "The answer is:", "ends_with_colon"),
])
def test_invalid_instance(inp, out, reason):
    assert filters.invalid_instance(inp, out) == reason


def test_filter_instances_counts_every_rule_and_caps_at_five():
    kept, counts = filters.filter_instances(
        [("a", "1"), ("a", "1"), ("b", ""), ("c", "c"), ("d:", "4"), ("e", "5"), ("f", "6"), ("g", "7"), ("h", "8"),
         ("i", "9"), ("j", "cut mid")], truncated_last=True)
    assert kept == [("a", "1"), ("e", "5"), ("f", "6"), ("g", "7"), ("h", "8")]
    assert counts == {"truncated": 1, "empty_output": 1, "input_equals_output": 1, "ends_with_colon": 1,
                      "conflicting_outputs": 0, "duplicate": 1, "over_limit": 1}


def test_filter_instances_same_input_different_outputs_drops_all():
    kept, counts = filters.filter_instances([("x", "1"), ("y", "2"), ("x", "3")])
    assert kept == [] and counts["conflicting_outputs"] == 3
    # outputs alone (no input) may differ freely: tasks without input have many valid answers
    kept, counts = filters.filter_instances([("", "one poem"), ("", "another poem")])
    assert len(kept) == 2 and counts["conflicting_outputs"] == 0


def test_parse_instructions_drops_item_cut_off_by_length():
    text = " Name a fruit that is yellow.\n10. Explain why ice floats on water.\n11) Give an"
    assert prompts.parse_instructions(text, cut_off=False)[0] == [
        "Name a fruit that is yellow.", "Explain why ice floats on water.", "Give an"]
    assert prompts.parse_instructions(text, cut_off=True) == (
        ["Name a fruit that is yellow.", "Explain why ice floats on water."], 1)
    prompt = prompts.instruction_prompt(["A b c d.", "E f\ng h."])
    assert prompt.endswith("1. A b c d.\n2. E f g h.\n3.")


def test_parse_instances_both_orders():
    assert prompts.parse_input_first("Input: 2 + 3\nOutput: 5\nExample 2\nInput: 1 + 1\nOutput: 2") == [
        ("2 + 3", "5"), ("1 + 1", "2")]
    assert prompts.parse_input_first("Output: a short poem\nExample 2\nno markers at all") == [
        ("", "a short poem"), ("", "no markers at all")]
    assert prompts.parse_output_first(" positive\nInput: Great food.\nClass label: negative\nInput: Awful.") == [
        ("Great food.", "positive"), ("Awful.", "negative")]


def test_seed_file_is_ours_and_well_formed():
    seeds = prompts.load_seed_tasks("tasks/self_instruct_seed_tasks.jsonl")
    assert len(seeds) >= 50
    share = sum(s.is_classification for s in seeds) / len(seeds)
    assert 0.1 <= share <= 0.2
    assert len({s.instruction for s in seeds}) == len(seeds)


def test_seed_file_errors_name_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Do it.", "instances": [{"input": "", "output": "x"}], '
                    '"is_classification": false}\n{"instruction": "Do it.", "instances": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'instances'"):
        prompts.load_seed_tasks(str(path))


def _random_text(rng):
    alphabet = "abcdefAB" + string.digits[:3] + "  ,.-'é"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


def test_rouge_l_matches_rouge_score_on_random_strings():
    rng = random.Random(0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = [_random_text(rng) for _ in range(120)]
    pool = rouge.RougePool(texts[:80])
    for text in texts[80:]:
        expected = [scorer.score(ref, text)["rougeL"].fmeasure for ref in texts[:80]]
        np.testing.assert_allclose(pool.scores(text), expected, rtol=0, atol=1e-12)
        assert rouge.rouge_l_f(text, texts[0]) == pytest.approx(expected[0], abs=1e-12)
    for a in texts:
        assert rouge.tokenize(a) == rouge_score_tokenize.tokenize(a, None)


def test_rouge_pool_incremental_and_threshold_skip():
    pool = rouge.RougePool(["sort the list of numbers"])
    assert pool.max_score("sort the numbers")[0] == pytest.approx(2 * 3 / 8)
    pool.add("a much longer instruction " + "word " * 40)   # grows the matrix width
    for _ in range(20):
        pool.add("translate the sentence")                    # grows the row count past 16
    score, index = pool.max_score("Translate the sentence!")
    assert score == 1.0 and pool.texts[index] == "translate the sentence"
    # rows whose length makes F > threshold impossible are reported as 0 under a threshold
    assert pool.scores("sort numbers")[0] == pytest.approx(2 * 2 / 7)
    assert pool.scores("sort numbers", threshold=0.7)[0] == 0.0
    assert rouge.RougePool().max_score("anything") == (0.0, -1)
