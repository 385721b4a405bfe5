"""The seqio input path resumes from its saved position: the batches after it equal an uninterrupted run's, and the
resumed pipeline renders none of the examples the first run had already rendered (no replay)."""
import pickle

import numpy as np
import pytest
import seqio

import flan_jax.tasks  # noqa: F401  (registers the default tasks)
from flan_jax import packing
from flan_jax.data import registry, render
from flan_jax.pipeline import batches as data_lib

MIXTURE = "test_seqio_resume_mix"
LENGTHS = {"inputs": 64, "targets": 16}
# Enough batches that the resumed run reads past what the first one had rendered ahead (shuffle buffers, prefetch).
STEPS = 200


@pytest.fixture(scope="module", autouse=True)
def mixture():
    if MIXTURE in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(MIXTURE)
    seqio.MixtureRegistry.add(MIXTURE, [("parity_zs_opt", 1.0), ("addition_zs_noopt", 2.0)])
    yield
    seqio.MixtureRegistry.remove(MIXTURE)


def _batches(converter, state=None):
    cfg = data_lib.InputConfig(MIXTURE, LENGTHS, global_batch_size=4, seed=3)
    return data_lib.train_batches(cfg, converter, input_state=state)


@pytest.mark.slow
@pytest.mark.parametrize("make_converter", [packing.PackedEncDecFeatureConverter,
                                            lambda: seqio.EncDecFeatureConverter(pack=True)])
def test_seqio_position_resumes_bitwise_without_rendering_again(monkeypatch, make_converter):
    rendered = []
    original = render.render_example
    monkeypatch.setattr(render, "render_example", lambda spec, variant, split, index, *a: rendered.append(
        (spec.name, variant, index)) or original(spec, variant, split, index, *a))
    reference_converter = make_converter()
    reference = _batches(reference_converter)
    expected = [next(reference) for _ in range(STEPS)]
    del reference

    rendered.clear()
    first = _batches(make_converter())
    for _ in range(4):
        next(first)
    before = set(rendered)  # taken first: background read-ahead goes on rendering while the position is saved
    state = pickle.loads(pickle.dumps(first.state()))
    del first

    rendered.clear()
    converter = make_converter()
    resumed = _batches(converter, state)
    for want in expected[4:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    after = set(rendered)
    # Tasks hold 20k / 10k records: nothing repeats within these batches, so a replay would render `before` again.
    assert len(before) > 2000 and len(after) > 1000, (len(before), len(after))
    assert not before & after, sorted(before & after)[:5]
    if hasattr(converter, "stats"):
        assert converter.stats.as_dict() == reference_converter.stats.as_dict()


def _register_task_with_bad_records():
    from flan_jax.data.sources import FunctionSource
    from flan_jax.data.templates import Template
    records = [{"thing": f"thing {i}", "answer": "yes"} if i % 3 else {"answer": "yes"} for i in range(6000)]
    source = FunctionSource(lambda split: records, num_examples={"train": 6000, "validation": 6000})
    return registry.register_task("t_resume_errors", source, [Template("Name {thing}.", "{answer}")],
                                  fields=["thing", "answer"], cluster="toy", collection="test",
                                  variants=["zs_noopt"])[0]


@pytest.mark.parametrize("pipeline", ["native", "seqio"])
def test_skipped_record_counts_are_restored_with_the_position(pipeline):
    """A resumed pipeline does not read the records before its position again, so their data-error counts come
    back from the saved state: with the native pipeline exactly those of an uninterrupted run."""
    task = _register_task_with_bad_records()
    cfg = data_lib.InputConfig(task, LENGTHS, global_batch_size=4, seed=0, pipeline=pipeline)
    converter = packing.PackedEncDecFeatureConverter
    registry.reset_data_error_counts()
    reference = data_lib.train_batches(cfg, converter())
    for _ in range(STEPS):
        next(reference)
    del reference
    expected = registry.data_error_counts(task, split="train")

    registry.reset_data_error_counts()
    first = data_lib.train_batches(cfg, converter())
    for _ in range(5):
        next(first)
    state = pickle.loads(pickle.dumps(first.state()))
    del first
    registry.reset_data_error_counts()  # a new process
    resumed = data_lib.train_batches(cfg, converter(), input_state=state)
    assert registry.data_error_counts(task, split="train") == state["data_errors"][task]
    for _ in range(STEPS - 5):
        next(resumed)
    got = registry.data_error_counts(task, split="train")
    assert got["missing_field:thing"] > state["data_errors"][task]["missing_field:thing"] > 0
    if pipeline == "native":  # synchronous: the counts at a batch are exact (tf.data renders ahead in the background)
        assert got == expected
    registry.unregister_task("t_resume_errors")
