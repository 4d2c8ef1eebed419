"""Per-request sampling (deepseek_ms.engine.sampling): params validation, penalties,
min_tokens, top-k/top-p/min-p, logprobs, seed reproducibility across batch compositions,
and numerical robustness. Pure numpy; every random stream is seeded."""
import math
import re

import numpy as np
import pytest

from deepseek_ms.engine import sampling as smp
from deepseek_ms.engine.sampling import (
    Sampler, SamplerOutput, SamplingParams, SequenceSamplingState,
)


# ----------------------------------------------------------------------------- helpers

def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x[np.isfinite(x)].max()
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.exp(x - m).sum())


def state(seed=0, prompt=(), eos=None, **kw):
    return SequenceSamplingState(SamplingParams(seed=seed, **kw), list(prompt), eos)


def sample_one(logits, st, sampler=None):
    out = (sampler or Sampler()).sample(np.asarray([logits], dtype=np.float32), [st])
    return out


def reference_probs(logits, params):
    """Straightforward full-sort implementation of the documented pipeline."""
    x = np.asarray(logits, dtype=np.float64)
    vocab = x.size
    keep = x > -np.inf
    if 0 < params.top_k < vocab:
        kth = np.sort(x)[::-1][params.top_k - 1]
        keep &= x >= kth
    peak = x[keep].max()
    with np.errstate(under="ignore", over="ignore"):
        w = np.where(keep, np.exp((x - peak) / params.temperature), 0.0)
    p = w / w.sum()
    if params.top_p < 1.0:
        order = sorted((i for i in range(vocab) if keep[i]), key=lambda i: (-x[i], i))
        # Accumulate unnormalised weights: tied maxima weigh exactly 1, so an exact boundary
        # (say 300 of 600 tied tokens at top_p=0.5) stays exact.
        nucleus, mass, total = [], 0.0, math.fsum(w)
        for i in order:
            if nucleus and mass / total >= params.top_p:
                break
            nucleus.append(i)
            mass += w[i]
        mask = np.zeros(vocab, dtype=bool)
        mask[nucleus] = True
        p = np.where(mask, p, 0.0)
        p = p / p.sum()
    if params.min_p > 0.0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
        p = p / p.sum()
    return p


def chi2_critical(df, z=3.3):
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.3: ~0.9995)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def draw_counts(logits, params_kw, draws, batch=500, base_seed=0):
    """Count sampled tokens over `draws` draws: `batch` seeded states, stepped repeatedly
    (successive draws of one generator are independent too)."""
    vocab = len(logits)
    counts = np.zeros(vocab, dtype=np.int64)
    sampler = Sampler()
    batch = min(batch, draws)
    states = [state(seed=base_seed + i, **params_kw) for i in range(batch)]
    tiled = np.tile(np.asarray(logits, dtype=np.float32), (batch, 1))
    for _ in range(draws // batch):
        counts += np.bincount(sampler.sample(tiled, states).token_ids, minlength=vocab)
    return counts


def assert_matches_distribution(counts, probs):
    probs = np.asarray(probs, dtype=np.float64)
    assert counts[probs == 0].sum() == 0, f"disallowed tokens drawn: {np.flatnonzero((probs == 0) & (counts > 0))}"
    allowed = probs > 0
    n = counts.sum()
    expected = probs[allowed] * n
    stat = float(((counts[allowed] - expected) ** 2 / expected).sum())
    df = max(1, int(allowed.sum()) - 1)
    assert stat < chi2_critical(df), f"chi2={stat:.2f} df={df} counts={counts} expected={probs * n}"


# ----------------------------------------------------------------------------- greedy

def test_greedy_equals_argmax():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    states = [state(seed=None, temperature=0.0, top_k=5, top_p=0.3) for _ in range(6)]
    before = [s.generator.bit_generator.state for s in states]
    out = Sampler().sample(logits, states)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids.dtype == np.int64 and out.token_ids.shape == (6,)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(axis=1))
    # Greedy rows draw nothing.
    assert [s.generator.bit_generator.state for s in states] == before
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_greedy_ties_pick_lowest_id_and_mixed_batch():
    logits = np.array([[0.0, 3.0, 1.0, 3.0, 3.0],
                       [5.0, 5.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0, 9.0]], dtype=np.float32)
    states = [state(temperature=0.0), state(temperature=1.0, seed=3), state(temperature=1e-6)]
    out = Sampler().sample(logits, states)
    assert out.token_ids[0] == 1
    assert out.token_ids[2] == 4  # temperature below the 1e-5 epsilon is greedy
    states = [state(temperature=0.0), state(temperature=0.0), state(temperature=0.0)]
    np.testing.assert_array_equal(Sampler().sample(logits, states).token_ids, [1, 0, 4])


