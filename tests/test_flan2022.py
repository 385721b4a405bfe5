"""Flan 2022 mixture: submix weights, caps and template types over the registered collections."""
import io
import os

import pytest

from flan_jax.cli import data as data_cli

from flan_jax.data import mixing, registry
from flan_jax.tasks import flan2022

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def submixtures():
    return flan2022.register(niv2_dir=os.path.join(FIXTURES, "niv2"), cot_dir=os.path.join(FIXTURES, "cot"))


def test_submix_weights_renormalized_over_present_collections(submixtures):
    present = set(submixtures)
    assert {"flan2021", "niv2", "cot"} <= present
    assert set(flan2022.MISSING) == set(mixing.FLAN2022_SUBMIX_WEIGHTS) - present and "dialog" in flan2022.MISSING
    rates = mixing.mixture_rates(flan2022.MIXTURE)
    total_weight = sum(mixing.FLAN2022_SUBMIX_WEIGHTS[c] for c in present)
    for collection, sub in submixtures.items():
        share = sum(rates[t] for t in sub) / sum(rates.values())
        assert share == pytest.approx(mixing.FLAN2022_SUBMIX_WEIGHTS[collection] / total_weight, rel=1e-6)


def test_caps_template_types_and_inversions(submixtures):
    niv2 = submixtures["niv2"]   # task001: 120 instances, task002: 12; zs_noopt and fs_noopt share each
    assert niv2["niv2_task001_reverse_word_zs_noopt"] == niv2["niv2_task001_reverse_word_fs_noopt"] == 60.0
    assert niv2["niv2_task002_count_letters_zs_noopt"] == 6.0
    flan = submixtures["flan2021"]
    variants = {t.rsplit("_", 2)[-2] + "_" + t.rsplit("_", 1)[-1] for t in flan}
    assert {"zs_opt", "zs_noopt", "fs_opt", "fs_noopt"} <= variants
    # gigaword (3.8M examples) is capped at 30k; its inversion variant gets 0.3 of it when it has one.
    giga = {t: r for t, r in flan.items() if t.startswith("gigaword_")}
    assert sum(giga.values()) == pytest.approx(30_000)
    inv = [t for t in flan if t.endswith("_inv")]
    assert inv and all(flan[t] <= 0.3 * 30_000 + 1e-6 for t in inv)
    # The fixture dir gives cot_arith and gsm8k; other tests in the same pytest process may have registered more cot tasks
    # (the registry is global), and the submix takes every registered task of the collection.
    cot = set(submixtures["cot"])
    assert {"cot_arith_cot", "cot_gsm8k_cot"} <= cot
    assert all(registry.task_spec(t[: -len("_cot")]).collection == "cot" for t in cot)
    assert submixtures["cot"]["cot_gsm8k_cot"] == 7_473.0


def test_dataset_rates_splits_evenly_over_template_types():
    rates = flan2022.dataset_rates({"x": ["parity"]}, cap=100)
    assert rates == {f"parity_{v}": 25.0 for v in ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")}


def test_cli_list_shows_missing(submixtures):
    out = io.StringIO()
    assert data_cli.main(["list", "--collection", "flan2022"], out=out) == 0
    text = out.getvalue()
    assert "niv2_task001_reverse_word_zs_noopt\tniv2\t" in text
    assert "# flan2022 missing collections:" in text and "dialog" in text
