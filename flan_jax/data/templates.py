"""Prompt templates: patterns over named fields, options formatting, few-shot assembly, CoT answer extraction.

A `Template` holds an input pattern and a target pattern such as ``"Is {number} even or odd?"`` / ``"{answer}"``.
Patterns are parsed once into literal pieces and field names; rendering joins the pieces with the field values, so
braces or format syntax inside the *data* are copied literally (nothing is ever passed through ``str.format``).
In a pattern, ``{{`` and ``}}`` stand for literal braces.

This module knows nothing of seqio or models; `flan_jax.data.registry` builds tasks from it.
"""
from __future__ import annotations

import dataclasses
import random
import re
import string
from typing import Callable, Mapping, Sequence

_FIELD_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{|\}")


class TemplateError(ValueError):
    """A template is malformed or names a field its task does not provide."""


def parse_pattern(pattern: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Splits a pattern into literal pieces and field names: pieces[0] f[0] pieces[1] f[1] ... pieces[-1]."""
    pieces, fields, literal, pos = [], [], [], 0
    for match in _FIELD_RE.finditer(pattern):
        literal.append(pattern[pos:match.start()])
        token = match.group(0)
        if token == "{{":
            literal.append("{")
        elif token == "}}":
            literal.append("}")
        elif match.group(1) is not None:
            pieces.append("".join(literal))
            literal = []
            fields.append(match.group(1))
        else:
            raise TemplateError(f"unbalanced {token!r} at offset {match.start()} in pattern {pattern!r} "
                                "(write '{{' or '}}' for a literal brace)")
        pos = match.end()
    literal.append(pattern[pos:])
    pieces.append("".join(literal))
    return tuple(pieces), tuple(fields)


def _render_parsed(pieces: Sequence[str], fields: Sequence[str], values: Mapping[str, str]) -> str:
    out = [pieces[0]]
    for field, piece in zip(fields, pieces[1:]):
        out.append(values[field])
        out.append(piece)
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Template:
    """An (input pattern, target pattern) pair over named fields."""

    input: str
    target: str
    name: str = ""

    def __post_init__(self):
        # Parse eagerly so a malformed pattern fails where the template is written.
        object.__setattr__(self, "_input_parsed", parse_pattern(self.input))
        object.__setattr__(self, "_target_parsed", parse_pattern(self.target))

    @property
    def input_fields(self) -> tuple[str, ...]:
        return self._input_parsed[1]

    @property
    def target_fields(self) -> tuple[str, ...]:
        return self._target_parsed[1]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.input_fields) | frozenset(self.target_fields)

    def render(self, values: Mapping[str, str]) -> tuple[str, str]:
        """Returns (input text, target text); `values` must hold every field as a str."""
        return (_render_parsed(*self._input_parsed, values), _render_parsed(*self._target_parsed, values))

    def render_input(self, values: Mapping[str, str]) -> str:
        return _render_parsed(*self._input_parsed, values)

    def render_target(self, values: Mapping[str, str]) -> str:
        return _render_parsed(*self._target_parsed, values)


def validate_templates(task_name: str, templates: Sequence[Template], available_fields: Sequence[str],
                       kind: str = "template") -> None:
    """Raises TemplateError naming task, template index and field when a template uses an unknown field."""
    if not templates:
        raise TemplateError(f"task {task_name!r}: no {kind}s given")
    available = set(available_fields)
    for index, template in enumerate(templates):
        if not isinstance(template, Template):
            raise TemplateError(f"task {task_name!r}: {kind} {index} is a {type(template).__name__}, not a Template")
        unknown = sorted(template.fields - available)
        if unknown:
            raise TemplateError(f"task {task_name!r}: {kind} {index} ({template.input!r}) uses field "
                                f"{{{unknown[0]}}} which the task does not provide (available: {sorted(available)})")
        if not template.target.strip():
            raise TemplateError(f"task {task_name!r}: {kind} {index} has an empty target pattern")


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------

# Marker kinds: how each option is shown, and what the target becomes ("text" keeps the option text itself).
MARKERS = ("dash", "star", "paren_letter", "letter_dot", "paren_number", "number_dot")


def _marker_label(kind: str, i: int) -> tuple[str, str | None]:
    """(display prefix, target label or None when the target stays the option text)."""
    letter = string.ascii_uppercase[i] if i < 26 else f"A{i}"
    if kind == "dash":
        return "- ", None
    if kind == "star":
        return "* ", None
    if kind == "paren_letter":
        return f"({letter}) ", f"({letter})"
    if kind == "letter_dot":
        return f"{letter}. ", letter
    if kind == "paren_number":
        return f"({i + 1}) ", f"({i + 1})"
    if kind == "number_dot":
        return f"{i + 1}. ", str(i + 1)
    raise ValueError(f"unknown options marker {kind!r}; choose from {MARKERS}")


@dataclasses.dataclass(frozen=True)
class OptionsStyle:
    """How the options list is appended to an input."""

    header: str = "OPTIONS:"
    marker: str = "dash"
    item_separator: str = "\n"
    prefix: str = "\n\n"   # between the rendered input and the header
    end: str = ""          # after the last option

    def __post_init__(self):
        _marker_label(self.marker, 0)  # validates marker


DEFAULT_OPTIONS_STYLE = OptionsStyle()

RANDOM_OPTIONS_HEADERS = ("OPTIONS:", "Options:", "Choose from:", "Possible answers:", "Pick one:",
                          "Select from the following:", "Available choices:", "Answer choices:")
RANDOM_OPTIONS_ENDS = ("", "\nAnswer:", "\nThe answer is:")
RANDOM_OPTIONS_SEPARATORS = ("\n", "\n", " ")


def random_options_style(rng: random.Random) -> OptionsStyle:
    """A randomized header/marker/separator/end, drawn from `rng`."""
    return OptionsStyle(header=rng.choice(RANDOM_OPTIONS_HEADERS), marker=rng.choice(MARKERS),
                        item_separator=rng.choice(RANDOM_OPTIONS_SEPARATORS), prefix=rng.choice(("\n\n", "\n")),
                        end=rng.choice(RANDOM_OPTIONS_ENDS))


def format_options(options: Sequence[str], style: OptionsStyle = DEFAULT_OPTIONS_STYLE) -> tuple[str, list[str]]:
    """Returns (suffix text to append to the input, scored options).

    The scored options are what a correct target is compared with: the option texts for dash/star markers, the
    marker labels ("(A)", "B", "(3)", "1") for letter/number markers.
    """
    lines, scored = [], []
    for i, option in enumerate(options):
        shown, label = _marker_label(style.marker, i)
        lines.append(shown + option)
        scored.append(option if label is None else label)
    text = style.prefix + style.header + style.item_separator + style.item_separator.join(lines) + style.end
    return text, scored


def apply_options(input_text: str, target: str, options: Sequence[str],
                  style: OptionsStyle = DEFAULT_OPTIONS_STYLE) -> tuple[str, str, list[str]]:
    """Appends the options block; rewrites the target into its marker when the style uses letters/numbers.

    `target` must be one of `options` (caller validates). Returns (input, target, scored options).
    """
    suffix, scored = format_options(options, style)
    return input_text + suffix, scored[list(options).index(target)], scored


# ----------------------------------------------------------------------------------------------------------------
# Few-shot
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """Few-shot assembly settings; one prefix pair, delimiter and separator is drawn per example."""

    num_exemplars: int = 3
    max_input_length: int = 1024            # in `length_unit`s, for the whole assembled input
    length_unit: str = "bytes"              # "bytes" (UTF-8) or "tokens" (the task's vocabulary)
    exemplar_pool_size: int = 500           # exemplars are drawn from the first N train records
    prefix_pairs: tuple[tuple[str, str], ...] = (("Q: ", "A: "), ("Input: ", "Output: "), ("", ""),
                                                 ("Question: ", "Answer: "), ("", "Answer: "))
    x_y_delimiters: tuple[str, ...] = ("\n", "\n\n", " ")
    example_separators: tuple[str, ...] = ("\n\n", "\n\n\n")

    def __post_init__(self):
        if self.num_exemplars < 1:
            raise ValueError(f"FewShotConfig.num_exemplars must be >= 1, got {self.num_exemplars}")
        if self.length_unit not in ("bytes", "tokens"):
            raise ValueError(f"FewShotConfig.length_unit must be 'bytes' or 'tokens', got {self.length_unit!r}")
        if not (self.prefix_pairs and self.x_y_delimiters and self.example_separators):
            raise ValueError("FewShotConfig: prefix_pairs, x_y_delimiters and example_separators must be non-empty")


def byte_length(text: str) -> int:
    return len(text.encode("utf-8"))


def assemble_few_shot(query_input: str, exemplars: Sequence[tuple[str, str]], rng: random.Random,
                      config: FewShotConfig, length_fn: Callable[[str], int] = byte_length) -> tuple[str, int]:
    """Joins exemplar (input, target) pairs before the query; returns (text, number of exemplars kept).

    Exemplars farthest from the query are dropped first until the text fits `config.max_input_length`. When even
    the bare query does not fit, no exemplar is kept (downstream truncation then applies and is counted there).
    """
    input_prefix, target_prefix = rng.choice(config.prefix_pairs)
    delimiter = rng.choice(config.x_y_delimiters)
    separator = rng.choice(config.example_separators)
    query = f"{input_prefix}{query_input}{delimiter}{target_prefix}".rstrip(" ")
    shots = [f"{input_prefix}{x}{delimiter}{target_prefix}{y}" for x, y in exemplars]
    # Lengths add up exactly for bytes; for tokens the sum is an upper-bound-ish estimate, so re-check the join.
    lengths = [length_fn(s + separator) for s in shots]
    total = length_fn(query) + sum(lengths)
    start = 0
    while start < len(shots) and total > config.max_input_length:
        total -= lengths[start]
        start += 1
    kept = shots[start:]
    text = separator.join(kept + [query])
    while kept and length_fn(text) > config.max_input_length:
        kept = kept[1:]
        text = separator.join(kept + [query])
    return text, len(kept)


# ----------------------------------------------------------------------------------------------------------------
# Chain of thought
# ----------------------------------------------------------------------------------------------------------------

COT_INSTRUCTIONS = ("Let's think step by step.", "Think it through, then give the answer.",
                    "Explain your reasoning before answering.")
# Longest phrases first so "the final answer is 42" splits after "answer is", not after "final answer"; "answer to the
# question is" and friends count as "answer ... is".
_COT_SPLIT_RE = re.compile(r"final answer is|answer(?: to [^.?!]{0,40}?)? is|final answer:?|answer:", re.IGNORECASE)
_WRAPPED_RE = re.compile(r"^\(([^()\s]{1,8})\)$")
_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`*"


def extract_cot_answer(text: str) -> str:
    """Extracts the final answer from chain-of-thought text.

    Splits on "answer is" / "final answer" / "Answer:" (any case), takes the last piece, strips surrounding
    punctuation and whitespace, and unwraps a parenthesized marker: "... so the answer is (B)." -> "B".
    Text without any of the phrases is stripped the same way.
    """
    answer = _COT_SPLIT_RE.split(text)[-1].strip(_EDGE_PUNCTUATION)
    wrapped = _WRAPPED_RE.match(answer)
    return wrapped.group(1) if wrapped else answer


def cot_postprocessor(output_or_target, example=None, is_target=False) -> str:
    """seqio postprocess_fn wrapper around `extract_cot_answer` (bytes are decoded as UTF-8)."""
    del example, is_target
    if isinstance(output_or_target, bytes):
        output_or_target = output_or_target.decode("utf-8", errors="replace")
    return extract_cot_answer(str(output_or_target))
