#!/usr/bin/env python
"""What MTP speculative decoding and the compile cache buy, measured on one model.

    python scripts/bench_speculative.py [--model DIR] [--repeats 3] [--out bench_speculative.json]

* decode: greedy generation of ``--max-tokens`` tokens for a batch of 1 and of 4 text
  prompts, with the engine's MTP speculation off and on (same loaded model, runs
  alternating, every shape compiled in an untimed warm-up first). Reports generated tok/s
  (prefill included, the same for both), the ratio, and the draft acceptance rate. The
  outputs of the two engines are checked to be identical.
* restart: a fresh process builds an engine with ``compile_cache_dir`` and serves one request,
  twice with the same (new) cache directory; reports seconds from engine construction to
  the finished request, cold versus warm.

The default model is the package's default (trained) model; acceptance needs trained MTP
weights, so a random model shows the cost of speculation, not its benefit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from statistics import median
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

logger = logging.getLogger("bench_speculative")

PROMPTS = [
    "The history of the Python programming language",
    "Once upon a time, in a small village by the sea,",
    "To install the package, run the following command",
    "The main idea of the chapter is that",
]

RESTART_PROBE = r"""
import json, sys, time
from deepseek_ms.api import load_model
from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_ms.engine.sampling import SamplingParams
model = load_model(sys.argv[1], progress=False)
start = time.perf_counter()
engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, compile_cache_dir=sys.argv[2]))
engine.add_request("r", list(range(1, 40)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
while engine.has_unfinished_requests():
    engine.step()
print(json.dumps({"seconds": time.perf_counter() - start, "replayed": engine.runner.warmup_graphs}))
"""


def _prompt_ids(llm, n: int) -> List[List[int]]:
    if llm.tokenizer is not None:
        return [llm.tokenizer.encode(p) for p in PROMPTS[:n]]
    return [[(13 * i + j) % (llm.model.config.vocab_size - 1) + 1 for j in range(24)] for i in range(n)]


def _generate(engine, prompts: List[List[int]], max_tokens: int):
    from deepseek_ms.engine.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    final = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
    seconds = time.perf_counter() - start
    return [final[i] for i in ids], seconds


def bench_decode(model_dir: str, repeats: int, max_tokens: int) -> Dict[str, dict]:
    from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
    from deepseek_ms.llm import LLM

    llm = LLM(model_dir, progress=False, max_num_seqs=4)
    engines = {"plain": llm.engine,
               "mtp": LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=4, num_speculative_tokens=1))}
    results: Dict[str, dict] = {}
    for batch in (1, 4):
        prompts = _prompt_ids(llm, batch)
        outputs = {}
        for name, engine in engines.items():  # warm-up: compile every shape of this workload
            outputs[name], _ = _generate(engine, prompts, max_tokens)
        times: Dict[str, List[float]] = {name: [] for name in engines}
        mtp = engines["mtp"]
        drafts0, accepted0 = mtp.num_draft_tokens, mtp.num_accepted_tokens
        for _ in range(repeats):
            for name, engine in engines.items():
                out, seconds = _generate(engine, prompts, max_tokens)
                assert out == outputs[name]
                times[name].append(seconds)
        drafts = mtp.num_draft_tokens - drafts0
        accepted = mtp.num_accepted_tokens - accepted0
        tokens = batch * max_tokens
        row = {name: {"tok_per_s": tokens / min(t), "median_tok_per_s": tokens / median(t), "seconds": t}
               for name, t in times.items()}
        row["identical_outputs"] = outputs["plain"] == outputs["mtp"]
        row["acceptance_rate"] = accepted / drafts if drafts else 0.0
        row["speedup"] = row["mtp"]["tok_per_s"] / row["plain"]["tok_per_s"]
        results[f"batch{batch}"] = row
    return results


def bench_restart(model_dir: str) -> Dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        probe = os.path.join(cache, "restart_probe.py")  # a file: MindSpore hashes the entry script
        with open(probe, "w") as f:
            f.write(RESTART_PROBE)
        for name in ("cold", "warm"):
            proc = subprocess.run([sys.executable, probe, model_dir, os.path.join(cache, "graphs")],
                                  capture_output=True, text=True, env=env, cwd=cache, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"restart probe failed:\n{proc.stderr[-2000:]}")
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["speedup"] = out["cold"]["seconds"] / out["warm"]["seconds"]
    return out


def main(argv=None) -> int:
    from deepseek_ms.cli import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default="bench_speculative.json")
    ap.add_argument("--skip-restart", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    report = {"model": args.model, "loadavg_start": open("/proc/loadavg").read().split()[:3],
              "decode": bench_decode(args.model, args.repeats, args.max_tokens)}
    if not args.skip_restart:
        report["restart"] = bench_restart(args.model)
    report["loadavg_end"] = open("/proc/loadavg").read().split()[:3]

    lines = ["| greedy decode | plain tok/s | MTP speculation tok/s | speedup | acceptance | identical |",
             "|---|---|---|---|---|---|"]
    for name, row in report["decode"].items():
        lines.append(f"| {name} | {row['plain']['tok_per_s']:.1f} | {row['mtp']['tok_per_s']:.1f} | "
                     f"{row['speedup']:.2f}x | {row['acceptance_rate']:.0%} | {row['identical_outputs']} |")
    if "restart" in report:
        r = report["restart"]
        lines += ["", "| engine start + first request | cold | warm (compile cache) | speedup |", "|---|---|---|---|",
                  f"| seconds | {r['cold']['seconds']:.1f} | {r['warm']['seconds']:.1f} "
                  f"({r['warm']['replayed']} graphs replayed) | {r['speedup']:.1f}x |"]
    print("\n".join(lines))
    print(f"load average start {report['loadavg_start']} end {report['loadavg_end']} (2 cores: >2 means contention)")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
