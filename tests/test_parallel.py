"""Tensor, expert and data parallel under msrun on CPU ranks, against the single-process model.

Two launches (msrun is expensive; each runs several layouts): 2 ranks with TP=2, TP=2 x EP=2
(V3 only) and data-parallel attention with EP=2, then 4 ranks with DP=2 x TP=2 x EP=2
(moe_tp 2). On every rank: prompt logits within 1e-5 of the single-process model,
identical greedy tokens, and parameter bytes equal to the share the layout assigns that
rank; where listed, MTP logits, a one-row batch padded over the data-parallel ranks, and
two greedy requests served by the engine in lockstep (rank 0 schedules and broadcasts
every runner call).
"""
import glob
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import fixture_dir, load_fixture_model

pytest.importorskip("mindspore")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3, V2_LITE = "deepseek_v3_tiny", "deepseek_v2_lite_tiny"
# ranks -> specs (parallel_config, fixtures, extra checks); see parallel_worker.py
LAUNCHES = {
    2: [{"parallel": {"model_parallel": 2}, "models": [V3, V2_LITE], "checks": ["mtp", "engine"]},
        {"parallel": {"model_parallel": 2, "expert_parallel": 2}, "models": [V3]},
        {"parallel": {"data_parallel": 2, "expert_parallel": 2}, "models": [V3, V2_LITE], "checks": ["row1"]}],
    4: [{"parallel": {"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2}, "models": [V3, V2_LITE],
         "checks": ["row1", "mtp"]}],
}
CASES = [(n, spec["parallel"], model) for n, specs in LAUNCHES.items() for spec in specs for model in spec["models"]]
IDS = [f"{n}ranks-{'_'.join(f'{k}{v}' for k, v in sorted(p.items()))}-{m}" for n, p, m in CASES]


def _tag(parallel):
    return "_".join(f"{k}{v}" for k, v in sorted(parallel.items()))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch each msrun job once (through scripts/msrun_launcher.sh) and return its output dir."""
    out = {}
    env = dict(os.environ, VIRTUAL_ENV=sys.prefix)  # msrun runs `python` from PATH: this interpreter's env
    env.pop("PYTHONPATH", None)
    for n, specs in LAUNCHES.items():
        d = tmp_path_factory.mktemp(f"msrun{n}")
        # the launcher splits its command on spaces, so the specs are compact JSON
        command = " ".join([os.path.join(REPO, "tests", "parallel_worker.py"), str(d)]
                           + [json.dumps(spec, separators=(",", ":")) for spec in specs])
        proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "msrun_launcher.sh"), command,
                               str(n), str(n), "127.0.0.1", str(_free_port()), "0", str(d / "log"), "True", "300"],
                              env=env, cwd=str(d), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
        expected = [f"{_tag(spec['parallel'])}_{m}_rank{r}.npz" for spec in specs for m in spec["models"]
                    for r in range(n)]
        missing = [e for e in expected if not (d / e).exists()]
        if proc.returncode or missing:
            logs = "".join(open(f).read()[-3000:] for f in sorted(glob.glob(str(d / "log" / "worker_*.log"))))
            pytest.fail(f"msrun with {n} ranks failed (rc {proc.returncode}, missing {missing[:3]}):\n{logs}")
        out[n] = d
    return out


# Sharded matmuls sum in another order than the single process (partial sums, then the
# all-reduce): logits of magnitude ~3 differ by fp32 rounding, up to about 1e-5.
TOL = dict(atol=3e-5, rtol=0)


def _results(runs, n, layout, model):
    return [np.load(runs[n] / f"{_tag(layout)}_{model}_rank{r}.npz") for r in range(n)]


@pytest.mark.parametrize("n,layout,model", CASES, ids=IDS)
def test_every_rank_matches_single_process(runs, n, layout, model):
    single = load_fixture_model(model)
    ids = np.load(fixture_dir(model) / "golden.npz")["input_ids"]
    ref_logits = single.logits(ids)
    ref_greedy = single.generate(ids, max_new_tokens=8)
    for r, res in enumerate(_results(runs, n, layout, model)):
        np.testing.assert_allclose(res["logits"], ref_logits, **TOL, err_msg=f"rank {r}")
        np.testing.assert_array_equal(res["greedy"], ref_greedy, err_msg=f"rank {r}")
        if "logits_row1" in res:
            np.testing.assert_allclose(res["logits_row1"], ref_logits[1:], **TOL, err_msg=f"rank {r}")
        if "mtp_logits" in res:
            np.testing.assert_allclose(res["mtp_logits"], single.mtp_logits(ids), **TOL)
        if r == 0 and "engine_tokens" in res:  # the engine in lockstep: rank 0 schedules and samples
            np.testing.assert_array_equal(res["engine_tokens"], ref_greedy[:, ids.shape[1]:])


def _expected_elements(name, shape, config, layout):
    """What one rank holds of a checkpoint tensor, from the layout's rules (not from the model)."""
    tp = layout.get("model_parallel", 1)
    ep = layout.get("expert_parallel", 1)
    moe_tp = tp * layout.get("data_parallel", 1) // ep
    size = int(np.prod(shape))
    if re.search(r"\.mlp\.experts\.\d+\.", name):
        return size // ep // moe_tp  # a 1/ep share of the experts, each a 1/moe_tp slice
    if re.search(r"(embed_tokens|lm_head|q_proj|q_b_proj|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$", name):
        return size // tp
    return size  # norms, q_a/kv_a projections, routers, MTP eh_proj: replicated


@pytest.mark.parametrize("n,layout,model", CASES, ids=IDS)
def test_weight_bytes_per_rank_are_the_expected_share(runs, n, layout, model):
    from deepseek_ms.checkpoint.safetensors_io import CheckpointReader
    from deepseek_ms.kernels import cpu

    single = load_fixture_model(model)
    config = single.config
    mtp_copies = tuple(f"model.layers.{config.num_hidden_layers + k}.{t}"
                       for k in range(config.num_nextn_predict_layers) for t in ("embed_tokens", "shared_head.head"))
    native = cpu.load() is not None

    def itemsize(reader, name):
        # under the native kernels the loader keeps a BF16 checkpoint's routed experts and
        # projections (but kv_b_proj, which the absorbed decode kernel reads as fp32) in bf16
        projection = re.search(r"(_proj|kv_a_proj_with_mqa|lm_head)\.weight$", name) and ".kv_b_proj." not in name
        expert = re.search(r"\.mlp\.experts\.\d+\.", name)
        if native and (expert or projection) and reader.dtype(name) == "BF16":
            return 2
        return np.dtype(config.param_dtype).itemsize

    with CheckpointReader(str(fixture_dir(model))) as reader:
        expected = sum(_expected_elements(name, reader.shape(name), config, layout) * itemsize(reader, name)
                       for name in reader.logical_names() if not name.startswith(mtp_copies))
    full = sum(p.nbytes for p in single.net.get_parameters())
    for r, res in enumerate(_results(runs, n, layout, model)):
        assert int(res["weight_bytes"]) == expected, f"rank {r}"
    assert int(res["weight_bytes"]) < full
