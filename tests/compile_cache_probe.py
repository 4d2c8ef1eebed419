"""Run in a fresh process by test_compile_cache.py: an engine with a compile cache serves a
few greedy requests; prints the outputs and how long the start-up warm-up took."""
import json
import sys
import time

from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_ms.engine.sampling import SamplingParams
from helpers import load_fixture_model

cache_dir, prompt_lengths = sys.argv[1], [int(n) for n in sys.argv[2].split(",")]
model = load_fixture_model("deepseek_v3_tiny")
start = time.perf_counter()
engine = LLMEngine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64,
                                             num_blocks=16, compile_cache_dir=cache_dir))
for n in prompt_lengths:
    engine.add_request(f"len{n}", [(7 * n + j) % 500 + 1 for j in range(n)],
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
outputs = {}
while engine.has_unfinished_requests():
    for out in engine.step():
        if out.finished:
            outputs[out.request_id] = out.token_ids
print(json.dumps({"outputs": outputs, "warmup_seconds": engine.runner.warmup_seconds,
                  "warmup_graphs": engine.runner.warmup_graphs,
                  "graphs": len(engine.runner._compiled), "seconds": time.perf_counter() - start}))
