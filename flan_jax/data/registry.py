"""Register a templated task once; get one seqio Task per prompt variant.

Variants (seqio task name ``<task>_<variant>``):
  zs_opt    zero-shot, options appended ("OPTIONS:\\n- a\\n- b", or a randomized style)     option tasks only
  zs_noopt  zero-shot, no options shown (the "options" feature still lists them for scoring)
  fs_opt    few-shot exemplars from the train split + options                                option tasks only
  fs_noopt  few-shot, no options shown
  cot       chain of thought: target "<rationale> So the answer is <answer>."              when rationale_field
  inv       input inversion templates (no options)                                           when inversion_templates
Tasks without options get only zs_noopt / fs_noopt (plus cot / inv when declared).

Each example picks its template at random, deterministically from (seed, task, split, record index); every valid
record yields exactly one example. Malformed records (missing field, wrong type, empty string, target not among the
options, map_fn returned None) are skipped and counted per seqio task (`data_error_counts()`), or raise at once
with record_policy="fail_fast". Registration builds no dataset: split sizes come from the source's declared counts.

Example (a TFDS dataset with 3 templates, as tasks/flan2021 does)::

    from flan_jax.data import registry
    from flan_jax.data.sources import TfdsSource
    from flan_jax.data.templates import Template

    LABELS = ["yes", "no"]
    registry.register_task(
        "rte",
        TfdsSource("super_glue/rte", {"train": "train", "validation": "validation"},
                   map_fn=lambda r: {"premise": r["premise"], "hypothesis": r["hypothesis"],
                                     "answer": LABELS[r["label"]]},
                   num_examples={"train": 2490, "validation": 277}),
        templates=[Template("{premise}\\nDoes this mean that \\"{hypothesis}\\" is true?", "{answer}"),
                   Template("Premise: {premise}\\nHypothesis: {hypothesis}\\nDoes the premise entail it?", "{answer}"),
                   Template("{premise}\\n\\nQuestion: is \\"{hypothesis}\\" true?", "{answer}")],
        fields=["premise", "hypothesis", "answer"],
        fixed_options=LABELS,             # or options_field="options" when each record carries its own list
        cluster="nli", collection="flan2021",
        max_examples=30_000)              # FLAN 2021 train cap
    # -> ["rte_zs_opt", "rte_zs_noopt", "rte_fs_opt", "rte_fs_noopt"]

Chat `messages` records register with `register_chat_task(name, source)`: one example per assistant turn
(`flan_jax.data.sources.chat`).

`task_info("rte_zs_opt")` then gives base task, variant, cluster, has_options, ...; `list_tasks("flan2021")` lists
the registered seqio task names; mixtures are built with `flan_jax.data.mixing`.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterator, Mapping, Sequence

import seqio

from flan_jax.data import render as rendered_source, templates as tpl
from flan_jax.data.spec import TaskInfo, TaskSpec  # noqa: F401  (part of this module's API)
from flan_jax.data import metrics
from flan_jax.data.sources import MalformedRecordError, RecordSource, check_record
from flan_jax.data.sources import chat
import os

VARIANTS = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt", "cot", "inv")
RECORD_POLICIES = ("skip_and_count", "fail_fast")
OPTIONS_STYLES = ("default", "random")
COT_TARGET = "{%s} So the answer is %s."

def _default_vocabulary() -> seqio.Vocabulary:
    """ByteVocabulary, or the SentencePiece model named by FLAN_JAX_VOCAB (e.g. the T5 vocabulary
    gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model, 100 extra ids) for real runs. seqio loads the
    model lazily, so registration stays cheap."""
    path = os.environ.get("FLAN_JAX_VOCAB")
    return seqio.SentencePieceVocabulary(path, extra_ids=100) if path else seqio.ByteVocabulary()


DEFAULT_VOCABULARY = _default_vocabulary()


_SPECS: dict[str, TaskSpec] = {}
_INFOS: dict[str, TaskInfo] = {}


# Rendering lives in render.py; these names stay reachable here, where task authors and tools look for them.
RENDER_VERSION = rendered_source.RENDER_VERSION
normalize_record = rendered_source.normalize_record
example_rng = rendered_source.example_rng
variant_templates = rendered_source.variant_templates
render_example = rendered_source.render_example
exemplar_pool = rendered_source.exemplar_pool
render_record = rendered_source.render_record
iter_examples = rendered_source.iter_examples
data_error_counts = rendered_source.data_error_counts
restore_data_error_counts = rendered_source.restore_data_error_counts
reset_data_error_counts = rendered_source.reset_data_error_counts


def datasets_built() -> int:
    """How many registry datasets have been built in this process (registration alone builds none)."""
    return rendered_source.datasets_built()


def _available_variants(spec: TaskSpec) -> list[str]:
    variants = ["zs_opt", "zs_noopt", "fs_opt", "fs_noopt"] if spec.has_options else ["zs_noopt", "fs_noopt"]
    return variants + ["cot"] * bool(spec.cot_templates) + ["inv"] * bool(spec.inversion_templates)


def _metric_fns(spec: TaskSpec, variant: str) -> tuple[list[Callable], Callable]:
    if variant == "cot":
        return [metrics.exact_match], tpl.cot_postprocessor
    if spec.has_options and variant != "inv":
        return [metrics.accuracy], metrics.text_postprocessor
    return list(spec.metric_fns or [metrics.exact_match]), metrics.text_postprocessor


def _normalize_caps(name: str, max_examples: int | Mapping[str, int] | None, splits: Sequence[str]) -> dict:
    if max_examples is None:
        return {}
    caps = {"train": max_examples} if isinstance(max_examples, int) else dict(max_examples)
    for split, cap in caps.items():
        if split not in splits or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"task {name!r}: max_examples[{split!r}]={cap!r} invalid (splits: {list(splits)})")
    return caps


def register_task(
    name: str,
    source: RecordSource,
    templates: Sequence[tpl.Template],
    *,
    fields: Sequence[str],
    cluster: str,
    collection: str = "default",
    options_field: str | None = None,
    fixed_options: Sequence[str] | None = None,
    options_style: str = "default",
    rationale_field: str | None = None,
    cot_templates: Sequence[tpl.Template] | None = None,
    inversion_templates: Sequence[tpl.Template] = (),
    few_shot: tpl.FewShotConfig = tpl.FewShotConfig(),
    variants: Sequence[str] | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    record_policy: str = "skip_and_count",
    seed: int = 0,
    max_examples: int | Mapping[str, int] | None = None,
    metric_fns: Sequence[Callable] | None = None,
    shuffle_buffer_size: int | None = 1000,
) -> list[str]:
    """Registers seqio Tasks `<name>_<variant>` for every applicable variant; returns their names.

    Args:
      name: base task name (letters, digits, underscores).
      source: a `flan_jax.data.sources.RecordSource` (declare num_examples so mixing rates work without a build).
      templates: `Template`s over `fields`; for option tasks the rendered target must be one of the options.
      fields: the str fields every record provides (templates are validated against them).
      cluster / collection: grouping for held-out evaluation and `list_tasks(collection)`.
      options_field: record field holding that record's option list; or `fixed_options` for one shared list.
      options_style: "default" ("OPTIONS:\\n- a\\n- b") or "random" (header/markers/end drawn per example; letter
        and number markers make the target the marker and the "options" feature the markers).
      rationale_field: record field with a chain-of-thought rationale -> adds the `cot` variant.
      cot_templates: defaults to each template's input + a CoT instruction, target "<rationale> So the answer is ...".
      inversion_templates: templates over the same fields that invert the task -> adds the `inv` variant.
      few_shot: exemplar count, length budget and formats for fs_* variants.
      variants: restrict to a subset of the applicable variants.
      vocabulary: for "inputs"/"targets" (default seqio.ByteVocabulary(); pass a SentencePiece one for real runs).
      record_policy: "skip_and_count" (default) or "fail_fast".
      seed: template/exemplar choice seed.
      max_examples: cap on records read per split (int = train only; e.g. 30_000 for FLAN 2021).
      metric_fns: metric functions for generative variants (default exact_match); option variants use accuracy.
    """
    _check_arguments(name, source, record_policy, options_style, options_field, fixed_options)
    fields = tuple(fields)
    spec = TaskSpec(
        name=name, source=source, templates=tuple(templates), fields=fields, cluster=cluster, collection=collection,
        options_field=options_field, fixed_options=tuple(fixed_options) if fixed_options is not None else None,
        options_style=options_style, rationale_field=rationale_field,
        cot_templates=_cot_templates(name, templates, fields, rationale_field, cot_templates),
        inversion_templates=tuple(inversion_templates), few_shot=few_shot,
        vocabulary=vocabulary or DEFAULT_VOCABULARY, record_policy=record_policy, seed=seed,
        max_examples=_normalize_caps(name, max_examples, source.splits),
        metric_fns=tuple(metric_fns) if metric_fns else None)
    tpl.validate_templates(name, list(templates), fields)
    if inversion_templates:
        tpl.validate_templates(name, list(inversion_templates), fields, kind="inversion template")
    available = _available_variants(spec)
    chosen = list(variants) if variants is not None else available
    for variant in chosen:
        if variant not in available:
            raise ValueError(f"task {name!r}: variant {variant!r} not available (available: {available})")
    unregister_task(name)
    _SPECS[name] = spec
    return [_add_variant(spec, variant, shuffle_buffer_size) for variant in chosen]


# The whole rendered conversation is the inputs and the assistant turn the target (sources/chat.py says why).
CHAT_TEMPLATE = tpl.Template("{%s}" % chat.CONVERSATION_FIELD, "{%s}" % chat.REPLY_FIELD, name="chat")


def register_chat_task(name: str, source: RecordSource, *, messages_field: str = "messages", cluster: str = "chat",
                       **kwargs) -> list[str]:
    """Registers a source of chat `messages` records: one example per assistant turn, inputs the conversation so
    far in the chat format of `flan_jax.data.sources.chat`, target that turn (so a decoder's loss falls on
    assistant text only). Only the zero-shot variant by default (`<name>_zs_noopt`); other `register_task` keyword
    arguments pass through. Malformed conversations are skipped and counted with their reason."""
    kwargs.setdefault("variants", ["zs_noopt"])
    return register_task(name, chat.ChatTurnsSource(source, messages_field), [CHAT_TEMPLATE],
                         fields=[chat.CONVERSATION_FIELD, chat.REPLY_FIELD], cluster=cluster, **kwargs)


def _check_arguments(name, source, record_policy, options_style, options_field, fixed_options) -> None:
    bad_fixed = fixed_options is not None and (len(fixed_options) < 2 or not all(
        isinstance(o, str) and o.strip() for o in fixed_options))
    for failed, problem in (
            (not name or not name.replace("_", "").isalnum(), "use letters, digits and underscores in task names"),
            (record_policy not in RECORD_POLICIES, f"record_policy {record_policy!r} not in {RECORD_POLICIES}"),
            (options_style not in OPTIONS_STYLES, f"options_style {options_style!r} not in {OPTIONS_STYLES}"),
            (options_field is not None and fixed_options is not None, "give options_field or fixed_options, not both"),
            (bad_fixed, f"fixed_options must be >= 2 non-empty strings, got {fixed_options!r}"),
            (not isinstance(source, RecordSource), f"source must be a RecordSource, got {type(source).__name__}")):
        if failed:
            raise ValueError(f"task {name!r}: {problem}")


def _cot_templates(name, templates, fields, rationale_field, cot_templates) -> tuple:
    """The cot variant's templates: given ones, or each template's input + a CoT instruction (none without a
    rationale field)."""
    if cot_templates is not None and rationale_field is None:
        raise ValueError(f"task {name!r}: cot_templates need a rationale_field")
    if rationale_field is None:
        return ()
    cot = tuple(cot_templates) if cot_templates is not None else tuple(
        tpl.Template(f"{t.input}\n\n{tpl.COT_INSTRUCTIONS[i % len(tpl.COT_INSTRUCTIONS)]}",
                     COT_TARGET % (rationale_field, t.target)) for i, t in enumerate(templates))
    tpl.validate_templates(name, list(cot), tuple(fields) + (rationale_field,), kind="cot template")
    return cot


def _add_variant(spec: TaskSpec, variant: str, shuffle_buffer_size: int | None) -> str:
    """Adds the seqio Task `<base>_<variant>` of a validated spec (replacing one of that name); returns its name."""
    task_name = f"{spec.name}_{variant}"
    fns, postprocess = _metric_fns(spec, variant)
    if task_name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(task_name)
    output_features = {key: seqio.Feature(vocabulary=spec.vocabulary, add_eos=True) for key in ("inputs", "targets")}
    seqio.TaskRegistry.add(
        task_name, source=rendered_source.RenderedSource(spec, variant), output_features=output_features,
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=postprocess, metric_fns=fns, shuffle_buffer_size=shuffle_buffer_size)
    source = spec.source
    _INFOS[task_name] = TaskInfo(
        name=task_name, base_task=spec.name, variant=variant, cluster=spec.cluster, collection=spec.collection,
        has_options=spec.has_options and variant not in ("cot", "inv"),
        num_templates=len(variant_templates(spec, variant)), splits=source.splits,
        num_examples={s: spec.num_examples(s) for s in source.splits},
        metric=",".join(getattr(f, "__name__", "metric") for f in fns), source=source.describe())
    return task_name


def unregister_task(name: str) -> None:
    """Removes a base task and all its variants (re-registration replaces them)."""
    spec = _SPECS.pop(name, None)
    if spec is None:
        return
    for task_name in [n for n, info in _INFOS.items() if info.base_task == name]:
        del _INFOS[task_name]
        if task_name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(task_name)
    rendered_source.forget_exemplar_pools(name)


def task_info(task_name: str) -> TaskInfo:
    """TaskInfo of a registered seqio task name such as "parity_zs_opt"."""
    try:
        return _INFOS[task_name]
    except KeyError:
        raise KeyError(f"no flan_jax task named {task_name!r} (registered: {len(_INFOS)}; did you import flan_jax.tasks or pass --module?)") \
            from None


def task_spec(base_task: str) -> TaskSpec:
    try:
        return _SPECS[base_task]
    except KeyError:
        raise KeyError(f"no flan_jax base task named {base_task!r}") from None


def list_tasks(collection: str | None = None, *, cluster: str | None = None,
               variant: str | None = None) -> list[str]:
    """Sorted seqio task names registered through this module, optionally filtered."""
    return sorted(n for n, info in _INFOS.items()
                  if (collection is None or info.collection == collection)
                  and (cluster is None or info.cluster == cluster)
                  and (variant is None or info.variant == variant))


def list_base_tasks(collection: str | None = None) -> list[str]:
    return sorted(n for n, spec in _SPECS.items() if collection is None or spec.collection == collection)


# --- collections registered on demand (NIv2, T0, ...): what a registration produced, for the library to ask ------
_COLLECTIONS: dict[str, Any] = {}


def record_collection(name: str, registration: Any) -> None:
    """Called by a collection's register(): the registration result (its task names, diagnostics) under `name`."""
    _COLLECTIONS[name] = registration


def collection_registration(name: str) -> Any:
    """What the last registration of collection `name` produced (e.g. "niv2": its base tasks), or None."""
    return _COLLECTIONS.get(name)


def suggest_names(name: str, limit: int = 3) -> list[str]:
    """Registered seqio task and mixture names closest to `name` (for "did you mean" in errors). A base task or
    a variant its task does not have (a task without options has no `_opt` variants) suggests the variants it has."""
    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    base = next((b for b in sorted(_SPECS, key=len, reverse=True) if name == b or name.startswith(b + "_")), None)
    if base is not None:
        variants = [n for n, info in _INFOS.items() if info.base_task == base]
        return difflib.get_close_matches(name, variants, n=limit, cutoff=0.0)
    return difflib.get_close_matches(name, names, n=limit, cutoff=0.6)


def did_you_mean(name: str) -> str:
    """' (did you mean 'a' or 'b'?)' for an unknown task or mixture name, or ''."""
    close = suggest_names(name)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