def test_one_draw_per_sampled_step():
    st = state(seed=77, temperature=0.9, top_k=3, top_p=0.8, min_p=0.1)
    ref = np.random.default_rng(77)
    logits = np.random.default_rng(5).standard_normal(50).astype(np.float32)
    for _ in range(5):
        sample_one(logits, st)
        ref.random()
        assert st.generator.bit_generator.state == ref.bit_generator.state
    # Even a row with a single surviving token consumes exactly one number.
    only = np.full(50, -np.inf, dtype=np.float32)
    only[7] = 0.0
    assert sample_one(only, st).token_ids[0] == 7
    ref.random()
    assert st.generator.bit_generator.state == ref.bit_generator.state


# ----------------------------------------------------------------------------- seeds

VOCAB = 300
_TABLE = np.random.default_rng(1234).standard_normal((VOCAB, VOCAB)).astype(np.float32) * 2.5


def fake_model(request_index, history, step):
    """Deterministic 'model': the next logits depend only on the request and its history."""
    last = history[-1] if history else request_index
    return _TABLE[(last * 7 + step + request_index) % VOCAB]


OTHER_PARAMS = [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=5),
    dict(temperature=0.7, top_k=10),  # unseeded
    dict(temperature=1.3, top_p=0.8, seed=11, logprobs=3),
    dict(temperature=0.5, min_p=0.2, presence_penalty=1.0, frequency_penalty=0.5, seed=12),
    dict(temperature=1.0, repetition_penalty=1.5, min_tokens=10, seed=13),
    dict(temperature=0.9, top_k=50, top_p=0.95, logprobs=20),
]
TARGET = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
              frequency_penalty=0.3, seed=4242, logprobs=2, min_tokens=5)


def run_alone(params, index, steps=50):
    st = SequenceSamplingState(SamplingParams(**params), [index, 3, 4], eos_token_id=0)
    sampler = Sampler()
    for step in range(steps):
        out = sampler.sample(fake_model(index, list(st.output_token_ids), step)[None, :], [st])
        st.append(int(out.token_ids[0]))
    return list(st.output_token_ids)


