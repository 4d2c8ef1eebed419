"""Shared test utilities: fixture paths and a per-session cache of loaded models
(building and compiling a model costs seconds, so each fixture is loaded once)."""
import functools
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def fixture_dir(name: str) -> pathlib.Path:
    return FIXTURES / name


@functools.lru_cache(maxsize=None)
def load_fixture_model(name: str):
    import deepseek_ms
    return deepseek_ms.load_model(str(fixture_dir(name)), progress=False)


def run_requests(engine, prompts, params, ids=None):
    """Add every prompt to `engine`, step until all finish; the token ids of each, in order."""
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    final = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
        assert steps < 10000, "the engine stopped making progress"
    return [final[i].token_ids for i in ids]


def random_prompts(n, seed=0, lo=3, hi=40, vocab=512):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]
