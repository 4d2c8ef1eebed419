"""MTP speculative decoding: whatever the drafts are (the real MTP module's, always right,
always wrong), the output equals non-speculative decoding, greedy and seeded sampling alike;
the acceptance rate is reported and the MTP cache is accounted for."""
import numpy as np
import pytest

from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_ms.engine.sampling import SamplingParams
from helpers import load_fixture_model, random_prompts, run_requests

NAME = "deepseek_v3_tiny"
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _model():
    return load_fixture_model(NAME)


def _run(engine, prompts, params=GREEDY):
    return run_requests(engine, prompts, params)


PROMPTS = random_prompts(4, seed=11)


@pytest.fixture(scope="module")
def reference():
    return _run(LLMEngine(_model(), None, EngineConfig(max_num_seqs=4)), PROMPTS)


def _spec_engine(**kwargs):
    return LLMEngine(_model(), None, EngineConfig(num_speculative_tokens=1, max_num_seqs=4, **kwargs))


def _run_with_oracle(prompts, params, reference, wrong=False):
    """Replace the MTP drafter's proposals by the true next-next token from `reference` (or a
    wrong one). The MTP module still runs, so its cache is maintained as usual."""
    engine = _spec_engine(enable_prefix_caching=False)
    real = engine.runner.draft

    def sequence_of(first_block):
        for rid in engine.scheduler.requests:
            if rid in engine.block_manager and engine.block_manager.block_table(rid)[:1] == [first_block]:
                i = int(rid[1:])
                return prompts[i] + reference[i]
        raise AssertionError(f"no running request owns block {first_block}")

    def draft(items):
        logits = real(items)
        forced = np.full_like(logits, -1e9)
        for row, item in enumerate(items):
            seq = sequence_of(item.block_table[0])
            target = item.position + len(item.next_token_ids) + 1
            token = seq[target] if target < len(seq) else 0
            forced[row, (token + 1) % logits.shape[-1] if wrong else token] = 0
        return forced

    engine.runner.draft = draft
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
    return engine, [final[f"r{i}"] for i in range(len(prompts))]


def test_mtp_drafts_give_identical_greedy_output(reference):
    engine = _spec_engine()
    assert _run(engine, PROMPTS) == reference
    stats = engine.stats()
    assert stats["spec_draft_tokens"] > 0
    assert 0.0 <= stats["spec_acceptance_rate"] <= 1.0
    assert stats["spec_accepted_tokens"] == round(stats["spec_acceptance_rate"] * stats["spec_draft_tokens"])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_allocatable_blocks


def test_always_right_drafts_are_accepted_and_skip_steps(reference):
    engine, out = _run_with_oracle(PROMPTS, GREEDY, reference)
    assert out == reference
    # every draft is accepted except where the request ends on the verified token itself
    stats = engine.stats()
    assert stats["spec_draft_tokens"] - stats["spec_accepted_tokens"] <= len(PROMPTS)
    # two tokens per verify step: far fewer steps than tokens generated
    assert engine.num_steps < sum(len(r) for r in reference) / 2 + len(PROMPTS) + 2


def test_always_wrong_drafts_change_nothing(reference):
    engine, out = _run_with_oracle(PROMPTS, GREEDY, reference, wrong=True)
    assert out == reference
    assert engine.stats()["spec_accepted_tokens"] == 0


def test_chunked_prefill_and_preemption_with_speculation():
    # small token budget: prompts run in chunks (the MTP cache is filled chunk by chunk), and a
    # tight pool forces preemption (drafts are dropped and recomputed)
    prompts = random_prompts(4, seed=12, lo=30, hi=40)
    plain = _run(LLMEngine(_model(), None, EngineConfig(max_num_seqs=4)), prompts)
    engine = _spec_engine(block_size=8, num_blocks=15, max_num_batched_tokens=16)
    assert _run(engine, prompts) == plain
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_unchanged_by_speculation():
    # accepted drafts take the second-row sampling path; the generator must draw in the same order
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=77, max_tokens=10, ignore_eos=True)
    plain = _run(LLMEngine(_model(), None, EngineConfig()), PROMPTS[:2], params)
    engine, out = _run_with_oracle(PROMPTS[:2], params, plain)
    assert out == plain
    assert engine.stats()["spec_accepted_tokens"] > 0


def test_cache_accounting_includes_the_mtp_layer():
    cfg = _model().config
    plain = LLMEngine(_model(), None, EngineConfig(num_blocks=8))
    spec = _spec_engine(num_blocks=8)
    assert spec.cache_bytes_per_token == plain.cache_bytes_per_token * (cfg.num_hidden_layers + 1) \
        // cfg.num_hidden_layers
    assert spec.runner.cache_bytes == plain.runner.cache_bytes * (cfg.num_hidden_layers + 1) // cfg.num_hidden_layers


def test_needs_mtp_weights():
    model = load_fixture_model("deepseek_v2_lite_tiny")
    assert model.config.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="MTP"):
        LLMEngine(model, None, EngineConfig(num_speculative_tokens=1))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=2).validate()