def run_mixed(steps=50, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = [TARGET] + OTHER_PARAMS
    states = [SequenceSamplingState(SamplingParams(**p), [i, 3, 4], eos_token_id=0)
              for i, p in enumerate(params)]
    step_of = [0] * len(states)
    sampler = Sampler()
    while step_of[0] < steps:
        # Continuous batching: a varying subset of the other requests, in a shuffled order.
        others = [i for i in range(1, len(states)) if step_of[i] < steps and rng.random() < 0.7]
        batch = [0] + others
        rng.shuffle(batch)
        logits = np.stack([fake_model(i, list(states[i].output_token_ids), step_of[i])
                           for i in batch]).astype(dtype)
        out = sampler.sample(logits, [states[i] for i in batch])
        for row, i in enumerate(batch):
            states[i].append(int(out.token_ids[row]))
            step_of[i] += 1
    return [list(s.output_token_ids) for s in states]


def test_seed_reproducible_across_batch_compositions():
    alone = run_alone(TARGET, 0)
    mixed_a = run_mixed(seed=0)
    mixed_b = run_mixed(seed=99)
    assert mixed_a[0] == alone
    assert mixed_b[0] == alone
    assert len(set(alone)) > 5  # really sampled, not stuck on one token
    # The other seeded requests are reproducible too, however far they got.
    for index in (1, 2, 4, 5, 6):  # greedy and the seeded ones
        got_a, got_b = mixed_a[index], mixed_b[index]
        n = min(len(got_a), len(got_b))
        assert got_a[:n] == got_b[:n] == run_alone(OTHER_PARAMS[index - 1], index, n)


def test_different_seeds_differ_and_unseeded_differ():
    a = run_alone(dict(temperature=1.0, seed=1), 0)
    b = run_alone(dict(temperature=1.0, seed=2), 0)
    assert a != b
    assert run_alone(dict(temperature=1.0, seed=1), 0) == a
    c = run_alone(dict(temperature=1.0), 0)
    d = run_alone(dict(temperature=1.0), 0)
    assert c != d


# ----------------------------------------------------------------------------- filters

def test_top_k_distribution():
    logits = np.array([0.5, 2.0, -1.0, 1.5, 0.0, 1.0, -2.0, 1.8, 0.2, -0.5], dtype=np.float32)
    kw = dict(temperature=0.7, top_k=4)
    probs = reference_probs(logits, SamplingParams(**kw))
    assert set(np.flatnonzero(probs)) == {1, 3, 5, 7}
    assert_matches_distribution(draw_counts(logits, kw, 10000), probs)


def test_top_k_keeps_boundary_ties():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.0], dtype=np.float32)
    p = smp._sampling_distribution(logits, SamplingParams(top_k=2))
    assert set(np.flatnonzero(p)) == {0, 2, 3, 4}


def test_top_p_distribution():
    # softmax of these: ~[0.47, 0.17, 0.17, 0.06, 0.06, 0.04, 0.02, 0.01]
    logits = np.log(np.array([0.45, 0.17, 0.17, 0.07, 0.06, 0.04, 0.02, 0.02])).astype(np.float32)
    kw = dict(temperature=1.0, top_p=0.7)
    probs = reference_probs(logits, SamplingParams(**kw))
    # 0.45 + 0.17 = 0.62 < 0.7, so the next token (tie -> lower id 2) crosses and is kept.
    assert set(np.flatnonzero(probs)) == {0, 1, 2}
    np.testing.assert_allclose(probs[[0, 1, 2]], np.array([0.45, 0.17, 0.17]) / 0.79, rtol=1e-5)
    assert_matches_distribution(draw_counts(logits, kw, 10000), probs)


def test_top_p_tie_at_boundary_prefers_lower_id():
    logits = np.log(np.array([0.2, 0.4, 0.2, 0.2])).astype(np.float32)
    p = smp._sampling_distribution(logits, SamplingParams(top_p=0.5))
    assert set(np.flatnonzero(p)) == {1, 0}


def test_min_p_distribution():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.02, 0.18])).astype(np.float32)
    kw = dict(temperature=1.0, min_p=0.3)  # keep p >= 0.12
    probs = reference_probs(logits, SamplingParams(**kw))
    assert set(np.flatnonzero(probs)) == {1, 3, 5}
    assert_matches_distribution(draw_counts(logits, kw, 10000), probs)


def test_combined_filters_order():
    # temperature 0.5 -> top_k 5 -> top_p 0.8 over the top-5 renormalised -> min_p 0.3.
    logits = np.array([2.0, 1.9, 1.7, 1.2, 1.0, 0.9, -3.0, 1.95], dtype=np.float32)
    kw = dict(temperature=0.5, top_k=5, top_p=0.8, min_p=0.3)
    params = SamplingParams(**kw)
    probs = reference_probs(logits, params)
    np.testing.assert_allclose(smp._sampling_distribution(logits, params), probs, atol=1e-6)
    z = np.exp((logits[[0, 7, 1, 2, 3]] - 2.0) / 0.5)
    z /= z.sum()
    # The nucleus over the top-5: cumulative mass before each token must be < 0.8.
    before = np.concatenate(([0.0], np.cumsum(z)[:-1]))
    nucleus = np.array([0, 7, 1, 2, 3])[before < 0.8]
    pn = np.zeros(8)
    pn[nucleus] = z[before < 0.8]
    pn /= pn.sum()
    pn[pn < 0.3 * pn.max()] = 0.0
    pn /= pn.sum()
    np.testing.assert_allclose(probs, pn, atol=1e-12)
    assert_matches_distribution(draw_counts(logits, kw, 10000), probs)


