"""Commonsense: PIQA, COPA (HellaSwag and StoryCloze are left out: HellaSwag's TFDS label is a plain int that
mock data cannot fill validly, StoryCloze needs a manual download)."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import Flan2021Dataset, label_name

CLUSTER = "commonsense"
_TV = {"train": "train", "validation": "validation"}

GOAL_SOLUTION = (
    T("Goal: {goal}\n\nWhich way of doing it makes more sense?", "{answer}"),
    T("How would you {goal_lower}", "{answer}"),
    T("{goal}\n\nPick the more sensible method.", "{answer}"),
    T("I want to do this: {goal}\nWhat should I do?", "{answer}"),
    T("Choose the solution that would actually work.\nTask: {goal}", "{answer}"),
    T("Here is a practical goal: {goal}\nWhich approach achieves it?", "{answer}"),
    T("Using everyday physical knowledge, how can one accomplish this: {goal}", "{answer}"),
    T("Objective: {goal}\nBest solution:", "{answer}"),
)
GOAL_SOLUTION_INVERSIONS = (
    T("Here is a way to do something: {answer}\nWhat goal does it accomplish?", "{goal}"),
    T("Solution: {answer}\nWrite the goal this solution is for.", "{goal}"),
)

CAUSE_EFFECT = (
    T("{premise}\n\nWhat was the {question} of this?", "{answer}"),
    T("Premise: {premise}\nWhat is the most likely {question}?", "{answer}"),
    T("Here is a situation: {premise}\nPick the more plausible {question}.", "{answer}"),
    T("{premise} Which of the following is the {question}?", "{answer}"),
    T("Consider this event: \"{premise}\"\nWhat {question} is more believable?", "{answer}"),
    T("Event: {premise}\nQuestion: which option is its {question}?", "{answer}"),
    T("Think about everyday life. {premise}\nWhat {question} fits best?", "{answer}"),
    T("Choose the better {question} for the following statement.\n{premise}", "{answer}"),
)
CAUSE_EFFECT_INVERSIONS = (
    T("Write an event whose {question} could be: {answer}", "{premise}"),
)


def _piqa(r):
    options = [r["sol1"], r["sol2"]]
    answer = label_name(options, r.get("label"))
    goal = r["goal"]
    return None if answer is None else {"goal": goal, "goal_lower": goal[:1].lower() + goal[1:], "answer": answer,
                                        "options": options}


def _copa(r):
    options = [r["choice1"], r["choice2"]]
    answer = label_name(options, r.get("label"))
    question = {"cause": "cause", "effect": "effect"}.get(r.get("question"), r.get("question"))
    return None if answer is None else {"premise": r["premise"], "question": question, "answer": answer,
                                        "options": options}


DATASETS = [
    Flan2021Dataset("piqa", "piqa", CLUSTER, _TV, {"train": 16_113, "validation": 1_838}, _piqa,
                    ("goal", "goal_lower", "answer"), GOAL_SOLUTION, GOAL_SOLUTION_INVERSIONS,
                    options_field="options"),
    Flan2021Dataset("copa", "super_glue/copa", CLUSTER, _TV, {"train": 400, "validation": 100}, _copa,
                    ("premise", "question", "answer"), CAUSE_EFFECT, CAUSE_EFFECT_INVERSIONS,
                    options_field="options"),
]
