"""Super-NaturalInstructions tasks from a local clone (`register(niv2_dir)`, or $FLAN_JAX_NIV2_DIR on import).

Per NIv2 task `<task>` (from splits/default/{train,test}_tasks.txt):
  niv2_<task>_{zs_noopt,fs_noopt}   FLAN-style: our instruction templates over (definition, input); few-shot
                                    exemplars from the task's own instances. Train reads at most 5k (Flan 2022 cap).
  niv2tk_<task>_zs_noopt            Tk-Instruct encoding (default "def_pos2": definition + 2 positive examples);
                                    train reads at most 100 instances per task (Tk-Instruct's default).
Split "test" is the first 100 instances. Cluster = the task's first category. Metrics: exact match and ROUGE-L
(x100, max over the task's references in `flan_jax.data.sources.niv2.score`; the seqio metrics see the first reference).
Mixtures: niv2_train / niv2_eval (FLAN-style), niv2tk_train / niv2tk_eval (Tk-Instruct style; eval on "test").
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

from flan_jax.data import mixing, registry
from flan_jax.data.sources import niv2
from flan_jax.data.templates import FewShotConfig, Template as T

COLLECTION = "niv2"
ENV_NIV2_DIR = "FLAN_JAX_NIV2_DIR"
FLAN_TRAIN_CAP = mixing.FLAN2022_EXAMPLE_CAPS["niv2"]
TK_TRAIN_CAP = 100
FEW_SHOT = FewShotConfig(num_exemplars=2, max_input_length=2048)

FLAN_TEMPLATES = (
    T("{definition}\n\n{input}", "{output}"),
    T("Task: {definition}\n\nInput: {input}\nOutput:", "{output}"),
    T("Instructions: {definition}\n\n{input}\n\nAnswer:", "{output}"),
    T("{input}\n\nFollow the instruction below for the text above.\n{definition}", "{output}"),
    T("Read the task description and solve the example.\n\nDescription: {definition}\nExample: {input}",
      "{output}"),
    T("Here is what you need to do: {definition}\n\n{input}\nResponse:", "{output}"),
    T("Definition: {definition}\n\nNow solve this instance: {input}", "{output}"),
    T("{definition}\nQ: {input}\nA:", "{output}"),
)
TK_TEMPLATE = T("{encoded}", "{output}")
FIELDS = ("definition", "input", "output")


def _exact_match(targets, predictions):
    return {"exact_match": niv2.score([str(p) for p in predictions], [[str(t)] for t in targets])["exact_match"]}


def _rouge_l(targets, predictions):
    return {"rouge_l": niv2.score([str(p) for p in predictions], [[str(t)] for t in targets])["rouge_l"]}


METRICS = (_exact_match, _rouge_l)


@dataclasses.dataclass
class Registration:
    train_tasks: list[str]
    test_tasks: list[str]
    missing: list[tuple[str, str]]          # (task, reason): listed in split files but unusable
    base_tasks: dict[str, tuple[str, str]]  # NIv2 task -> (flan base task, tk base task)


LAST_REGISTRATION: Registration | None = None


def base_name(task: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", task.lower()).strip("_")


def register(niv2_dir: str, *, encoding: str = "def_pos2", split_dir: str = "default", seed: int = 0,
             tasks: Sequence[str] | None = None) -> Registration:
    """Registers the FLAN-style and Tk-Instruct-style tasks of the split files and the NIv2 mixtures."""
    global LAST_REGISTRATION
    niv2.Encoding.parse(encoding)  # fail early on a bad encoding name
    train = niv2.read_split(niv2_dir, "train", split_dir)
    test = niv2.read_split(niv2_dir, "test", split_dir)
    if tasks is not None:
        train, test = [t for t in train if t in tasks], [t for t in test if t in tasks]
    result = Registration(train, test, [], {})
    for task in dict.fromkeys(train + test):
        try:
            num, category = niv2.task_summary(niv2_dir, task)
            category = re.sub(r"\W+", "_", category.strip().lower())
        except niv2.NIv2Error as e:
            result.missing.append((task, str(e)))
            continue
        if num == 0:
            result.missing.append((task, "no instances"))
            continue
        name = base_name(task)
        registry.register_task(
            f"niv2_{name}", niv2.NIv2Source(niv2_dir, task, num_instances=num), list(FLAN_TEMPLATES),
            fields=FIELDS, cluster=category, collection=COLLECTION, few_shot=FEW_SHOT, seed=seed,
            max_examples={"train": FLAN_TRAIN_CAP}, metric_fns=list(METRICS))
        registry.register_task(
            f"niv2tk_{name}", niv2.NIv2Source(niv2_dir, task, encoding=encoding, num_instances=num), [TK_TEMPLATE],
            fields=("encoded", "output"), cluster=category, collection=COLLECTION, variants=["zs_noopt"],
            seed=seed, max_examples={"train": TK_TRAIN_CAP}, metric_fns=list(METRICS))
        result.base_tasks[task] = (f"niv2_{name}", f"niv2tk_{name}")
    _register_mixtures(result)
    LAST_REGISTRATION = result
    registry.record_collection("niv2", result)
    return result


def _register_mixtures(result: Registration) -> None:
    train = [result.base_tasks[t] for t in result.train_tasks if t in result.base_tasks]
    test = [result.base_tasks[t] for t in result.test_tasks if t in result.base_tasks]
    if train:
        flan_rates = {}
        for flan, _ in train:
            n = registry.task_spec(flan).num_examples("train")
            flan_rates[f"{flan}_zs_noopt"] = flan_rates[f"{flan}_fs_noopt"] = n / 2
        mixing.register_mixture("niv2_train", flan_rates)
        mixing.register_mixture("niv2tk_train", {f"{tk}_zs_noopt": registry.task_spec(tk).num_examples("train")
                                                 for _, tk in train})
    if test:
        mixing.register_mixture("niv2_eval", {f"{flan}_zs_noopt": 1.0 for flan, _ in test})
        mixing.register_mixture("niv2tk_eval", {f"{tk}_zs_noopt": 1.0 for _, tk in test})


def register_from_env() -> Registration | None:
    directory = os.environ.get(ENV_NIV2_DIR)
    return register(directory) if directory else None


register_from_env()