@pytest.mark.parametrize("vocab", [7, 100, 5000, 60000])
@pytest.mark.parametrize("case", range(6))
def test_distribution_matches_reference(vocab, case):
    rng = np.random.default_rng(1000 * case + vocab)
    kind = case % 3
    if kind == 0:
        logits = rng.standard_normal(vocab) * 3
    elif kind == 1:  # many exact ties
        logits = rng.integers(-4, 4, vocab).astype(np.float64)
    else:  # peaked, with masked entries
        logits = rng.standard_normal(vocab)
        logits[rng.integers(0, vocab, 5)] += 8.0
        logits[rng.random(vocab) < 0.2] = -np.inf
        logits[int(np.argmax(logits))] = 10.0
    logits = logits.astype(np.float32)
    configs = [
        dict(temperature=0.8),
        dict(temperature=1.0, top_k=1 + case),
        dict(temperature=0.6, top_p=0.9),
        dict(temperature=1.2, top_p=0.5, top_k=50),
        dict(temperature=0.9, min_p=0.05),
        dict(temperature=0.7, top_k=20, top_p=0.95, min_p=0.1),
        dict(temperature=2.0, top_p=0.999),
    ]
    for kw in configs:
        params = SamplingParams(**kw)
        got = smp._sampling_distribution(logits, params)
        want = reference_probs(logits, params)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(kw))


def test_inverse_cdf_block_search_matches_plain_search():
    rng = np.random.default_rng(3)
    weights = rng.integers(0, 4, 50000).astype(np.float32)  # integer sums are exact
    weights[-300:] = 0.0
    cdf = np.cumsum(weights, dtype=np.float64)
    for u in np.concatenate((rng.random(300), [0.0, 1.0 - 2.0 ** -53])):
        want = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), weights.size - 1)
        got = smp._inverse_cdf(weights, float(u))
        assert weights[got] > 0
        if u < 1.0 - 1e-9:
            assert got == want
    assert smp._inverse_cdf(weights, 1.0 - 2.0 ** -53) == int(np.flatnonzero(weights)[-1])
    assert smp._inverse_cdf(weights, 0.0) == int(np.flatnonzero(weights)[0])


def test_kth_largest_exact():
    rng = np.random.default_rng(8)
    for size, k in [(10, 3), (5000, 1), (131072, 20), (131072, 4000), (70000, 70000)]:
        values = rng.integers(-50, 50, size).astype(np.float32)
        assert smp._kth_largest(values, k) == np.sort(values)[::-1][k - 1]


# ----------------------------------------------------------------------------- penalties

def processed_logprobs(logits, st, sampler=None):
    """All V logprobs the sampler reports for this row (logprobs=V via the top list)."""
    out = sample_one(logits, st, sampler)
    lp = np.full(len(logits), np.nan)
    for tok, value in out.top_logprobs[0]:
        lp[tok] = value
    return out, lp


def test_penalties_match_hand_computation():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 1.5, 0.0], dtype=np.float32)
    st = state(prompt=[0, 1], temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5,
               frequency_penalty=0.25, logprobs=6)
    for tok in (2, 2, 3):
        st.append(tok)
    expected = np.array([
        2.0 / 2,                       # prompt only, positive: divided
        -2.0 * 2,                      # prompt only, negative: multiplied
        1.0 / 2 - (0.25 * 2 + 0.5),    # output x2: repetition, then frequency and presence
        -1.0 * 2 - (0.25 * 1 + 0.5),   # output x1
        1.5,                           # unseen
        0.0,                           # unseen
    ])
    out, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax(expected), atol=1e-6)
    assert out.token_ids[0] == 4  # the penalties moved the argmax away from token 0
    assert out.logprobs[0] == pytest.approx(log_softmax(expected)[4], abs=1e-6)


