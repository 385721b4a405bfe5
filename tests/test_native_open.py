"""The native pipeline opens task streams lazily: only tasks drawn are opened; an empty task is named."""
import numpy as np
import pytest

import flan_jax.tasks  # noqa: F401  (the default collection: cheap generated sources)
from flan_jax.data import mixing, registry
from flan_jax.pipeline import native as native_pipeline
from flan_jax.data.sources import FunctionSource
from flan_jax.data.templates import Template


def _pairs(stream, count):
  return [(tuple(i), tuple(t)) for i, t in (next(stream) for _ in range(count))]


def test_only_drawn_tasks_open():
  opened = {}

  def source_of(name):
    def records(split):
      opened[name] = True  # the first pass opens the stream
      return ({"text": f"{name} record {i}"} for i in range(50))
    return FunctionSource(records, splits=("train",), num_examples={"train": 50}, name=name)

  rates = {}
  for name, rate in (("native_open_a", 1.0), ("native_open_b", 1.0), ("native_open_never", 1e-12)):
    task = registry.register_task(name, source_of(name), [Template("{text}", "{text}")], fields=("text",),
                                  cluster="test", collection="native_open_test", variants=["zs_noopt"])[0]
    rates[task] = rate
  mixing.register_mixture("native_open_test_mixture", rates)
  stream = native_pipeline.mixture_token_stream("native_open_test_mixture", shuffle=False)
  pairs = [next(stream) for _ in range(200)]
  assert all(isinstance(i, np.ndarray) for i, _ in pairs)
  assert set(opened) == {"native_open_a", "native_open_b"}  # both drawn; the near-zero task never opens


def test_an_empty_task_is_named():
  name = "native_open_empty"
  task = registry.register_task(name, FunctionSource(lambda split: iter(()), splits=("train",),
                                                     num_examples={"train": 1}),
                                [Template("{text}", "{text}")], fields=("text",), cluster="test",
                                collection="native_open_test", variants=["zs_noopt"])[0]
  mixing.register_mixture("native_open_empty_mixture", {task: 1.0})
  with pytest.raises(ValueError, match=task):
    next(native_pipeline.mixture_token_stream("native_open_empty_mixture", shuffle=False))
