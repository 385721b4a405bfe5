"""promptsource `templates.yaml` files, read and rendered without importing promptsource (which needs Python < 3.10).

Layout: a folder (promptsource's `templates/`, or a package root holding one) with `<dataset>/templates.yaml` or
`<dataset>/<subset>/templates.yaml`. Each file maps template ids to `!Template` objects with `jinja` (input and target
separated by `|||`), `answer_choices` (a jinja expression rendering choices separated by `|||`), `name`, `id` and
`!TemplateMetadata` (`original_task`, `choices_in_prompt`, `metrics`). The YAML is read with a safe loader whose tags
build plain mappings.

Rendering uses `jinja2.sandbox.ImmutableSandboxedEnvironment` with what the templates use beyond jinja builtins:
`zip` and `enumerate` globals, and the filters `choice` (random pick, deterministic per record here),
`most_frequent` and `highlight` (identity). `|||` inside the data is protected before rendering and restored after
splitting, so data can never move the input/target boundary. The record's `answer_choices` variable is the rendered
choice list.

`PromptsourceSource` wraps a source of raw records (in the dataset's HF schema) and one template, yielding
{"prompt", "target", "options"} records for `flan_jax.data.registry`; records that fail to render yield None (counted by
the registry as malformed) and the reason is counted on the source (`render_error_counts`).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import random
import threading
from typing import Any, Iterator, Mapping, Sequence

import jinja2
import jinja2.meta
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flan_jax.data.sources import RecordSource

SEPARATOR = "|||"
_PIPE_GUARD = "\x00PIPE\x00"   # stands in for "|||" inside data while a template renders
_RNG_VAR = "__flan_jax_rng__"
ENV_GLOBALS = ("zip", "enumerate", "range", "dict", "lipsum", "cycler", "joiner", "namespace", "answer_choices",
               _RNG_VAR)


class TemplateLoadError(ValueError):
    """A templates.yaml file or one template in it cannot be read or compiled."""


class RenderError(ValueError):
    """A template failed on one record; `reason` is a short counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """One promptsource template."""

    dataset: str
    subset: str | None
    id: str
    name: str
    jinja: str
    answer_choices: str | None = None
    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: tuple[str, ...] = ()

    @property
    def dataset_key(self) -> str:
        return f"{self.dataset}/{self.subset}" if self.subset else self.dataset


@dataclasses.dataclass
class DatasetTemplates:
    """The templates of one templates.yaml (`error` is set when the whole file could not be read)."""

    dataset: str
    subset: str | None
    path: str
    templates: list[PromptTemplate]
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.subset}" if self.subset else self.dataset


class _Loader(yaml.SafeLoader):
    """Safe loader that turns promptsource's `!Template` / `!TemplateMetadata` (and any other tag) into mappings."""


def _tagged_mapping(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    del suffix
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_Loader.add_multi_constructor("!", _tagged_mapping)


def parse_templates_yaml(text: str, path: str = "<string>", dataset: str | None = None,
                         subset: str | None = None) -> DatasetTemplates:
    """Parses one templates.yaml text; raises TemplateLoadError naming the file and the template on bad input."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise TemplateLoadError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("templates"), Mapping):
        raise TemplateLoadError(f"{path}: expected a mapping with a 'templates' mapping")
    dataset = data.get("dataset") or dataset
    subset = data.get("subset") or subset
    if not dataset:
        raise TemplateLoadError(f"{path}: no 'dataset' key")
    templates = []
    for key, entry in data["templates"].items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("jinja"), str):
            raise TemplateLoadError(f"{path}: template {key!r} has no 'jinja' string")
        meta = entry.get("metadata") or {}
        if not isinstance(meta, Mapping):
            meta = {}
        choices = entry.get("answer_choices")
        templates.append(PromptTemplate(
            dataset=str(dataset), subset=str(subset) if subset else None, id=str(entry.get("id") or key),
            name=str(entry.get("name") or key), jinja=entry["jinja"],
            answer_choices=str(choices) if choices not in (None, "") else None,
            original_task=meta.get("original_task"), choices_in_prompt=meta.get("choices_in_prompt"),
            metrics=tuple(str(m) for m in (meta.get("metrics") or ()))))
    return DatasetTemplates(str(dataset), str(subset) if subset else None, path, templates)


def _templates_root(directory: str) -> str:
    for candidate in (os.path.join(directory, "templates"), os.path.join(directory, "promptsource", "templates")):
        if os.path.isdir(candidate):
            return candidate
    return directory


def read_templates_dir(directory: str) -> list[DatasetTemplates]:
    """Every templates.yaml under `directory` (a promptsource `templates/` folder or a folder containing one).

    A file that cannot be read is returned with `error` set (never silently skipped).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"promptsource templates: no directory {directory!r}")
    root = _templates_root(directory)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "templates.yaml" not in files:
            continue
        path = os.path.join(folder, "templates.yaml")
        parts = os.path.relpath(folder, root).split(os.sep)
        dataset, subset = parts[0], "/".join(parts[1:]) or None
        try:
            with open(path, encoding="utf-8") as f:
                found.append(parse_templates_yaml(f.read(), path, dataset, subset))
        except (TemplateLoadError, OSError, UnicodeDecodeError) as e:
            found.append(DatasetTemplates(dataset, subset, path, [], error=str(e)))
    return found


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------