def test_repetition_penalty_alone_and_zero_logit():
    logits = np.array([3.0, -3.0, 0.0, 1.0], dtype=np.float32)
    st = state(prompt=[0, 1, 2, 0], temperature=0.0, repetition_penalty=1.5, logprobs=4)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([2.0, -4.5, 0.0, 1.0]), atol=1e-6)
    # Below 1 it rewards repetition, symmetrically.
    st = state(prompt=[0, 1], temperature=0.0, repetition_penalty=0.5, logprobs=4)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([6.0, -1.5, 0.0, 1.0]), atol=1e-6)
    # Output tokens count as seen too.
    st = state(prompt=[], temperature=0.0, repetition_penalty=2.0, logprobs=4)
    st.append(3)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([3.0, -3.0, 0.0, 0.5]), atol=1e-6)


def test_presence_and_frequency_only_count_output_tokens():
    logits = np.zeros(5, dtype=np.float32)
    st = state(prompt=[0, 0, 1], temperature=0.0, presence_penalty=1.0, logprobs=5)
    for tok in (1, 2, 2, 2):
        st.append(tok)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([0, -1, -1, 0, 0]), atol=1e-6)

    st = state(prompt=[0, 0, 1], temperature=0.0, frequency_penalty=0.5, logprobs=5)
    for tok in (1, 2, 2, 2):
        st.append(tok)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([0, -0.5, -1.5, 0, 0]), atol=1e-6)
    assert st.output_token_counts == {1: 1, 2: 3}

    # Negative values encourage repetition.
    st = state(temperature=0.0, frequency_penalty=-2.0, presence_penalty=-1.0, logprobs=5)
    st.append(4)
    st.append(4)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([0, 0, 0, 0, 5.0]), atol=1e-6)


def test_penalties_in_a_batch_are_per_row():
    logits = np.tile(np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32), (3, 1))
    a = state(prompt=[0], temperature=0.0, repetition_penalty=3.0, logprobs=4)
    b = state(prompt=[1], temperature=0.0, logprobs=4)
    c = state(prompt=[2], temperature=0.0, presence_penalty=2.0, logprobs=4)
    c.append(3)
    out = Sampler().sample(logits, [a, b, c])
    got = [dict(top) for top in out.top_logprobs]
    np.testing.assert_allclose([got[0][t] for t in range(4)], log_softmax([1 / 3, 1, 1, 1]), atol=1e-6)
    np.testing.assert_allclose([got[1][t] for t in range(4)], log_softmax([1, 1, 1, 1]), atol=1e-6)
    np.testing.assert_allclose([got[2][t] for t in range(4)], log_softmax([1, 1, 1, -1]), atol=1e-6)


# ----------------------------------------------------------------------------- min_tokens

def test_min_tokens_blocks_eos_and_stop_ids_then_releases():
    logits = np.array([1.0, 0.0, 0.0, 0.0, 9.0, 10.0], dtype=np.float32)
    st = state(eos=5, temperature=0.0, min_tokens=3, stop_token_ids=[4], logprobs=2)
    for step in range(3):
        out = sample_one(logits, st)
        assert out.token_ids[0] == 0
        # Processed logprobs see the mask.
        assert dict(out.top_logprobs[0]) == pytest.approx(
            {0: log_softmax([1, 0, 0, 0])[0], 1: log_softmax([1, 0, 0, 0])[1]})
        st.append(int(out.token_ids[0]))
    assert sample_one(logits, st).token_ids[0] == 5


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    logits = np.array([1.0, 0.0, 9.0, 10.0], dtype=np.float32)
    st = state(eos=3, temperature=0.0, min_tokens=2, stop_token_ids=[2], ignore_eos=True)
    assert sample_one(logits, st).token_ids[0] == 3
    st = state(eos=[3, 1], temperature=0.0, min_tokens=2, stop_token_ids=[2])
    logits = np.array([0.0, 11.0, 9.0, 10.0], dtype=np.float32)
    assert sample_one(logits, st).token_ids[0] == 0  # both EOS ids and the stop id masked


def test_min_tokens_sampled_rows_never_emit_blocked_tokens():
    logits = np.array([0.0, 0.0, 3.0, 3.0], dtype=np.float32)
    counts = draw_counts(logits, dict(eos=2, stop_token_ids=[3], min_tokens=1), 4000)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > 0 and counts[1] > 0


