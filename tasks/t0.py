"""T0 / P3: one task per (dataset, promptsource template), T0's training and held-out evaluation mixtures.

Registration needs a promptsource templates folder: `register(promptsource_dir, data_dir=None)`, or the environment
variable FLAN_JAX_PROMPTSOURCE_DIR (and FLAN_JAX_T0_DATA_DIR) when this module is imported, or
`flan-jax data list --collection t0 --promptsource-dir DIR`. Importing this module alone registers nothing.

Data for each dataset comes from, in order of preference:
  1. `<data_dir>/<name>/<split>.jsonl`: an HF-datasets export in the dataset's own schema (what the templates were
     written against), e.g. `load_dataset("super_glue", "rte")["train"].to_json(".../super_glue_rte/train.jsonl")`;
  2. TFDS, where the dataset exists there, with a small adapter from the TFDS schema to the HF one.
Datasets with neither, templates that fail to compile or that read fields the source does not provide, and
non-original-task templates are reported by `register()` (`Diagnostics`) and `flan-jax data list`, never dropped
silently.

Tasks: `t0_<dataset>_<template>` base tasks with variants zs_noopt (T0's own prompts; the "options" feature holds the
answer choices for rank classification) and, for flan2022, zs_opt / fs_opt / fs_noopt.
Mixtures:
  t0_train     T0's training datasets, T0 rates (a dataset over 500k examples counts 500000 / num_templates)
  t0sf_train   the same without the datasets that are also in FLAN 2021 ("T0 sans Flan", Flan 2022's T0-SF)
  t0_eval      the held-out datasets (ANLI R1-R3, CB, RTE, WSC, Winogrande, COPA, StoryCloze, HellaSwag, WiC), every
               template, rate 1 each, scored by rank classification on the validation split
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Mapping, Sequence

from flan_jax.data import mixing, registry
from flan_jax.data.sources import RecordSource, TfdsSource
from flan_jax.data.sources.files import JsonlSource
from flan_jax.data.sources.promptsource import (CompiledTemplate, PromptsourceSource, TemplateLoadError,
                                           read_templates_dir)
from flan_jax.data.templates import Template

COLLECTION = "t0"
ENV_PROMPTSOURCE_DIR = "FLAN_JAX_PROMPTSOURCE_DIR"
ENV_DATA_DIR = "FLAN_JAX_T0_DATA_DIR"
TRAIN_MIXTURE, SANS_FLAN_MIXTURE, EVAL_MIXTURE = "t0_train", "t0sf_train", "t0_eval"
PROMPT_TEMPLATE = Template("{prompt}", "{target}", name="promptsource")


@dataclasses.dataclass(frozen=True)
class T0Dataset:
    """A P3 dataset: its promptsource templates key, role, and (optionally) a TFDS source with an HF-schema adapter."""

    name: str                               # our name; also the JSONL export folder
    templates_key: str                      # promptsource "<dataset>[/<subset>]"
    role: str                               # "train" or "eval"
    cluster: str
    num_examples: Mapping[str, int]         # HF split sizes (train / validation)
    tfds_name: str | None = None
    tfds_splits: Mapping[str, str] | None = None
    adapter: Callable[[dict], dict | None] | None = None   # TFDS record -> HF record
    fields: tuple[str, ...] | None = None    # HF fields the TFDS adapter provides
    in_flan2021: bool = False


def _identity(fields):
    return lambda r: {k: r[k] for k in fields}


def _anli(r):
    return {"premise": r["context"], "hypothesis": r["hypothesis"], "label": r["label"], "uid": r["uid"]}


def _winogrande(r):
    return {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["label"] + 1)}


def _hellaswag(r):
    return {"ctx": r["context"], "ctx_a": r["context"], "ctx_b": "", "endings": r["endings"],
            "label": str(r["label"]), "activity_label": r["activity_label"]}


def _story_cloze(r):
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", r["context"].strip()) if s]
    sentences = (sentences[:3] + [" ".join(sentences[3:])]) if len(sentences) > 4 else sentences
    sentences += [""] * (4 - len(sentences))
    endings = r["endings"]
    if len(endings) < 2:
        return None
    endings = endings[:2]
    record = {f"input_sentence_{i + 1}": s for i, s in enumerate(sentences)}
    record.update(sentence_quiz1=endings[0], sentence_quiz2=endings[1], answer_right_ending=r["label"] + 1)
    return record


def _ag_news(r):
    return {"text": f"{r['title']} {r['description']}".strip(), "label": r["label"]}


def _trec(r):
    return {"text": r["text"], "label_coarse": r["label-coarse"], "label_fine": r["label-fine"]}


def _imdb(r):
    return {"text": r["text"], "label": r["label"]}


_TV = {"train": "train", "validation": "validation"}
_TT = {"train": "train", "validation": "test"}


def _tfds(name, tfds_name, key, role, cluster, counts, fields, adapter=None, splits=_TV, flan=False):
    return T0Dataset(name, key, role, cluster, counts, tfds_name, splits, adapter or _identity(fields),
                     tuple(fields), flan)


def _local(name, key, cluster, counts, flan=False):
    return T0Dataset(name, key, "train", cluster, counts, in_flan2021=flan)


_NLI = ("premise", "hypothesis", "label")
DATASETS = [
    # --- training: multiple-choice QA
    _local("commonsense_qa", "commonsense_qa", "multiple_choice_qa", {"train": 9_741, "validation": 1_221}),
    _local("dream", "dream", "multiple_choice_qa", {"train": 6_116, "validation": 2_040}),
    _local("quail", "quail", "multiple_choice_qa", {"train": 10_246, "validation": 2_164}),
    _local("quartz", "quartz", "multiple_choice_qa", {"train": 2_696, "validation": 384}),
    _local("social_i_qa", "social_i_qa", "multiple_choice_qa", {"train": 33_410, "validation": 1_954}),
    _local("wiqa", "wiqa", "multiple_choice_qa", {"train": 29_808, "validation": 6_894}),
    _tfds("cosmos_qa", "cosmos_qa", "cosmos_qa", "train", "multiple_choice_qa", {"train": 25_262, "validation": 2_985},
          ("id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label"), flan=True),
    _tfds("qasc", "qasc", "qasc", "train", "multiple_choice_qa", {"train": 8_134, "validation": 926},
          ("id", "question", "choices", "answerKey", "fact1", "fact2", "combinedfact", "formatted_question")),
    _local("quarel", "quarel", "multiple_choice_qa", {"train": 1_941, "validation": 278}),
    _local("sciq", "sciq", "multiple_choice_qa", {"train": 11_679, "validation": 1_000}),
    _local("wiki_hop_original", "wiki_hop/original", "multiple_choice_qa", {"train": 43_738, "validation": 5_129}),
    # --- extractive QA
    _local("adversarial_qa_dbidaf", "adversarial_qa/dbidaf", "extractive_qa", {"train": 10_000, "validation": 1_000}),
    _local("adversarial_qa_dbert", "adversarial_qa/dbert", "extractive_qa", {"train": 10_000, "validation": 1_000}),
    _local("adversarial_qa_droberta", "adversarial_qa/droberta", "extractive_qa",
           {"train": 10_000, "validation": 1_000}),
    _local("quoref", "quoref", "extractive_qa", {"train": 19_399, "validation": 2_418}),
    _local("ropes", "ropes", "extractive_qa", {"train": 10_924, "validation": 1_688}),
    _local("duorc_selfrc", "duorc/SelfRC", "extractive_qa", {"train": 60_721, "validation": 12_961}),
    _local("duorc_paraphraserc", "duorc/ParaphraseRC", "extractive_qa", {"train": 69_524, "validation": 15_591}),
    # --- closed-book QA
    _local("kilt_tasks_hotpotqa", "kilt_tasks/hotpotqa", "closed_book_qa", {"train": 88_869, "validation": 5_600}),
    _local("wiki_qa", "wiki_qa", "closed_book_qa", {"train": 20_360, "validation": 2_733}),
    # --- structure to text
    _local("common_gen", "common_gen", "struct_to_text", {"train": 67_389, "validation": 4_018}, flan=True),
    _tfds("wiki_bio", "wiki_bio", "wiki_bio", "train", "struct_to_text", {"train": 582_659, "validation": 72_831},
          ("input_text", "target_text")),
    # --- sentiment
    _local("amazon_polarity", "amazon_polarity", "sentiment", {"train": 3_600_000, "test": 400_000}),
    _local("app_reviews", "app_reviews", "sentiment", {"train": 288_065}),
    _tfds("imdb", "imdb_reviews/plain_text", "imdb", "train", "sentiment", {"train": 25_000, "validation": 25_000},
          ("text", "label"), _imdb, _TT, flan=True),
    _local("rotten_tomatoes", "rotten_tomatoes", "sentiment", {"train": 8_530, "validation": 1_066}),
    _local("yelp_review_full", "yelp_review_full", "sentiment", {"train": 650_000, "test": 50_000}, flan=True),
    # --- summarization
    _tfds("cnn_dailymail", "cnn_dailymail", "cnn_dailymail/3.0.0", "train", "summarization",
          {"train": 287_113, "validation": 13_368}, ("article", "highlights", "id"), flan=True),
    _tfds("gigaword", "gigaword", "gigaword", "train", "summarization", {"train": 3_803_957, "validation": 189_651},
          ("document", "summary"), flan=True),
    _tfds("multi_news", "multi_news", "multi_news", "train", "summarization", {"train": 44_972, "validation": 5_622},
          ("document", "summary"), flan=True),
    _tfds("samsum", "samsum", "samsum", "train", "summarization", {"train": 14_732, "validation": 818},
          ("id", "dialogue", "summary"), flan=True),
    _tfds("xsum", "xsum", "xsum", "train", "summarization", {"train": 204_045, "validation": 11_332},
          ("document", "summary"), flan=True),
    # --- topic classification
    _tfds("ag_news", "ag_news_subset", "ag_news", "train", "topic_classification",
          {"train": 120_000, "validation": 7_600}, ("text", "label"), _ag_news, _TT, flan=True),
    _local("dbpedia_14", "dbpedia_14", "topic_classification", {"train": 560_000, "test": 70_000}),
    _tfds("trec", "trec", "trec", "train", "topic_classification", {"train": 5_452, "validation": 500},
          ("text", "label_coarse", "label_fine"), _trec, _TT, flan=True),
    # --- paraphrase identification
    _tfds("glue_mrpc", "glue/mrpc", "glue/mrpc", "train", "paraphrase", {"train": 3_668, "validation": 408},
          ("sentence1", "sentence2", "label", "idx"), flan=True),
    _tfds("glue_qqp", "glue/qqp", "glue/qqp", "train", "paraphrase", {"train": 363_846, "validation": 40_430},
          ("question1", "question2", "label", "idx"), flan=True),
    _tfds("paws_labeled_final", "paws_wiki/labeled_final_tokenized", "paws/labeled_final", "train", "paraphrase",
          {"train": 49_401, "validation": 8_000}, ("sentence1", "sentence2", "label"), flan=True),
    # --- held-out evaluation
    _tfds("anli_r1", "anli/r1", "anli", "eval", "nli", {"train": 16_946, "validation": 1_000}, _NLI + ("uid",), _anli),
    _tfds("anli_r2", "anli/r2", "anli", "eval", "nli", {"train": 45_460, "validation": 1_000}, _NLI + ("uid",), _anli),
    _tfds("anli_r3", "anli/r3", "anli", "eval", "nli", {"train": 100_459, "validation": 1_200}, _NLI + ("uid",),
          _anli),
    _tfds("super_glue_cb", "super_glue/cb", "super_glue/cb", "eval", "nli", {"train": 250, "validation": 56},
          _NLI + ("idx",)),
    _tfds("super_glue_rte", "super_glue/rte", "super_glue/rte", "eval", "nli", {"train": 2_490, "validation": 277},
          _NLI + ("idx",)),
    _tfds("super_glue_wsc_fixed", "super_glue/wsc.fixed", "super_glue/wsc.fixed", "eval", "coreference",
          {"train": 554, "validation": 104},
          ("text", "span1_index", "span1_text", "span2_index", "span2_text", "label", "idx")),
    _tfds("winogrande_xl", "winogrande", "winogrande/winogrande_xl", "eval", "coreference",
          {"train": 40_398, "validation": 1_267}, ("sentence", "option1", "option2", "answer"), _winogrande,
          {"train": "train_xl", "validation": "validation"}),
    _tfds("super_glue_copa", "super_glue/copa", "super_glue/copa", "eval", "sentence_completion",
          {"train": 400, "validation": 100}, ("premise", "choice1", "choice2", "question", "label", "idx")),
    _tfds("story_cloze_2016", "story_cloze/2016", "story_cloze/2016", "eval", "sentence_completion",
          {"validation": 1_871, "test": 1_871},
          tuple(f"input_sentence_{i}" for i in range(1, 5)) + ("sentence_quiz1", "sentence_quiz2",
                                                                "answer_right_ending"),
          _story_cloze, {"validation": "validation", "test": "test"}),
    _tfds("hellaswag", "hellaswag", "hellaswag", "eval", "sentence_completion",
          {"train": 39_905, "validation": 10_042},
          ("ctx", "ctx_a", "ctx_b", "endings", "label", "activity_label"), _hellaswag),
    _tfds("super_glue_wic", "super_glue/wic", "super_glue/wic", "eval", "word_sense",
          {"train": 5_428, "validation": 638},
          ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "label", "idx")),
]
DATASETS_BY_NAME = {d.name: d for d in DATASETS}


@dataclasses.dataclass
class Diagnostics:
    """What registration did: registered base tasks and every template or dataset left out, with the reason."""

    registered: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # dataset -> base task names
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (dataset, template, reason)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)              # dataset -> source description
    datasets: dict[str, T0Dataset] = dataclasses.field(default_factory=dict)       # name -> declaration

    def lines(self) -> list[str]:
        return [f"SKIPPED\t{dataset}\t{template}\t{reason}" for dataset, template, reason in self.skipped]


LAST_DIAGNOSTICS = Diagnostics()


def task_name(dataset: str, template_name: str, taken: set[str]) -> str:
    """`t0_<dataset>_<template>` in lowercase letters, digits and underscores, unique within `taken`."""
    slug = re.sub(r"[^a-z0-9]+", "_", template_name.lower()).strip("_") or "template"
    name = base = f"t0_{dataset}_{slug}"
    suffix = 2
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(name)
    return name


def _first_jsonl_fields(path: str) -> tuple[str, ...] | None:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return tuple(record) if isinstance(record, dict) else None
    return None


def make_source(dataset: T0Dataset, data_dir: str | None) -> tuple[RecordSource | None, str, tuple[str, ...] | None]:
    """(raw HF-schema source, description, fields it provides or None if unknown), or (None, reason, None)."""
    if data_dir:
        folder = os.path.join(data_dir, dataset.name)
        if os.path.isdir(folder):
            files = {s: os.path.join(folder, f"{s}.jsonl") for s in ("train", "validation", "test")}
            files = {s: p for s, p in files.items() if os.path.isfile(p)}
            if files:
                fields = _first_jsonl_fields(next(iter(files.values())))
                return JsonlSource(files, name=dataset.name), f"jsonl:{folder}", fields
    if dataset.tfds_name:
        source = TfdsSource(dataset.tfds_name, dataset.tfds_splits, dataset.adapter,
                            {s: n for s, n in dataset.num_examples.items() if s in dataset.tfds_splits})
        return source, f"tfds:{dataset.tfds_name}", dataset.fields
    where = f"{os.path.join(data_dir, dataset.name)}/<split>.jsonl" if data_dir else \
        f"<data_dir>/{dataset.name}/<split>.jsonl (set --t0-data-dir or ${ENV_DATA_DIR})"
    return None, f"no TFDS builder for {dataset.templates_key}; export the HF dataset to {where}", None


def register(promptsource_dir: str, data_dir: str | None = None, *, original_task_only: bool = True,
             datasets: Sequence[str | T0Dataset] | None = None, seed: int = 0) -> Diagnostics:
    """Registers one task per (dataset, template) and the T0 mixtures; returns what was registered or skipped.

    `datasets`: names from `DATASETS` or extra `T0Dataset`s (default: all of `DATASETS`).
    """
    global LAST_DIAGNOSTICS
    diagnostics = Diagnostics()
    by_key = {}
    for file in read_templates_dir(promptsource_dir):
        if file.error:
            diagnostics.skipped.append((file.key, "*", f"unreadable templates.yaml: {file.error}"))
        by_key[file.key] = file
    taken: set[str] = set()
    chosen = [DATASETS_BY_NAME[d] if isinstance(d, str) else d for d in datasets] if datasets else DATASETS
    diagnostics.datasets = {d.name: d for d in chosen}
    for dataset in chosen:
        file = by_key.get(dataset.templates_key)
        if file is None or (not file.templates and not file.error):
            diagnostics.skipped.append((dataset.name, "*", f"no templates.yaml for {dataset.templates_key} "
                                                           f"under {promptsource_dir}"))
            continue
        base, where, fields = make_source(dataset, data_dir)
        if base is None:
            diagnostics.skipped.extend((dataset.name, t.name, where) for t in file.templates)
            continue
        diagnostics.sources[dataset.name] = where
        for template in file.templates:
            if original_task_only and template.original_task is not True:
                diagnostics.skipped.append((dataset.name, template.name, "not an original-task template"))
                continue
            try:
                compiled = CompiledTemplate(template)
            except TemplateLoadError as e:
                diagnostics.skipped.append((dataset.name, template.name, f"does not compile: {e}"))
                continue
            missing = compiled.missing_fields(fields) if fields is not None else []
            if missing:
                diagnostics.skipped.append((dataset.name, template.name,
                                            f"reads fields {missing} that {where} does not provide"))
                continue
            name = task_name(dataset.name, template.name, taken)
            source = PromptsourceSource(base, compiled, seed=seed)
            registry.register_task(
                name, source, [PROMPT_TEMPLATE], fields=("prompt", "target"), cluster=dataset.cluster,
                collection=COLLECTION, options_field="options" if compiled.has_choices else None, seed=seed)
            diagnostics.registered.setdefault(dataset.name, []).append(name)
    _register_mixtures(diagnostics)
    LAST_DIAGNOSTICS = diagnostics
    registry.record_collection("t0", diagnostics)
    return diagnostics


def train_rates(dataset_tasks: Mapping[str, list[str]]) -> dict[str, float]:
    """T0 rates for the zs_noopt task of every template (dataset size, or 500k / num_templates above 500k)."""
    counts, num_templates = {}, {}
    for names in dataset_tasks.values():
        n = registry.task_spec(names[0]).num_examples("train")
        for name in names:
            counts[f"{name}_zs_noopt"] = n
            num_templates[f"{name}_zs_noopt"] = len(names)
    return mixing.t0_rates(counts, num_templates) if counts else {}


def _register_mixtures(diagnostics: Diagnostics) -> None:
    declared = diagnostics.datasets
    train = {d: n for d, n in diagnostics.registered.items()
             if declared[d].role == "train" and registry.task_spec(n[0]).num_examples("train")}
    for mixture, members in ((TRAIN_MIXTURE, train),
                             (SANS_FLAN_MIXTURE, {d: n for d, n in train.items() if not declared[d].in_flan2021})):
        if members:
            mixing.register_mixture(mixture, train_rates(members))
    evals = {f"{name}_zs_noopt": 1.0 for d, names in diagnostics.registered.items()
             if declared[d].role == "eval" for name in names}
    if evals:
        mixing.register_mixture(EVAL_MIXTURE, evals)


def register_from_env() -> Diagnostics | None:
    directory = os.environ.get(ENV_PROMPTSOURCE_DIR)
    return register(directory, os.environ.get(ENV_DATA_DIR) or None) if directory else None


register_from_env()
