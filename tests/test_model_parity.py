"""Numerical parity with HF transformers (DeepSeek semantics) on the committed fixtures.

The goldens come from scripts/make_reference_fixtures.py (torch + transformers 4.57.1,
run in a separate venv); these tests need neither.
"""
import numpy as np
import pytest

from helpers import FIXTURES, fixture_dir, load_fixture_model

PARITY_MODELS = ["deepseek_v3_tiny", "deepseek_v2_lite_tiny", "deepseek_v2_tiny"]
FP8_MODELS = ["deepseek_v3_fp8_tiny", "deepseek_v31_fp8_tiny"]
LOGITS_ATOL = 1e-4


def golden(name):
    return np.load(fixture_dir(name) / "golden.npz")


def _sorted_routing(idx, weights):
    order = np.argsort(idx, 1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(weights, order, 1)


@pytest.mark.parametrize("name", PARITY_MODELS + FP8_MODELS)
def test_prompt_logits(name):
    g = golden(name)
    model = load_fixture_model(name)
    logits = model.logits(g["input_ids"])
    assert logits.dtype == np.float32 and logits.shape == g["logits"].shape
    np.testing.assert_allclose(logits, g["logits"], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", PARITY_MODELS + FP8_MODELS)
def test_greedy_tokens_with_cached_absorbed_decode(name):
    g = golden(name)
    model = load_fixture_model(name)
    ids, step_logits = model.generate(g["input_ids"], max_new_tokens=20, do_sample=False, return_logits=True)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, g["greedy_ids"])
    np.testing.assert_allclose(step_logits, g["step_logits"], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_routing_indices_exact(name):
    g = golden(name)
    model = load_fixture_model(name)
    routing = model.routing(g["input_ids"])
    layers = sorted(int(k[len("routing_indices_layer"):]) for k in g.files if k.startswith("routing_indices_layer"))
    assert len(routing) == len(layers) > 0
    for layer, (idx, weights) in zip(layers, routing):
        idx, weights = _sorted_routing(idx, weights)
        np.testing.assert_array_equal(idx, g[f"routing_indices_layer{layer}"], err_msg=f"layer {layer}")
        np.testing.assert_allclose(weights, g[f"routing_weights_layer{layer}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_cached_decode_equals_full_recompute(name):
    """Every decode step's logits (absorbed MLA over the latent cache) equal a fresh
    expanded-MLA prefill of the whole sequence so far."""
    g = golden(name)
    model = load_fixture_model(name)
    S = g["input_ids"].shape[1]
    ids, step_logits = model.generate(g["input_ids"], max_new_tokens=8, return_logits=True)
    full = model.logits(ids[:, :-1])
    np.testing.assert_allclose(step_logits, full[:, S - 1:], atol=2e-5, rtol=0)


def test_mtp_module_predicts_token_after_next():
    g = golden("deepseek_v3_tiny")
    model = load_fixture_model("deepseek_v3_tiny")
    assert model.config.num_nextn_predict_layers == 1
    mtp = model.mtp_logits(g["input_ids"])
    np.testing.assert_allclose(mtp, g["mtp_logits"], atol=LOGITS_ATOL, rtol=0)


def test_batch_rows_are_independent():
    """A row's logits do not depend on what else is in the batch."""
    g = golden("deepseek_v3_tiny")
    model = load_fixture_model("deepseek_v3_tiny")
    both = model.logits(g["input_ids"])
    alone = model.logits(g["input_ids"][1:2])
    np.testing.assert_allclose(alone[0], both[1], atol=1e-5, rtol=0)


def test_fixtures_are_small():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 20 * 2 ** 20