# ----------------------------------------------------------------------------- logprobs

def test_logprobs_are_log_softmax_before_temperature_and_filters():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(50) * 2).astype(np.float32)
    for kw in (dict(temperature=0.3, top_k=3), dict(temperature=0.0), dict(temperature=2.0, top_p=0.5)):
        st = state(seed=9, logprobs=5, **kw)
        out = sample_one(logits, st)
        want = log_softmax(logits)
        tok = int(out.token_ids[0])
        assert out.logprobs[0] == pytest.approx(want[tok], abs=1e-6)
        top = out.top_logprobs[0]
        assert [t for t, _ in top] == list(np.argsort(-want, kind="stable")[:5])
        np.testing.assert_allclose([v for _, v in top], np.sort(want)[::-1][:5], atol=1e-6)
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_logprobs_ties_zero_and_clamped():
    logits = np.array([1.0, 3.0, 3.0, 2.0, 3.0], dtype=np.float32)
    out = sample_one(logits, state(temperature=0.0, logprobs=2))
    assert [t for t, _ in out.top_logprobs[0]] == [1, 2]
    out = sample_one(logits, state(temperature=0.0, logprobs=0))
    assert out.top_logprobs[0] == [] and out.logprobs[0] == pytest.approx(log_softmax(logits)[1])
    out = sample_one(logits, state(temperature=0.0, logprobs=20))
    assert [t for t, _ in out.top_logprobs[0]] == [1, 2, 4, 3, 0]
    out = sample_one(logits, state(temperature=0.0))
    assert out.logprobs == [None] and out.top_logprobs == [None]


def test_raw_logprobs_mode_ignores_penalties_and_masks():
    logits = np.array([2.0, 1.0, 0.5, 5.0], dtype=np.float32)
    st = state(prompt=[0], eos=3, temperature=0.0, repetition_penalty=4.0, min_tokens=1,
               logprobs=4)
    out, lp = processed_logprobs(logits, st, Sampler(logprobs_mode="raw"))
    assert out.token_ids[0] == 1  # 0 penalised to 0.5 < 1.0, 3 masked by min_tokens
    np.testing.assert_allclose(lp, log_softmax(logits), atol=1e-6)
    assert out.logprobs[0] == pytest.approx(log_softmax(logits)[1], abs=1e-6)
    st = state(prompt=[0], eos=3, temperature=0.0, repetition_penalty=4.0, min_tokens=1,
               logprobs=4)
    _, lp = processed_logprobs(logits, st)
    np.testing.assert_allclose(lp, log_softmax([0.5, 1.0, 0.5, -np.inf]), atol=1e-6)
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler(logprobs_mode="processed_logits")


# ----------------------------------------------------------------------------- robustness

def test_extreme_logits_no_nan():
    vocab = 64
    row = np.zeros(vocab, dtype=np.float32)
    row[::3] = -np.inf
    row[5] = 1e30
    row[7] = -1e30
    row[8] = np.finfo(np.float32).max
    row[10] = -np.finfo(np.float32).max
    configs = [dict(temperature=1e-4), dict(temperature=0.7, top_p=0.3), dict(temperature=1.0, top_k=3),
               dict(temperature=0.8, min_p=0.5), dict(temperature=1e300),
               dict(temperature=0.5, repetition_penalty=0.1, presence_penalty=-2.0)]
    with np.errstate(all="raise"):
        for kw in configs:
            st = state(seed=1, prompt=[8, 5, 3], logprobs=20, **kw)
            st.append(8)
            out = sample_one(row, st)
            tok = int(out.token_ids[0])
            assert np.isfinite(row[tok])
            assert not math.isnan(out.logprobs[0]) and out.logprobs[0] <= 0.0
            assert not any(math.isnan(v) for _, v in out.top_logprobs[0])
            if kw["temperature"] < 1e200:
                assert tok == 8 and out.logprobs[0] == pytest.approx(0.0, abs=1e-6)


