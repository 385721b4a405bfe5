"""TfdsSource reading: ragged-batched reads equal per-record TFDS decoding; tfds.load runs lazily, once per split."""
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow_datasets as tfds  # noqa: E402

from flan_jax.data.sources import TfdsSource, to_python  # noqa: E402

MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name,num_examples", [("super_glue/rte", 130), ("squad/v1.1", 9), ("coqa", 5),
                                               ("web_nlg", 5)])
def test_batched_read_equals_per_record_decoding(name, num_examples):
  # 130 crosses a read batch (128); squad/coqa/web_nlg have nested and ragged sequence features.
  with tfds.testing.mock_data(num_examples=num_examples, **MOCK):
    records = [record for _, record in TfdsSource(name).records("train")]
    reference = [to_python(ex) for ex in tfds.as_numpy(tfds.load(name, split="train", shuffle_files=False))]
  assert len(records) == num_examples
  assert records == reference


def test_tfds_load_runs_once_per_split_and_never_at_construction(monkeypatch):
  calls = []
  real_load = tfds.load
  monkeypatch.setattr(tfds, "load", lambda *a, **k: calls.append(k["split"]) or real_load(*a, **k))
  with tfds.testing.mock_data(num_examples=3, **MOCK):
    source = TfdsSource("super_glue/rte")
    assert calls == []  # building the source (registration) opens nothing
    first = list(source.records("train"))
    again = list(source.records("train"))  # a second pass (a repeated stream, a sibling task) reuses the dataset
    list(source.records("validation"))
    assert first == again and len(first) == 3
    assert calls == ["train", "validation"]
  with tfds.testing.mock_data(num_examples=4, **MOCK):  # a new mock context is never served the old dataset
    assert len(list(source.records("train"))) == 4
  assert calls == ["train", "validation", "train"]
