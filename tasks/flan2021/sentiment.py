"""Sentiment: IMDB reviews, Yelp polarity, SST-2."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import Flan2021Dataset, label_name

CLUSTER = "sentiment"
POLARITY = ("negative", "positive")

REVIEW_POLARITY = (
    T("{text}\n\nIs this review positive or negative?", "{answer}"),
    T("Review: {text}\nHow does the reviewer feel overall?", "{answer}"),
    T("What is the sentiment of the following text?\n\n{text}", "{answer}"),
    T("{text}\n\nDid the writer like it or not? Answer positive or negative.", "{answer}"),
    T("Read the review below and label its tone.\n{text}", "{answer}"),
    T("Here is what someone wrote: \"{text}\"\nWould you call that a positive or a negative opinion?", "{answer}"),
    T("Classify the sentiment.\nText: {text}\nSentiment:", "{answer}"),
    T("{text}\n\nWas this written by a happy customer or an unhappy one? Say positive or negative.", "{answer}"),
    T("Is the attitude in this passage favourable or unfavourable?\n\n{text}", "{answer}"),
)
REVIEW_POLARITY_INVERSIONS = (
    T("Write a {answer} review.", "{text}"),
    T("Compose a short piece of writing with a {answer} tone.", "{text}"),
    T("Sentiment: {answer}\nWrite a text that expresses it:", "{text}"),
)


def _polarity(text_key, labels=POLARITY):
    def map_fn(r):
        answer = label_name(labels, r.get("label"))
        return None if answer is None else {"text": r[text_key], "answer": answer}
    return map_fn


_FIELDS = ("text", "answer")

DATASETS = [
    Flan2021Dataset("imdb_reviews", "imdb_reviews/plain_text", CLUSTER, {"train": "train", "validation": "test"},
                    {"train": 25_000, "validation": 25_000}, _polarity("text"), _FIELDS, REVIEW_POLARITY,
                    REVIEW_POLARITY_INVERSIONS, fixed_options=POLARITY),
    Flan2021Dataset("yelp_polarity_reviews", "yelp_polarity_reviews", CLUSTER,
                    {"train": "train", "validation": "test"}, {"train": 560_000, "validation": 38_000},
                    _polarity("text"), _FIELDS, REVIEW_POLARITY, REVIEW_POLARITY_INVERSIONS, fixed_options=POLARITY),
    Flan2021Dataset("sst2", "glue/sst2", CLUSTER, {"train": "train", "validation": "validation"},
                    {"train": 67_349, "validation": 872}, _polarity("sentence"), _FIELDS, REVIEW_POLARITY,
                    REVIEW_POLARITY_INVERSIONS, fixed_options=POLARITY),
]
