"""The seqio input path resumes from its saved position: the batches after it equal an uninterrupted run's, and the
resumed pipeline renders none of the examples the first run had already rendered (no replay)."""
import pickle

import numpy as np
import pytest
import seqio

import tasks  # noqa: F401  (registers the default tasks)
from flan_jax import packing, registry
from flan_jax.train import data as data_lib

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
    return data_lib.train_batches(cfg, converter, state is None and 0, input_state=state)


@pytest.mark.parametrize("make_converter", [packing.PackedEncDecFeatureConverter,
                                            lambda: seqio.EncDecFeatureConverter(pack=True)])
def test_seqio_position_resumes_bitwise_without_rendering_again(monkeypatch, make_converter):
    rendered = []
    original = registry.render_example
    monkeypatch.setattr(registry, "render_example", lambda spec, variant, split, index, *a: rendered.append(
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