@jinja2.pass_context
def _choice(context, values):
    values = list(values)
    if not values:
        raise RenderError("choice_from_empty")
    rng = context.get(_RNG_VAR)
    return (rng if isinstance(rng, random.Random) else random.Random(0)).choice(values)


def _most_frequent(values):
    counts = collections.Counter(values)
    if not counts:
        return ""
    top = max(counts.values())
    return next(v for v in values if counts[v] == top)  # first of the most frequent, in order


def make_environment() -> jinja2.Environment:
    """The sandboxed environment promptsource templates are rendered in."""
    env = ImmutableSandboxedEnvironment(undefined=jinja2.Undefined)
    env.globals.update(zip=zip, enumerate=enumerate)
    env.filters.update(choice=_choice, most_frequent=_most_frequent, highlight=lambda x: x)
    return env


_ENV = make_environment()


def _protect(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(SEPARATOR, _PIPE_GUARD)
    if isinstance(value, Mapping):
        return {k: _protect(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_protect(v) for v in value]
    return value


def _restore(text: str) -> str:
    return text.replace(_PIPE_GUARD, SEPARATOR).strip()


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:120]}"


class CompiledTemplate:
    """A promptsource template compiled in the sandbox; `apply(record, rng) -> (prompt, target, options)`."""

    def __init__(self, template: PromptTemplate, env: jinja2.Environment = _ENV):
        self.template = template
        try:
            self._main = env.from_string(template.jinja)
            self._choices = env.from_string(template.answer_choices) if template.answer_choices else None
            variables = set(jinja2.meta.find_undeclared_variables(env.parse(template.jinja)))
            if template.answer_choices:
                variables |= jinja2.meta.find_undeclared_variables(env.parse(template.answer_choices))
        except jinja2.TemplateError as e:
            raise TemplateLoadError(f"template {template.name!r} ({template.id}) of {template.dataset_key}: "
                                    f"{_short(e)}") from None
        if SEPARATOR not in template.jinja:
            raise TemplateLoadError(f"template {template.name!r} ({template.id}) of {template.dataset_key}: "
                                    f"no '{SEPARATOR}' between input and target")
        self.variables = frozenset(v for v in variables if v not in ENV_GLOBALS)

    @property
    def has_choices(self) -> bool:
        return self._choices is not None

    def missing_fields(self, available: Sequence[str]) -> list[str]:
        """Record fields the template reads that a source with `available` fields does not provide."""
        return sorted(self.variables - set(available))

    def answer_choices(self, record: Mapping[str, Any], rng: random.Random | None = None) -> list[str] | None:
        if self._choices is None:
            return None
        text = self._choices.render({**_protect(dict(record)), _RNG_VAR: rng or random.Random(0)})
        return [_restore(c) for c in text.split(SEPARATOR)]

    def apply(self, record: Mapping[str, Any], rng: random.Random | None = None) -> tuple[str, str, list[str]]:
        """Renders (prompt, target, options); raises RenderError with a short reason."""
        if "answer_choices" in record:
            raise RenderError("record_has_reserved_key:answer_choices")
        rng = rng or random.Random(0)
        try:
            choices = self.answer_choices(record, rng)
            text = self._main.render({**_protect(dict(record)), "answer_choices": choices, _RNG_VAR: rng})
        except RenderError:
            raise
        except Exception as e:  # jinja/sandbox/type errors from the template on this record  # noqa: BLE001
            raise RenderError(_short(e)) from None
        parts = text.split(SEPARATOR)
        if len(parts) > 2:
            raise RenderError(f"rendered {len(parts) - 1} '{SEPARATOR}' separators")
        prompt = _restore(parts[0])
        target = _restore(parts[1]) if len(parts) == 2 else ""
        if not prompt:
            raise RenderError("empty_prompt")
        if not target:
            raise RenderError("empty_target")  # promptsource's way of skipping e.g. unlabeled records
        return prompt, target, list(choices or [])


class PromptsourceSource(RecordSource):
    """Raw records (HF schema) from `base`, rendered by one template into {"prompt", "target", ["options"]}."""

    def __init__(self, base: RecordSource, template: CompiledTemplate, seed: int = 0):
        super().__init__(base.splits, {s: n for s in base.splits if (n := base.num_examples(s)) is not None})
        self.base, self.template, self.seed = base, template, seed
        self._errors: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def render(self, split: str, index: int, raw: Any) -> dict | None:
        if raw is None:
            reason = "source_record_malformed"
        else:
            rng = random.Random(f"{self.seed}/{self.template.template.id}/{split}/{index}")
            try:
                prompt, target, options = self.template.apply(raw, rng)
                record = {"prompt": prompt, "target": target}
                if self.template.has_choices:
                    record["options"] = options
                return record
            except RenderError as e:
                reason = e.reason
        with self._lock:
            self._errors[reason] += 1
        return None

    def records(self, split: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[tuple[int, dict | None]]:
        for index, raw in self.base.records(split, shard_index, num_shards):
            yield index, self.render(split, index, raw)

    def render_error_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    def describe(self) -> str:
        t = self.template.template
        return f"Promptsource({t.dataset_key}: {t.name} over {self.base.describe()})"
