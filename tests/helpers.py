"""Shared test utilities: fixture paths and a per-session cache of loaded models
(building and compiling a model costs seconds, so each fixture is loaded once)."""
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def fixture_dir(name: str) -> pathlib.Path:
    return FIXTURES / name


@functools.lru_cache(maxsize=None)
def load_fixture_model(name: str):
    import deepseek_ms
    return deepseek_ms.load_model(str(fixture_dir(name)), progress=False)


def experts_reference(x, idx, w, weights, first, n):
    """Routed SwiGLU experts in float64 numpy: sum over each token's chosen experts in
    [first, first + n) of weight * down(silu(gate x) * up x); `weights` maps
    gate_proj/up_proj/down_proj to [E, ...] arrays."""
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not first <= e < first + n:
                continue
            g = weights["gate_proj"][e] @ x[t]
            u = weights["up_proj"][e] @ x[t]
            out[t] += w[t, j] * (weights["down_proj"][e] @ (g / (1 + np.exp(-g)) * u))
    return out


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


_MINDFORMERS_SCRIPT = r"""
import json, sys
from mindformers.tools.register import MindFormerConfig
from mindformers.models.build_config import merge_model_config

def plain(x):
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x

out = []
for job in json.loads(sys.argv[1]):
    cfg = MindFormerConfig(job["path"])
    if job.get("overrides"):
        cfg.merge_from_dict(job["overrides"])
    d = plain(cfg)
    mc = d.get("model", {}).get("model_config", {})
    d["merged"] = merge_model_config(job["merge_dir"], dict(mc)) if job.get("merge_dir") else None
    out.append(d)
print("@@MF@@" + json.dumps(out, default=str))
"""


def load_in_mindformers(jobs, cwd):
    """Load YAML files with mindformers' own MindFormerConfig, in one subprocess run in `cwd`
    (importing mindformers costs seconds and writes ./output/log). Each job is {"path"} plus
    optional "overrides" (merge_from_dict) and "merge_dir" (merge_model_config with that
    folder). Returns, per job, the whole config as plain data, with the merged model_config
    under "merged" (None without a merge_dir). Skips the test when mindformers is missing."""
    if importlib.util.find_spec("mindformers") is None:
        pytest.skip("mindformers is not installed (it comes with the test extra: pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-c", _MINDFORMERS_SCRIPT, json.dumps(jobs)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@MF@@")]
    assert proc.returncode == 0 and lines, f"MindFormerConfig failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("@@MF@@"):])