def test_all_but_one_masked():
    row = np.full(1000, -np.inf, dtype=np.float32)
    row[123] = -5.0
    with np.errstate(all="raise"):
        for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=5, top_p=0.1, min_p=0.9),
                   dict(temperature=3.0, repetition_penalty=1.3, frequency_penalty=2.0)):
            st = state(seed=2, prompt=[123], logprobs=3, **kw)
            st.append(123)
            out = sample_one(row, st)
            assert out.token_ids[0] == 123 and out.logprobs[0] == pytest.approx(0.0)
            assert out.top_logprobs[0][0] == (123, pytest.approx(0.0))
            assert out.top_logprobs[0][1][1] == -np.inf


def test_positive_infinity_means_uniform_over_infinite_entries():
    row = np.array([0.0, np.inf, 5.0, np.inf], dtype=np.float32)
    counts = draw_counts(row, dict(temperature=1.0), 2000)
    assert counts[0] == counts[2] == 0 and counts[1] > 800 and counts[3] > 800
    out = sample_one(row, state(temperature=0.0, logprobs=1))
    assert out.token_ids[0] == 1 and out.logprobs[0] == pytest.approx(math.log(0.5))


def test_nan_and_fully_masked_rows_raise():
    ok = np.zeros(4, dtype=np.float32)
    bad = np.array([0.0, np.nan, 1.0, 2.0], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        Sampler().sample(np.stack([ok, bad]), [state(), state()])
    dead = np.full(4, -np.inf, dtype=np.float32)
    with pytest.raises(ValueError, match="masked"):
        Sampler().sample(np.stack([ok, dead]), [state(), state(temperature=0.0)])
    # min_tokens masking the only finite token leaves nothing to sample either.
    only_eos = np.array([-np.inf, -np.inf, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match="masked"):
        sample_one(only_eos, state(eos=2, min_tokens=1))


def test_large_vocab_rows():
    vocab = 131072
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((8, vocab)) * 4).astype(np.float32)
    kws = [dict(temperature=0.8, top_k=5), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0),
           dict(temperature=0.0, logprobs=20), dict(temperature=0.6, min_p=0.1, top_k=1000),
           dict(temperature=0.9, top_k=50, top_p=0.95, logprobs=5),
           dict(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5),
           dict(temperature=0.5, top_p=0.5)]
    states = [state(seed=i, prompt=range(0, 5000, 7), **kw) for i, kw in enumerate(kws)]
    out = Sampler().sample(logits, states)
    top5 = set(np.argsort(-logits[0])[:5].tolist())
    assert int(out.token_ids[0]) in top5
    assert out.token_ids[3] == logits[3].argmax()
    assert [t for t, _ in out.top_logprobs[3]] == list(np.argsort(-logits[3], kind="stable")[:20])
    for i, kw in enumerate(kws):
        if kw["temperature"] > 0 and "repetition_penalty" not in kw:
            p = smp._sampling_distribution(logits[i], SamplingParams(**kw))
            assert p[out.token_ids[i]] > 0


def test_float64_and_integer_logits_accepted_and_input_untouched():
    logits = np.array([[0.0, 1.0, 3.0]], dtype=np.float64)
    copy = logits.copy()
    st = state(prompt=[2], temperature=0.0, repetition_penalty=10.0)
    assert Sampler().sample(logits, [st]).token_ids[0] == 1
    np.testing.assert_array_equal(logits, copy)
    assert Sampler().sample(np.array([[0, 4, 1]]), [state(temperature=0.0)]).token_ids[0] == 1


# ----------------------------------------------------------------------------- API errors

def test_batch_errors():
    with pytest.raises(ValueError, match="rows"):
        Sampler().sample(np.zeros((2, 4), dtype=np.float32), [state()])
    with pytest.raises(ValueError, match="2-D"):
        Sampler().sample(np.zeros(4, dtype=np.float32), [state()])
    st = state()
    with pytest.raises(ValueError, match="twice"):
        Sampler().sample(np.zeros((2, 4), dtype=np.float32), [st, st])
    with pytest.raises(TypeError, match="SequenceSamplingState"):
        Sampler().sample(np.zeros((1, 4), dtype=np.float32), [SamplingParams()])
    with pytest.raises(ValueError, match="vocabulary"):
        sample_one(np.zeros(4), state(eos=9, min_tokens=1))
    with pytest.raises(ValueError, match="vocabulary"):
        sample_one(np.zeros(4), state(prompt=[1, 7], repetition_penalty=1.1))


