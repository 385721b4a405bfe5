"""Preference data: {prompt fields, chosen, rejected} pairs and ranked lists {prompt fields, responses: [best, ...,
worst]}, registered like instruction tasks (templates render the prompt) as one seqio task `<name>_pref` each.

A ranked list of K responses gives its K(K-1)/2 (better, worse) pairs; the trainer keeps all pairs of one prompt in
one batch and weights each by 1/C(K, 2), as InstructGPT does (Ouyang et al. 2022, sec. 3.5). Malformed records are
skipped and counted per task and reason (`data_error_counts()`), or raise at once naming file, line and field with
record_policy="fail_fast".
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import threading
from typing import Any, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from flan_jax.data import templates as tpl
from flan_jax.data.sources import MalformedRecordError, RecordSource, check_record
from flan_jax.data import registry

RESPONSES_FIELD = "responses"
CHOSEN_FIELD, REJECTED_FIELD = "chosen", "rejected"
TASK_SUFFIX = "_pref"
RECORD_POLICIES = ("skip_and_count", "fail_fast")


@dataclasses.dataclass(frozen=True)
class PreferenceSpec:
    name: str
    source: RecordSource
    templates: tuple[tpl.Template, ...]   # only the input pattern is used: it renders the prompt
    prompt_fields: tuple[str, ...]
    vocabulary: seqio.Vocabulary
    cluster: str
    collection: str
    record_policy: str
    seed: int


@dataclasses.dataclass(frozen=True)
class PromptGroup:
    """One prompt and its responses, best first; `pairs` index (better, worse) into `responses`."""
    task: str
    index: int
    inputs: str
    responses: tuple[str, ...]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return ranked_pairs(len(self.responses))


def ranked_pairs(num_responses: int) -> list[tuple[int, int]]:
    """All K(K-1)/2 (better, worse) index pairs of a list ranked best first."""
    return list(itertools.combinations(range(num_responses), 2))


_SPECS: dict[str, PreferenceSpec] = {}
_ERRORS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class UnreadableLine:
    """What a file source yields for a line that is not a JSON object (normalize_preference rejects it)."""
    reason: str
    detail: str


def normalize_preference(record: Any, prompt_fields: Sequence[str]) -> tuple[dict, tuple[str, ...]]:
    """(prompt values, responses best first) of a pair or ranked-list record; MalformedRecordError names the field."""
    if isinstance(record, UnreadableLine):
        raise MalformedRecordError(record.reason, record.detail)
    values = check_record(record, prompt_fields)
    if RESPONSES_FIELD in record:
        responses = record[RESPONSES_FIELD]
        if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence):
            raise MalformedRecordError(f"wrong_type:{RESPONSES_FIELD}",
                                       f"expected a list of str ranked best first, got {type(responses).__name__}")
        responses = tuple(check_record({RESPONSES_FIELD: r}, (RESPONSES_FIELD,))[RESPONSES_FIELD] for r in responses)
        if len(responses) < 2:
            raise MalformedRecordError(f"too_few_responses:{RESPONSES_FIELD}", f"{len(responses)} given, need >= 2")
    else:
        pair = check_record(record, (CHOSEN_FIELD, REJECTED_FIELD))
        responses = (pair[CHOSEN_FIELD], pair[REJECTED_FIELD])
    if len(set(responses)) != len(responses):
        field = RESPONSES_FIELD if RESPONSES_FIELD in record else REJECTED_FIELD
        raise MalformedRecordError(f"duplicate_response:{field}", "a preference needs distinct responses")
    return values, responses


def register_preference_task(name: str, source: RecordSource, templates: Sequence[tpl.Template], *,
                             prompt_fields: Sequence[str], vocabulary: seqio.Vocabulary, cluster: str = "preference",
                             collection: str = "default", record_policy: str = "skip_and_count",
                             seed: int = 0) -> str:
    """Registers seqio task `<name>_pref` (one example per pair: inputs, chosen, rejected, prompt_index)."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"preference task {name!r}: use letters, digits and underscores")
    if record_policy not in RECORD_POLICIES:
        raise ValueError(f"preference task {name!r}: record_policy {record_policy!r} not in {RECORD_POLICIES}")
    if not isinstance(source, RecordSource):
        raise ValueError(f"preference task {name!r}: source must be a RecordSource, got {type(source).__name__}")
    prompt_fields = tuple(prompt_fields)
    # The target pattern is not used; validate_templates still wants one, so check the inputs alone.
    tpl.validate_templates(name, [tpl.Template(t.input, "-") if isinstance(t, tpl.Template) else t
                                  for t in templates], prompt_fields)
    spec = PreferenceSpec(name, source, tuple(templates), prompt_fields, vocabulary, cluster, collection,
                          record_policy, seed)
    _SPECS[name] = spec
    task_name = name + TASK_SUFFIX
    if task_name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(task_name)
    features = {key: seqio.Feature(vocabulary=vocabulary, add_eos=True)
                for key in ("inputs", CHOSEN_FIELD, REJECTED_FIELD)}
    seqio.TaskRegistry.add(task_name, source=_PairSource(spec), output_features=features,
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])
    return task_name


