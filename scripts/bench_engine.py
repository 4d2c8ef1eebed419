#!/usr/bin/env python
"""Engine benchmark: deepseek-ms against HF transformers on the same mid-size DeepSeek-V3 weights.

    python scripts/bench_engine.py [--quick] [--repeats N] [--out bench_engine.json]
                                   [--hf-python /path/to/python] [--skip-hf]
                                   [--only prefill,decode1,decode8,agg16,agg64]

Model: a DeepSeek-V3-shaped HF folder with seeded random weights stored in BF16, as DeepSeek
ships its checkpoints (the router's e_score_correction_bias in F32, as in V3) (vocab 32000, hidden
1024, 8 layers with the first dense (intermediate 2816), 16 heads, q_lora 512, kv_lora 256,
nope/rope/v 64/32/64, 16 routed experts top-2 in 4 groups keeping 2, 1 shared expert,
moe_intermediate 512, noaux_tc sigmoid router with a small random e_score_correction_bias,
YaRN factor 4 over 1024, max_position_embeddings 4096). It is written once with numpy into
the cache folder (default .cache/bench_model/) and reused while its spec matches. Both sides
compute in fp32 on the same values: HF ("fp32") loads every weight as fp32; deepseek-ms keeps
the routed experts in bf16 (widened in registers) and the rest in fp32.

Cells (rows of the table):

* prefill: a 512-token prompt. deepseek-ms: time to first token of one request through the
  engine (add_request + the step(s) that run the prompt). HF: ``model(ids, use_cache=True,
  logits_to_keep=1)``. tok/s = 512 / median over ``iters`` prompts in one run.
* decode1 / decode8: B requests with 128-token prompts. deepseek-ms: admitted together, and
  once every prompt is prefilled, B / median time of the next 64 engine steps. HF: B / median
  interval between LogitsProcessor calls of a 64-token greedy ``generate``.
* agg16 / agg64: N concurrent requests (128-token random prompts, 64 new tokens each, all
  submitted at t0): generated tokens / wall time until all finish, engine max_num_seqs 16 for
  N=16 and ``--agg64-seqs`` (default 64) for N=64. HF has no continuous batching; its column
  repeats its batch-8 decode rate (the comparison point the bars use).

Every shape is compiled in an untimed warm-up run of the same workload before timing. Runs
alternate deepseek-ms and HF (fp32, bf16) cell by cell, ``--repeats`` times. Before each run
the benchmark waits (up to ``--quiet-wait`` s) for other processes to use < 0.2 cores; each
timed region records other processes' CPU from /proc/stat minus our own rusage, and a run
with more than 0.2 foreign cores is "contaminated". Each cell reports the best clean run (and
the median of clean runs); cells without a clean run are flagged.

Bars (ratios from this one invocation, best clean runs): deepseek-ms fp32 decode at batch 1
>= 1.3x HF fp32; aggregate with 16 concurrent requests >= 3x HF fp32 batch-8 decode; prefill
>= 1.2x HF fp32.

The HF side runs `scripts/bench_hf_worker.py` under ``--hf-python`` (default:
$DEEPSEEK_MS_HF_PYTHON, else /tmp/envs/ref311/bin/python), a venv with torch + transformers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bench_hf_worker import (CONTAMINATION_CORES, CpuWindow, median, percentile,  # noqa: E402
                             wait_for_quiet)

logger = logging.getLogger("bench_engine")

DEFAULT_HF_PYTHON = "/tmp/envs/ref311/bin/python"
CELLS = ("prefill", "decode1", "decode8", "agg16", "agg64")
CELL_LABELS = {
    "prefill": "prefill 512 tok/s",
    "decode1": "decode b1 tok/s",
    "decode8": "decode b8 tok/s",
    "agg16": "aggregate 16 req tok/s",
    "agg64": "aggregate 64 req tok/s",
}
COLUMNS = ("ds_fp32", "hf_fp32", "hf_bf16")
COLUMN_LABELS = {"ds_fp32": "deepseek-ms fp32", "hf_fp32": "HF fp32", "hf_bf16": "HF bf16"}
# the HF measurement each cell is compared with (HF has no continuous batching)
HF_CELL = {"prefill": "prefill", "decode1": "decode1", "decode8": "decode8", "agg16": "decode8",
           "agg64": "decode8"}
BARS = (
    ("decode1", "decode1", 1.3, "deepseek-ms fp32 decode b1 >= 1.3x HF fp32 decode b1"),
    ("agg16", "decode8", 3.0, "deepseek-ms aggregate 16 req >= 3x HF fp32 decode b8"),
    ("prefill", "prefill", 1.2, "deepseek-ms prefill 512 >= 1.2x HF fp32 prefill 512"),
)

# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

MODEL_CONFIG: Dict[str, Any] = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=8, first_k_dense_replace=1, moe_layer_freq=1,
    num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=4096, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0, initializer_range=0.02,
    use_cache=True, torch_dtype="bfloat16",
)
INIT_SCHEME = ("linear N(0,1/in); lm_head N(0,1/in); embedding N(0,1); RMSNorm weights 1; "
               "router N(0,1/H); e_score_correction_bias N(0,0.01^2); per-tensor seed (seed, crc32(name))")
SPEC_VERSION = 2  # 2: BF16 tensors (1: F32)
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "bench_spec.json"


def model_tensor_shapes(cfg: Dict[str, Any]) -> Dict[str, tuple]:
    """HF DeepseekV3ForCausalLM tensor names -> shapes for `cfg`."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, dn, dr, dv = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                      cfg["v_head_dim"])
    rq, rkv = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    E, Im, S = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["n_shared_experts"]
    shapes: Dict[str, tuple] = {
        "model.embed_tokens.weight": (V, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (V, H),
    }
    for i in range(L):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        a = p + "self_attn."
        shapes[a + "q_a_proj.weight"] = (rq, H)
        shapes[a + "q_a_layernorm.weight"] = (rq,)
        shapes[a + "q_b_proj.weight"] = (nh * (dn + dr), rq)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (rkv + dr, H)
        shapes[a + "kv_a_layernorm.weight"] = (rkv,)
        shapes[a + "kv_b_proj.weight"] = (nh * (dn + dv), rkv)
        shapes[a + "o_proj.weight"] = (H, nh * dv)
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            shapes[m + "gate_proj.weight"] = (inter, H)
            shapes[m + "up_proj.weight"] = (inter, H)
            shapes[m + "down_proj.weight"] = (H, inter)
            continue
        shapes[m + "gate.weight"] = (E, H)
        shapes[m + "gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            x = f"{m}experts.{e}."
            shapes[x + "gate_proj.weight"] = (Im, H)
            shapes[x + "up_proj.weight"] = (Im, H)
            shapes[x + "down_proj.weight"] = (H, Im)
        shapes[m + "shared_experts.gate_proj.weight"] = (S * Im, H)
        shapes[m + "shared_experts.up_proj.weight"] = (S * Im, H)
        shapes[m + "shared_experts.down_proj.weight"] = (H, S * Im)
    return shapes


def init_tensor(name: str, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return np.ones(shape, dtype=np.float32)
    if name.endswith("e_score_correction_bias"):
        return (0.01 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    x = rng.standard_normal(shape, dtype=np.float32)
    if name == "model.embed_tokens.weight":
        return x
    x *= np.float32(1.0 / np.sqrt(shape[1]))  # Linear [out, in] and the router [E, H]
    return x


def bench_spec(seed: int) -> Dict[str, Any]:
    return {"version": SPEC_VERSION, "seed": seed, "init": INIT_SCHEME, "config": MODEL_CONFIG}


def ensure_model(cache_dir: str, seed: int) -> Dict[str, Any]:
    """Write the benchmark model into `cache_dir` unless a folder with the same spec is there."""
    spec = bench_spec(seed)
    spec_path = os.path.join(cache_dir, SPEC_FILE)
    weights = os.path.join(cache_dir, WEIGHTS_FILE)
    if os.path.isfile(spec_path) and os.path.isfile(weights):
        try:
            with open(spec_path) as f:
                if json.load(f) == spec:
                    logger.info("reusing benchmark model in %s", cache_dir)
                    return {"path": cache_dir, "generated": False, "generate_s": 0.0}
        except (OSError, ValueError):
            pass
        logger.info("benchmark model in %s does not match the current spec: regenerating", cache_dir)
    from deepseek_ms.checkpoint import write_safetensors

    t0 = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(cache_dir))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shapes = model_tensor_shapes(MODEL_CONFIG)
    logger.info("generating %d tensors (%.1f M parameters, seed %d) into %s", len(shapes),
                sum(int(np.prod(s)) for s in shapes.values()) / 1e6, seed, cache_dir)
    tensors = {name: init_tensor(name, shape, seed) for name, shape in shapes.items()}
    dtypes = {name: "F32" if name.endswith("e_score_correction_bias") else "BF16" for name in tensors}
    write_safetensors(os.path.join(tmp, WEIGHTS_FILE), tensors, dtypes=dtypes, metadata={"format": "pt"})
    del tensors
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": MODEL_CONFIG["bos_token_id"], "eos_token_id": MODEL_CONFIG["eos_token_id"],
                   "do_sample": False}, f, indent=2)
    with open(os.path.join(tmp, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=2)
    if os.path.exists(cache_dir):
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    dt = time.perf_counter() - t0
    logger.info("wrote the benchmark model in %.1f s", dt)
    return {"path": cache_dir, "generated": True, "generate_s": dt}


# ----------------------------------------------------------------------------------------------
# workload parameters
# ----------------------------------------------------------------------------------------------

def workload(quick: bool) -> Dict[str, int]:
    return {
        "prefill_len": 512,
        "prefill_iters": 2 if quick else 3,
        "decode_prompt_len": 128,
        "decode_steps": 16 if quick else 64,
        "agg_prompt_len": 128,
        "agg_max_tokens": 16 if quick else 64,
    }


# ----------------------------------------------------------------------------------------------
# deepseek-ms side
# ----------------------------------------------------------------------------------------------

class DSBench:
    def __init__(self, folder: str, wl: Dict[str, int], agg64_seqs: int, max_model_len: int,
                 cache_bytes: int):
        import deepseek_ms

        t0 = time.perf_counter()
        self.model = deepseek_ms.load_model(folder, progress=False)
        self.load_s = time.perf_counter() - t0
        self.wl = wl
        self.vocab = self.model.config.vocab_size
        self.agg64_seqs = agg64_seqs
        self.max_model_len = max_model_len
        self.cache_bytes = cache_bytes
        self._engines: Dict[int, Any] = {}
        self._ids = 0

    def engine(self, max_num_seqs: int):
        if max_num_seqs not in self._engines:
            from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
            cfg = EngineConfig(max_num_seqs=max_num_seqs,
                               cache_memory_bytes=self.cache_bytes, max_model_len=self.max_model_len)
            self._engines[max_num_seqs] = LLMEngine(self.model, None, cfg)
        return self._engines[max_num_seqs]

    def engine_configs(self) -> Dict[str, Any]:
        out = {}
        for seqs, eng in self._engines.items():
            c = eng.config
            out[str(seqs)] = {"max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens,
                              "cache_memory_bytes": c.cache_memory_bytes, "max_model_len": eng.max_model_len,
                              "block_size": c.block_size, "enable_chunked_prefill": c.enable_chunked_prefill,
                              "enable_prefix_caching": c.enable_prefix_caching}
        return out

    def _prompt(self, length: int, seed: int) -> List[int]:
        return np.random.default_rng(seed).integers(2, self.vocab, size=length).tolist()

    def _rid(self, tag: str) -> str:
        self._ids += 1
        return f"{tag}-{self._ids}"

    @staticmethod
    def _drain(engine) -> None:
        while engine.has_unfinished_requests():
            engine.step()

    def prefill(self, seed: int) -> dict:
        from deepseek_ms.engine.sampling import SamplingParams
        engine = self.engine(16)
        n, iters = self.wl["prefill_len"], self.wl["prefill_iters"]
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        times, steps = [], []
        prompts = [self._prompt(n, seed * 1000 + i) for i in range(iters)]
        with CpuWindow() as w:
            for prompt in prompts:
                rid = self._rid("prefill")
                t = time.perf_counter()
                engine.add_request(rid, prompt, params)
                k = 0
                while True:
                    outs = engine.step()
                    k += 1
                    if any(o.request_id == rid and o.new_token_ids for o in outs):
                        break
                    if not engine.has_unfinished_requests():
                        raise RuntimeError("prefill request finished without a token")
                times.append(time.perf_counter() - t)
                steps.append(k)
                self._drain(engine)
        med = median(times)
        return {"op": "prefill", "prompt_len": n, "times_s": times, "steps": steps, "median_s": med,
                "tok_per_s": n / med, "cpu": w.result}

    def decode(self, batch: int, seed: int) -> dict:
        from deepseek_ms.engine.sampling import SamplingParams
        engine = self.engine(16 if batch <= 16 else self.agg64_seqs)
        P, n_steps = self.wl["decode_prompt_len"], self.wl["decode_steps"]
        params = SamplingParams(temperature=0.0, max_tokens=n_steps + 32, ignore_eos=True)
        rids = [self._rid(f"decode{batch}") for _ in range(batch)]
        for i, rid in enumerate(rids):
            engine.add_request(rid, self._prompt(P, seed * 1000 + i), params)
        got = {rid: 0 for rid in rids}
        warm_steps = 0
        t_admit = time.perf_counter()
        while min(got.values()) == 0:
            for o in engine.step():
                got[o.request_id] += len(o.new_token_ids)
            warm_steps += 1
        admit_s = time.perf_counter() - t_admit
        step_times, short_steps = [], 0
        with CpuWindow() as w:
            for _ in range(n_steps):
                t = time.perf_counter()
                outs = engine.step()
                step_times.append(time.perf_counter() - t)
                if sum(len(o.new_token_ids) for o in outs) != batch:
                    short_steps += 1
        for rid in rids:
            engine.abort(rid)
        self._drain(engine)
        med = median(step_times)
        return {"op": "decode", "batch": batch, "prompt_len": P, "decode_steps": n_steps,
                "step_times_s": step_times, "median_step_s": med, "p10_step_s": percentile(step_times, 0.1),
                "p90_step_s": percentile(step_times, 0.9), "tok_per_s": batch / med,
                "prefill_steps": warm_steps, "prefill_phase_s": admit_s,
                "steps_not_producing_batch_tokens": short_steps, "cpu": w.result}

    def aggregate(self, num_requests: int, seed: int) -> dict:
        from deepseek_ms.engine.sampling import SamplingParams
        seqs = 16 if num_requests <= 16 else self.agg64_seqs
        engine = self.engine(seqs)
        P, max_tokens = self.wl["agg_prompt_len"], self.wl["agg_max_tokens"]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        prompts = [self._prompt(P, seed * 1000 + i) for i in range(num_requests)]
        rids = [self._rid(f"agg{num_requests}") for _ in range(num_requests)]
        tokens = 0
        n_steps = 0
        first_token: Dict[str, float] = {}
        finished: Dict[str, float] = {}
        preempt0 = engine.stats().get("num_preemptions", 0)
        with CpuWindow() as w:
            t0 = time.perf_counter()
            for rid, prompt in zip(rids, prompts):
                engine.add_request(rid, prompt, params)
            decode_phase = None  # (time, tokens) when the last prompt got its first token
            while engine.has_unfinished_requests():
                outs = engine.step()
                n_steps += 1
                now = time.perf_counter() - t0
                for o in outs:
                    if o.new_token_ids:
                        tokens += len(o.new_token_ids)
                        first_token.setdefault(o.request_id, now)
                    if o.finished:
                        finished[o.request_id] = now
                if decode_phase is None and len(first_token) == num_requests:
                    decode_phase = (now, tokens)
            wall = time.perf_counter() - t0
        expected = num_requests * max_tokens
        ttft = sorted(first_token.values())
        return {"op": "aggregate", "num_requests": num_requests, "max_num_seqs": seqs, "prompt_len": P,
                "max_tokens": max_tokens, "generated_tokens": tokens, "expected_tokens": expected,
                "wall_s": wall, "tok_per_s": tokens / wall, "steps": n_steps,
                # after every prompt is prefilled: the decode-only rate of the same run
                "decode_phase_s": wall - decode_phase[0] if decode_phase else float("nan"),
                "decode_phase_tok_per_s": ((tokens - decode_phase[1]) / (wall - decode_phase[0])
                                           if decode_phase and wall > decode_phase[0] else float("nan")),
                "ttft_median_s": median(ttft), "ttft_max_s": ttft[-1] if ttft else float("nan"),
                "preemptions": engine.stats().get("num_preemptions", 0) - preempt0, "cpu": w.result}

    def reset(self) -> None:
        """After a failed run: abort whatever is left so the next run starts from an idle engine."""
        for engine in self._engines.values():
            try:
                for rid in list(engine.scheduler.requests):
                    engine.abort(rid)
                self._drain(engine)
            except Exception:  # noqa: BLE001
                logger.exception("could not reset an engine")

    def run(self, cell: str, seed: int) -> dict:
        if cell == "prefill":
            return self.prefill(seed)
        if cell == "decode1":
            return self.decode(1, seed)
        if cell == "decode8":
            return self.decode(8, seed)
        if cell == "agg16":
            return self.aggregate(16, seed)
        if cell == "agg64":
            return self.aggregate(64, seed)
        raise ValueError(cell)


# ----------------------------------------------------------------------------------------------
# HF side: a worker process per dtype, driven over JSON lines
# ----------------------------------------------------------------------------------------------

class HFWorker:
    def __init__(self, python: str, model_dir: str, dtype: str, log_path: str):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.dtype = dtype
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [python, "-u", os.path.join(HERE, "bench_hf_worker.py"), "--model", model_dir, "--dtype", dtype,
             "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True,
            bufsize=1)
        self.info: Optional[dict] = None
        self.error: Optional[str] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.poll()
            raise RuntimeError(f"HF {self.dtype} worker exited (rc {rc}); see {self.log_path}: "
                               f"{self._tail()}")
        return json.loads(line)

    def _tail(self, n: int = 400) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:].strip().replace("\n", " | ")
        except OSError:
            return ""

    def wait_ready(self) -> bool:
        try:
            msg = self._read()
        except Exception as e:  # noqa: BLE001
            self.error = str(e)
            return False
        if not msg.get("ok"):
            self.error = msg.get("error", "worker failed to load")
            return False
        self.info = msg
        return True

    def call(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        if not msg.get("ok"):
            raise RuntimeError(f"HF {self.dtype} worker: {msg.get('error')}")
        return msg

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def hf_command(cell: str, wl: Dict[str, int], seed: int) -> dict:
    if cell == "prefill":
        return {"op": "prefill", "prompt_len": wl["prefill_len"], "iters": wl["prefill_iters"], "seed": seed}
    batch = {"decode1": 1, "decode8": 8}[cell]
    # N new tokens give N-1 single-token forward intervals (63 for the 64-token generate)
    return {"op": "decode", "batch": batch, "prompt_len": wl["decode_prompt_len"],
            "new_tokens": wl["decode_steps"], "seed": seed}


# ----------------------------------------------------------------------------------------------
# summary / report
# ----------------------------------------------------------------------------------------------

def summarize(runs: List[dict]) -> dict:
    vals = [r for r in runs if r.get("tok_per_s") is not None]
    clean = [r["tok_per_s"] for r in vals if not r["contaminated"]]
    allv = [r["tok_per_s"] for r in vals]
    out = {"n_runs": len(vals), "n_clean": len(clean)}
    if clean:
        out.update(best=max(clean), median_clean=median(clean), clean=True)
    elif allv:
        out.update(best=max(allv), median_clean=None, clean=False)
    else:
        out.update(best=None, median_clean=None, clean=False)
    out["all_tok_per_s"] = allv
    return out


def fmt_cell(s: Optional[dict], note: Optional[str] = None) -> str:
    if s is None:
        return note or "-"
    if s.get("best") is None:
        return "not run"
    text = f"{s['best']:.1f}"
    if not s["clean"]:
        text += " (!)"
    return text


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"nproc": os.cpu_count(), "platform": platform.platform(),
                            "python": sys.version.split()[0], "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu_model" not in info:
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and "cpu_flags" not in info:
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
                if "cpu_model" in info and "cpu_flags" in info:
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
        info["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    except (OSError, ValueError, IndexError):
        pass
    try:
        from importlib.metadata import version
        info["mindspore"] = version("mindspore")
    except Exception:  # noqa: BLE001
        info["mindspore"] = None
    try:
        import deepseek_ms
        info["deepseek_ms"] = deepseek_ms.__version__
    except Exception:  # noqa: BLE001
        info["deepseek_ms"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout
        info["git_dirty_files"] = len(dirty.splitlines())
    except Exception:  # noqa: BLE001
        pass
    return info


def render_table(summary: Dict[str, Dict[str, Optional[dict]]], cells: List[str],
                 hf_status: Dict[str, str]) -> str:
    header = ["", *(COLUMN_LABELS[c] for c in COLUMNS), "ds / HF fp32"]
    rows = [header]
    for cell in cells:
        row = [CELL_LABELS[cell]]
        for col in COLUMNS:
            if col == "ds_fp32":
                row.append(fmt_cell(summary[cell].get(col)))
            elif hf_status.get(col) != "ok":
                row.append("not run")
            else:
                text = fmt_cell(summary[cell].get(col))
                if HF_CELL[cell] != cell and text != "not run":
                    text += " (b8)"
                row.append(text)
        ds, hf = summary[cell].get("ds_fp32"), summary[cell].get("hf_fp32")
        if ds and hf and ds.get("best") and hf.get("best") and hf_status.get("hf_fp32") == "ok":
            ratio = ds["best"] / hf["best"]
            row.append(f"{ratio:.2f}x" + ("" if ds["clean"] and hf["clean"] else " (!)"))
        else:
            row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="deepseek-ms engine vs HF transformers benchmark",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps/tokens, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3; 1 with --quick)")
    ap.add_argument("--out", default="bench_engine.json", help="JSON results file")
    ap.add_argument("--hf-python", default=os.environ.get("DEEPSEEK_MS_HF_PYTHON") or DEFAULT_HF_PYTHON,
                    help="python of the HF venv (torch + transformers)")
    ap.add_argument("--skip-hf", action="store_true", help="deepseek-ms only")
    ap.add_argument("--skip-ds", action="store_true", help="HF only (the deepseek-ms columns are 'not run')")
    ap.add_argument("--only", default=",".join(CELLS), help=f"comma-separated cells from {','.join(CELLS)}")
    ap.add_argument("--hf-dtypes", default="fp32,bf16", help="HF dtypes to run (fp32,bf16)")
    ap.add_argument("--cache-dir", default=os.path.join(REPO, ".cache", "bench_model"),
                    help="where the benchmark model is written / reused")
    ap.add_argument("--seed", type=int, default=1234, help="weight seed")
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="max seconds to wait for a quiet CPU per run")
    ap.add_argument("--agg64-seqs", type=int, default=64, help="engine max_num_seqs for the 64-request run")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--cache-mib", type=int, default=256, help="engine KV cache budget per engine (MiB)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    cells = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        ap.error(f"--only: unknown cell(s) {bad}; choose from {','.join(CELLS)}")
    args.cells = [c for c in CELLS if c in cells]
    args.hf_dtype_list = [d.strip() for d in args.hf_dtypes.split(",") if d.strip()]
    if any(d not in ("fp32", "bf16") for d in args.hf_dtype_list):
        ap.error("--hf-dtypes: fp32 and/or bf16")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    t_start = time.perf_counter()
    wl = workload(args.quick)
    cells = args.cells
    hf_cells = sorted({HF_CELL[c] for c in cells}, key=CELLS.index)
    result: Dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k not in ("cells", "hf_dtype_list")},
        "cells": cells, "workload": wl, "contamination_threshold_cores": CONTAMINATION_CORES,
        "machine": machine_info(), "runs": [], "warmup": {}, "errors": [],
    }
    model_info = ensure_model(args.cache_dir, args.seed)
    shapes = model_tensor_shapes(MODEL_CONFIG)
    model_info["num_parameters"] = int(sum(int(np.prod(s)) for s in shapes.values()))
    model_info["config"] = MODEL_CONFIG
    model_info["init"] = INIT_SCHEME
    result["model"] = model_info

    # ---- HF workers (loading overlaps the deepseek-ms load) ----
    workers: Dict[str, HFWorker] = {}
    hf_status: Dict[str, str] = {}
    for d in ("fp32", "bf16"):
        col = f"hf_{d}"
        if args.skip_hf:
            hf_status[col] = "not run: --skip-hf"
        elif d not in args.hf_dtype_list:
            hf_status[col] = "not run: not in --hf-dtypes"
        elif not (os.path.isfile(args.hf_python) and os.access(args.hf_python, os.X_OK)):
            hf_status[col] = f"not run: HF python {args.hf_python} not found"
        else:
            log_path = os.path.splitext(os.path.abspath(args.out))[0] + f".hf_{d}.log"
            workers[col] = HFWorker(args.hf_python, args.cache_dir, d, log_path)
            hf_status[col] = "starting"

    ds: Optional[DSBench] = None
    ds_status = "not run: --skip-ds" if args.skip_ds else "ok"
    if not args.skip_ds:
        try:
            logger.info("loading the deepseek-ms model")
            ds = DSBench(args.cache_dir, wl, args.agg64_seqs, args.max_model_len, args.cache_mib * 2 ** 20)
            logger.info("deepseek-ms model loaded in %.1f s", ds.load_s)
            result["ds_load_s"] = ds.load_s
        except Exception as e:  # noqa: BLE001
            logger.exception("deepseek-ms load failed")
            ds_status = f"not run: load failed: {type(e).__name__}: {e}"
            result["errors"].append({"side": "ds", "stage": "load", "error": f"{type(e).__name__}: {e}"})

    for col, w in list(workers.items()):
        if w.wait_ready():
            hf_status[col] = "ok"
            logger.info("HF %s worker ready (pid %d, load %.1f s, torch %s, transformers %s, %d threads)",
                        w.dtype, w.pid, w.info["load_s"], w.info["torch"], w.info["transformers"],
                        w.info["torch_threads"])
        else:
            hf_status[col] = f"not run: worker failed: {w.error}"
            logger.error("HF %s worker failed: %s", w.dtype, w.error)
            w.close()
            del workers[col]
    result["hf_workers"] = {col: w.info for col, w in workers.items()}
    helper_pids = [w.pid for w in workers.values()]

    # ---- warm-up: every shape of every timed workload, untimed ----
    if ds is not None:
        for cell in cells:
            t = time.perf_counter()
            try:
                r = ds.run(cell, seed=10_000 + CELLS.index(cell))
                result["warmup"][f"ds_{cell}"] = {"wall_s": time.perf_counter() - t, "tok_per_s": r["tok_per_s"]}
                logger.info("warm-up ds %s: %.1f s (%.1f tok/s incl. compilation)", cell,
                            time.perf_counter() - t, r["tok_per_s"])
            except Exception as e:  # noqa: BLE001
                logger.exception("deepseek-ms warm-up of %s failed", cell)
                result["errors"].append({"side": "ds", "stage": f"warmup {cell}",
                                         "error": f"{type(e).__name__}: {e}"})
                ds_status = f"failed in warm-up of {cell}: {type(e).__name__}: {e}"
                ds = None
                break
        if ds is not None:
            result["ds_engines"] = ds.engine_configs()
    for col, w in list(workers.items()):
        t = time.perf_counter()
        try:
            w.call({"op": "warmup", "prompt_len": wl["prefill_len"]})
            result["warmup"][col] = {"wall_s": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001
            hf_status[col] = f"failed in warm-up: {e}"
            result["errors"].append({"side": col, "stage": "warmup", "error": str(e)})
            w.close()
            del workers[col]
    helper_pids = [w.pid for w in workers.values()]

    # ---- timed runs, alternating sides cell by cell ----
    def one_run(side: str, cell: str, rep: int) -> None:
        wait = wait_for_quiet(args.quiet_wait, own_pids=helper_pids)
        seed = 100 * rep + CELLS.index(cell)
        rec: Dict[str, Any] = {"side": side, "cell": cell, "repeat": rep, "quiet_wait": wait}
        try:
            if side == "ds_fp32":
                with CpuWindow(helper_pids) as outer:
                    res = ds.run(cell, seed)
            else:
                with CpuWindow() as outer:  # the driver's own CPU while the worker runs
                    res = workers[side].call(hf_command(cell, wl, seed))
            rec.update(res)
            rec["driver_cpu"] = outer.result
            rec["contaminated"] = bool(res["cpu"]["contaminated"])
            rec["others_cores"] = res["cpu"]["others_cores"]
            logger.info("%-8s %-8s rep %d: %8.1f tok/s  others %.2f cores%s%s", side, cell, rep, res["tok_per_s"],
                        res["cpu"]["others_cores"], "  CONTAMINATED" if rec["contaminated"] else "",
                        "" if wait["quiet"] else f"  (no quiet moment in {wait['waited_s']:.0f} s)")
        except Exception as e:  # noqa: BLE001
            logger.exception("%s %s rep %d failed", side, cell, rep)
            if side == "ds_fp32":
                ds.reset()
            rec.update(error=f"{type(e).__name__}: {e}", tok_per_s=None, contaminated=True)
            result["errors"].append({"side": side, "stage": f"{cell} rep {rep}", "error": rec["error"]})
        result["runs"].append(rec)

    for rep in range(args.repeats):
        for cell in cells:
            order: List[str] = []
            if ds is not None:
                order.append("ds_fp32")
            hf_here = [c for c in ("hf_fp32", "hf_bf16") if c in workers and HF_CELL[cell] == cell]
            order = order + hf_here if rep % 2 == 0 else hf_here + order
            for side in order:
                one_run(side, cell, rep)
        # HF's comparison point for the aggregate cells is its decode b8: make sure it ran
        for hcell in hf_cells:
            if hcell not in cells:
                for col in ("hf_fp32", "hf_bf16"):
                    if col in workers:
                        one_run(col, hcell, rep)

    for w in workers.values():
        w.close()

    # ---- summary ----
    summary: Dict[str, Dict[str, Optional[dict]]] = {}
    for cell in cells:
        summary[cell] = {}
        for col in COLUMNS:
            src = cell if col == "ds_fp32" else HF_CELL[cell]
            runs = [r for r in result["runs"] if r["side"] == col and r["cell"] == src]
            summary[cell][col] = summarize(runs) if runs else None
    bars = []
    for ds_cell, hf_cell, need, text in BARS:
        if ds_cell not in cells:
            continue
        ds_s = summary[ds_cell].get("ds_fp32")
        hf_s = summary[ds_cell].get("hf_fp32")
        bar = {"bar": text, "ds_cell": ds_cell, "hf_cell": hf_cell, "required": need}
        if not (ds_s and hf_s and ds_s.get("best") and hf_s.get("best")):
            bar.update(status="NOT EVALUATED", reason=f"deepseek-ms: {ds_status}; HF fp32: "
                                                     f"{hf_status.get('hf_fp32')}")
        else:
            ratio = ds_s["best"] / hf_s["best"]
            clean = ds_s["clean"] and hf_s["clean"]
            bar.update(ratio=ratio, clean=clean, status="PASS" if ratio >= need else "FAIL",
                       ds_tok_per_s=ds_s["best"], hf_tok_per_s=hf_s["best"])
            if ds_s.get("median_clean") and hf_s.get("median_clean"):
                bar["ratio_of_clean_medians"] = ds_s["median_clean"] / hf_s["median_clean"]
        bars.append(bar)
    contaminated_runs = [r for r in result["runs"] if r.get("contaminated")]
    result.update(summary=summary, bars=bars, hf_status=hf_status, ds_status=ds_status,
                  contaminated_runs=len(contaminated_runs), total_s=time.perf_counter() - t_start)

    # ---- report ----
    table = render_table(summary, cells, hf_status)
    print()
    print(f"deepseek-ms engine vs HF transformers  ({result['model']['num_parameters'] / 1e6:.1f} M params, "
          f"{'quick, ' if args.quick else ''}{args.repeats} repeat(s), best clean run per cell)")
    print(table)
    notes = []
    if any(s and not s["clean"] for cs in summary.values() for s in cs.values()):
        notes.append(f"(!) no clean run: other processes used > {CONTAMINATION_CORES} cores in every run "
                     "of this cell; the number shown is the best contaminated run")
    if any(HF_CELL[c] != c for c in cells):
        notes.append("(b8) HF has no continuous batching: its aggregate column is its batch-8 decode rate")
    for cell in ("agg16", "agg64"):
        ds_runs = [r for r in result["runs"] if r["side"] == "ds_fp32" and r["cell"] == cell
                   and math.isfinite(r.get("decode_phase_tok_per_s") or float("nan"))]
        hf_s = summary.get(cell, {}).get("hf_fp32")
        if ds_runs:
            rate = max(r["decode_phase_tok_per_s"] for r in ds_runs)
            vs = f", {rate / hf_s['best']:.2f}x HF fp32 b8" if hf_s and hf_s.get("best") else ""
            notes.append(f"{cell}: the rows above include prefilling every prompt; after the last prompt's "
                         f"first token deepseek-ms decodes at {rate:.1f} tok/s{vs} (not a bar)")
    if ds_status != "ok":
        notes.append(f"deepseek-ms: {ds_status}")
    for col, st in hf_status.items():
        if st != "ok":
            notes.append(f"{COLUMN_LABELS[col]}: {st}")
    dirty = [f"{r['side']} {r['cell']} rep {r['repeat']} ({r['others_cores']:.2f} cores)"
             for r in result["runs"] if r.get("contaminated") and r.get("others_cores") is not None]
    if dirty:
        notes.append("other processes were using the CPU during: " + ", ".join(dirty))
    for n in notes:
        print(n)
    print()
    for bar in bars:
        if bar["status"] == "NOT EVALUATED":
            print(f"  [NOT EVALUATED] {bar['bar']}: {bar['reason']}")
        else:
            print(f"  [{bar['status']}] {bar['bar']}: {bar['ratio']:.2f}x "
                  f"({bar['ds_tok_per_s']:.1f} vs {bar['hf_tok_per_s']:.1f} tok/s)"
                  + ("" if bar["clean"] else "  (from contaminated runs)"))
    n_runs = len(result["runs"])
    print()
    print(f"{len(contaminated_runs)} of {n_runs} timed runs were contaminated (other processes > "
          f"{CONTAMINATION_CORES} cores); max foreign load seen "
          f"{max([r.get('others_cores') or 0 for r in result['runs']] + [0]):.2f} cores. "
          f"Total time {result['total_s']:.0f} s.")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
