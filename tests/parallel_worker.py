"""msrun worker for tests/test_parallel.py: every rank loads fixtures under parallel layouts
and saves what the test compares with the single-process model.

usage: parallel_worker.py OUT_DIR SPEC_JSON [SPEC_JSON ...]
SPEC_JSON: {"parallel": {parallel_config}, "models": [fixture names], "checks": [...]}
with optional checks "row1" (a one-row batch, padded over data-parallel ranks), "mtp" (MTP
logits) and "engine" (two greedy requests through the engine in lockstep).
"""
import json
import os
import sys

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NEW_TOKENS = 8


def tag(parallel):
    return "_".join(f"{k}{v}" for k, v in sorted(parallel.items()))


def run_engine(model, ids):
    """Greedy engine outputs for each prompt row (rank 0 schedules; other ranks follow)."""
    from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
    from deepseek_ms.engine.sampling import SamplingParams
    from deepseek_ms.parallel.lockstep import lockstep, release

    engine = LLMEngine(model, None, EngineConfig(num_blocks=16, max_num_seqs=4))
    tokens = np.full((ids.shape[0], NEW_TOKENS), -1, dtype=np.int64)
    if lockstep(engine):
        for i, row in enumerate(ids):
            engine.add_request(str(i), row.tolist(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                                     ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[int(out.request_id)] = out.token_ids
        release(engine)
    return tokens


def main(out_dir, specs):
    import deepseek_ms

    for spec in specs:
        checks = set(spec.get("checks", ()))
        for name in spec["models"]:
            model = deepseek_ms.load_model(os.path.join(FIXTURES, name), parallel_config=spec["parallel"],
                                           progress=False)
            ids = np.load(os.path.join(FIXTURES, name, "golden.npz"))["input_ids"]
            res = {"weight_bytes": np.int64(sum(p.nbytes for p in model.net.get_parameters())),
                   "logits": model.logits(ids),
                   "greedy": model.generate(ids, max_new_tokens=NEW_TOKENS)}
            if "row1" in checks:
                res["logits_row1"] = model.logits(ids[1:])
            if "mtp" in checks and model.config.num_nextn_predict_layers:
                res["mtp_logits"] = model.mtp_logits(ids)
            if "engine" in checks:
                res["engine_tokens"] = run_engine(model, ids)
            np.savez(os.path.join(out_dir, f"{tag(spec['parallel'])}_{name}_rank{model.layout.rank}.npz"), **res)


if __name__ == "__main__":
    main(sys.argv[1], [json.loads(a) for a in sys.argv[2:]])