def preference_spec(name: str) -> PreferenceSpec:
    base = name[:-len(TASK_SUFFIX)] if name.endswith(TASK_SUFFIX) else name
    if base not in _SPECS:
        raise KeyError(f"no preference task {name!r} (registered: {sorted(_SPECS)}; did you import flan_jax.tasks or pass --module?)")
    return _SPECS[base]


def _context(spec: PreferenceSpec, split: str, index: int) -> str:
    where = getattr(spec.source, "location", None)
    place = where(split, index) if where else f"record {index}"
    return f"preference task {spec.name!r}, split {split!r}, {place}"


def iter_groups(name: str, split: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[PromptGroup]:
    """Rendered prompts with their ranked responses, in source order; bad records skipped and counted."""
    spec = preference_spec(name)
    for index, record in spec.source.records(split, shard_index, num_shards):
        try:
            values, responses = normalize_preference(record, spec.prompt_fields)
        except MalformedRecordError as e:
            if spec.record_policy == "fail_fast":
                raise MalformedRecordError(e.reason, e.detail, _context(spec, split, index)) from None
            with _LOCK:
                _ERRORS[spec.name + TASK_SUFFIX][e.reason] += 1
            continue
        rng = registry.example_rng(spec, split, index)  # the instruction tasks' per-record template stream
        template = spec.templates[rng.randrange(len(spec.templates))]
        yield PromptGroup(spec.name + TASK_SUFFIX, index, template.render_input(values), responses)


def data_error_counts() -> dict:
    """{task: {reason: count}} of skipped preference records (counted on every pass)."""
    with _LOCK:
        return {name: dict(c) for name, c in _ERRORS.items() if c}


def reset_data_error_counts() -> None:
    with _LOCK:
        _ERRORS.clear()


class _PairSource(seqio.DataSource):
    """One example per (better, worse) pair of every prompt."""

    def __init__(self, spec: PreferenceSpec):
        super().__init__(splits=spec.source.splits)
        self.spec = spec

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def num_input_examples(self, split: str):
        return self.spec.source.num_examples(split)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None, shard_info=None, *,
                    sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
        del shuffle, seed, sequence_length, use_cached, num_epochs
        shard = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        name = self.spec.name

        def pairs():
            for group in iter_groups(name, split, *shard):
                for better, worse in group.pairs:
                    yield {"inputs": group.inputs, CHOSEN_FIELD: group.responses[better],
                           REJECTED_FIELD: group.responses[worse], "prompt_index": group.index}

        signature = {"inputs": tf.TensorSpec([], tf.string), CHOSEN_FIELD: tf.TensorSpec([], tf.string),
                     REJECTED_FIELD: tf.TensorSpec([], tf.string), "prompt_index": tf.TensorSpec([], tf.int64)}
        return tf.data.Dataset.from_generator(pairs, output_signature=signature)


class PreferenceJsonlSource(RecordSource):
    """JSONL preference files per split: one object per non-blank line. Lines that are not JSON objects fail with
    the file and line named (fail_fast) or are skipped and counted (invalid_json, not_a_json_object)."""

    def __init__(self, split_files: Mapping[str, str], num_examples: Mapping[str, int] | None = None):
        super().__init__(tuple(split_files), num_examples)
        self.split_files = dict(split_files)
        self._lines: dict[tuple[str, int], int] = {}

    def location(self, split: str, index: int) -> str:
        return f"file {self.split_files[split]} line {self._lines.get((split, index), '?')}"

    def records(self, split: str, shard_index: int = 0, num_shards: int = 1):
        self.check_split(split)
        index = -1
        with open(self.split_files[split], encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                index += 1
                if index % num_shards != shard_index:
                    continue
                self._lines[(split, index)] = line_number
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = UnreadableLine("invalid_json", str(e))
                if not isinstance(record, (dict, UnreadableLine)):
                    record = UnreadableLine("not_a_json_object", f"got {type(record).__name__}")
                yield index, record

    def describe(self) -> str:
        return f"PreferenceJsonlSource({self.split_files})"