def test_state_bookkeeping_and_errors():
    st = state(prompt=[5, 5, 6], eos=2, min_tokens=2)
    assert st.num_prompt_tokens == 3 and st.eos_token_ids == (2,)
    assert st.min_tokens_pending
    st.append(np.int64(6))
    st.append(9)
    assert st.output_token_ids == (6, 9) and st.num_output_tokens == 2
    assert st.output_token_counts == {6: 1, 9: 1}
    assert not st.min_tokens_pending
    assert sorted(st._seen_token_ids().tolist()) == [5, 6, 9]
    for bad in (True, -1, 1.0, "3"):
        with pytest.raises(ValueError, match="token_id"):
            st.append(bad)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SequenceSamplingState(SamplingParams(), [1, -2])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SequenceSamplingState(SamplingParams(), [1.5, 2.0])
    with pytest.raises(ValueError, match="eos_token_id"):
        SequenceSamplingState(SamplingParams(), [1], eos_token_id=-1)
    with pytest.raises(TypeError, match="SamplingParams"):
        SequenceSamplingState({"temperature": 1.0}, [1])
    params = SamplingParams()
    params.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        SequenceSamplingState(params, [1])


# ----------------------------------------------------------------------------- validation

BAD_PARAMS = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True),
    ("max_tokens", "16"), ("max_tokens", None),
    ("min_tokens", -1), ("min_tokens", 2.0), ("min_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", True), ("temperature", "1.0"), ("temperature", None),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True), ("top_k", None),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")), ("top_p", True),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")), ("min_p", False),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")), ("repetition_penalty", float("nan")),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", float("nan")),
    ("presence_penalty", float("-inf")), ("presence_penalty", False),
    ("frequency_penalty", 3), ("frequency_penalty", -3.0), ("frequency_penalty", float("nan")),
    ("frequency_penalty", "0.1"),
    ("seed", -1), ("seed", 1.0), ("seed", True), ("seed", "7"),
    ("logprobs", 21), ("logprobs", -1), ("logprobs", 2.0), ("logprobs", True),
    ("stop", [""]), ("stop", ""), ("stop", [1]), ("stop", 5), ("stop", ["ok", None]),
    ("stop", {"a"}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", 3), ("stop_token_ids", ["a"]),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("skip_special_tokens", 0),
    ("n", 2), ("n", 0), ("n", True), ("n", 1.0),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=20, max_tokens=10)
    SamplingParams(min_tokens=10, max_tokens=10)


def test_validate_after_mutation():
    p = SamplingParams()
    p.frequency_penalty = 5.0
    with pytest.raises(ValueError, match="frequency_penalty"):
        p.validate()


def test_canonicalisation():
    p = SamplingParams(stop="###", stop_token_ids=(np.int64(3), 4), temperature=0,
                       top_p=np.float32(0.5), seed=np.uint64(2 ** 63), logprobs=np.int32(3),
                       ignore_eos=np.bool_(True))
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4]
    assert type(p.temperature) is float and p.temperature == 0.0 and p.is_greedy
    assert type(p.top_p) is float and type(p.seed) is int and type(p.logprobs) is int
    assert p.ignore_eos is True
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    d = SamplingParams()
    assert (d.max_tokens, d.min_tokens, d.temperature, d.top_k, d.top_p, d.min_p) == (16, 0, 1.0, 0, 1.0, 0.0)
    assert (d.repetition_penalty, d.presence_penalty, d.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (d.seed, d.logprobs, d.stop, d.stop_token_ids, d.ignore_eos, d.skip_special_tokens, d.n) == \
        (None, None, [], [], False, True, 1)
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(logprobs=20).logprobs == 20
    with pytest.raises(TypeError):
        SamplingParams(best_of=2)
