"""Templates: parsing, literal rendering of data, validation errors, options formats, few-shot, CoT extraction."""
import random

import pytest

from flan_jax.data import templates as tpl
from flan_jax.data.templates import Template


def test_render_fields_and_escaped_braces():
    t = Template("{{literal}} Q: {question} ({n})", "{answer}")
    assert t.input_fields == ("question", "n")
    assert t.render({"question": "why?", "n": "3", "answer": "because"}) == ("{literal} Q: why? (3)", "because")


def test_braces_and_format_syntax_in_data_are_literal():
    nasty = "{answer} {0} {{x}} %s {question!r} }{"
    t = Template("Q: {question}", "{answer}")
    inputs, target = t.render({"question": nasty, "answer": "{question}"})
    assert inputs == "Q: " + nasty
    assert target == "{question}"


@pytest.mark.parametrize("pattern", ["{unclosed", "closed}", "{1abc}", "{a-b}"])
def test_malformed_pattern_raises(pattern):
    with pytest.raises(tpl.TemplateError, match="brace"):
        Template(pattern, "{answer}")


def test_validation_error_names_task_template_and_field():
    templates = [Template("{premise}", "{answer}"), Template("{premise} {hypotesis}", "{answer}")]
    with pytest.raises(tpl.TemplateError) as err:
        tpl.validate_templates("rte", templates, ["premise", "hypothesis", "answer"])
    message = str(err.value)
    assert "'rte'" in message and "template 1" in message and "{hypotesis}" in message


def test_validation_rejects_unknown_target_field_and_empty_list():
    with pytest.raises(tpl.TemplateError, match=r"template 0 .*\{label\}"):
        tpl.validate_templates("t", [Template("{x}", "{label}")], ["x", "answer"])
    with pytest.raises(tpl.TemplateError, match="no templates"):
        tpl.validate_templates("t", [], ["x"])


def test_default_options_suffix_is_exact():
    text, scored = tpl.format_options(["yes", "no", "maybe"])
    assert text == "\n\nOPTIONS:\n- yes\n- no\n- maybe"
    assert scored == ["yes", "no", "maybe"]
    inputs, target, scored = tpl.apply_options("Is it?", "no", ["yes", "no"])
    assert inputs == "Is it?\n\nOPTIONS:\n- yes\n- no" and target == "no" and scored == ["yes", "no"]


@pytest.mark.parametrize("marker,shown,target,scored", [
    ("paren_letter", "(B) blue", "(B)", ["(A)", "(B)", "(C)"]),
    ("letter_dot", "B. blue", "B", ["A", "B", "C"]),
    ("paren_number", "(2) blue", "(2)", ["(1)", "(2)", "(3)"]),
    ("number_dot", "2. blue", "2", ["1", "2", "3"]),
    ("star", "* blue", "blue", ["red", "blue", "green"]),
])
def test_marker_styles_rewrite_target(marker, shown, target, scored):
    style = tpl.OptionsStyle(header="Choose:", marker=marker, end="\nAnswer:")
    inputs, new_target, new_scored = tpl.apply_options("Sky?", "blue", ["red", "blue", "green"], style)
    assert shown in inputs.split("\n")
    assert inputs.startswith("Sky?\n\nChoose:\n") and inputs.endswith("\nAnswer:")
    assert new_target == target and new_scored == scored
    assert new_target in new_scored


def test_random_options_style_is_seeded_and_varied():
    assert tpl.random_options_style(random.Random(7)) == tpl.random_options_style(random.Random(7))
    styles = {tpl.random_options_style(random.Random(i)) for i in range(200)}
    assert {s.marker for s in styles} == set(tpl.MARKERS)
    assert len({s.header for s in styles}) > 3
    with pytest.raises(ValueError, match="marker"):
        tpl.OptionsStyle(marker="roman")


def test_few_shot_assembly_prunes_farthest_exemplars_to_fit():
    config = tpl.FewShotConfig(num_exemplars=3, max_input_length=70, prefix_pairs=(("Q: ", "A: "),),
                               x_y_delimiters=("\n",), example_separators=("\n\n",))
    exemplars = [("first exemplar", "1"), ("second exemplar", "2"), ("third exemplar", "3")]
    text, kept = tpl.assemble_few_shot("the query", exemplars, random.Random(0), config)
    assert tpl.byte_length(text) <= 70
    assert kept == 2 and "first" not in text and "third exemplar\nA: 3" in text
    assert text.endswith("Q: the query\nA:")
    roomy = tpl.FewShotConfig(num_exemplars=3, max_input_length=1000, prefix_pairs=(("Q: ", "A: "),),
                              x_y_delimiters=("\n",), example_separators=("\n\n",))
    text, kept = tpl.assemble_few_shot("the query", exemplars, random.Random(0), roomy)
    assert kept == 3 and text.startswith("Q: first exemplar\nA: 1\n\nQ: second")


def test_few_shot_query_alone_too_long_keeps_no_exemplars():
    config = tpl.FewShotConfig(num_exemplars=1, max_input_length=5)
    text, kept = tpl.assemble_few_shot("a long query", [("x", "y")], random.Random(0), config)
    assert kept == 0 and "a long query" in text and "x" not in text.replace("query", "")


def test_few_shot_token_length_unit():
    config = tpl.FewShotConfig(num_exemplars=2, max_input_length=7, length_unit="tokens", prefix_pairs=(("", ""),),
                               x_y_delimiters=(" ",), example_separators=(" ",))
    words = lambda s: len(s.split())  # noqa: E731  (one "token" per word)
    text, kept = tpl.assemble_few_shot("q1 q2", [("a b", "c"), ("d e", "f")], random.Random(0), config, words)
    assert words(text) <= 7 and kept == 1 and text == "d e f q1 q2"


@pytest.mark.parametrize("text,answer", [
    ("3 + 4 = 7. So the answer is 7.", "7"),
    ("First... the answer is (B).", "B"),
    ("Reasoning. Final answer: Paris!", "Paris"),
    ("Answer: yes", "yes"),
    ("The answer is 3. Wait, the answer is 5.", "5"),
    ("no marker here.", "no marker here"),
    ("So the ANSWER IS \"blue\"", "blue"),
])
def test_extract_cot_answer(text, answer):
    assert tpl.extract_cot_answer(text) == answer
    assert tpl.cot_postprocessor(text.encode()) == answer


def test_cot_answer_extraction_prefers_the_longest_phrase():
    from flan_jax.data.templates import extract_cot_answer
    assert extract_cot_answer("Step by step... the final answer is 42.") == "42"
    assert extract_cot_answer("So the answer to the question is 17.") == "17"
    assert extract_cot_answer("The final answer: seven") == "seven"
    assert extract_cot_answer("Thus the answer is (C).") == "C"
