#!/usr/bin/env python
"""HF transformers side of `scripts/bench_engine.py` (runs in the HF venv: torch + transformers).

Loads ``DeepseekV3ForCausalLM`` from the benchmark's HF folder once, in fp32 or bf16, and
then either serves measurements over a JSON-lines pipe (``--serve``: one command per stdin
line, one JSON reply per stdout line; this is how bench_engine.py drives it, so the model is
loaded once and its runs can alternate with deepseek-ms runs) or runs one measurement and
prints its JSON (``--op``)::

    python scripts/bench_hf_worker.py --model .cache/bench_model --dtype fp32 --op prefill
    python scripts/bench_hf_worker.py --model .cache/bench_model --dtype bf16 --op decode --batch 8

Measurements (the protocol of shared notes hf_reference.md section 4):

* ``prefill``: ``model(input_ids=[1,S], attention_mask=1, use_cache=True, logits_to_keep=1)``
  (what ``generate`` does), ``iters`` times with fresh random prompts, each timed alone;
* ``decode``: ``generate(ids[B,P], attention_mask=1, do_sample=False, max_new_tokens=N,
  min_new_tokens=N, pad_token_id=eos)`` with a LogitsProcessor that timestamps every call;
  the interval between two calls is one single-token forward with the DynamicCache (plus
  generate's own per-step work), so decode tok/s = B / median interval.

Every timed region reads /proc/stat and this process's rusage before and after, and reports
the CPU time other processes used meanwhile (system busy minus our own). The CPU-accounting
helpers at the top are stdlib-only: bench_engine.py imports them from this file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, Iterable, List, Optional

# ----------------------------------------------------------------------------------------------
# CPU accounting (stdlib only; shared with bench_engine.py)
# ----------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CONTAMINATION_CORES = 0.2   # other processes above this many cores make a run "contaminated"


def read_system_cpu() -> Dict[str, float]:
    """Aggregate CPU seconds from /proc/stat: busy (user+nice+system+irq+softirq), idle
    (idle+iowait) and steal (time the hypervisor gave to someone else)."""
    with open("/proc/stat", "r") as f:
        fields = f.readline().split()
    vals = [int(v) for v in fields[1:]] + [0] * 10
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLK_TCK,
            "idle": (idle + iowait) / CLK_TCK, "steal": steal / CLK_TCK}


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pid_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "r") as f:
            data = f.read()
    except OSError:
        return 0.0
    rest = data[data.rindex(")") + 2:].split()  # fields after "pid (comm)": state is rest[0]
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


class CpuWindow:
    """Measures one region: wall time, our own CPU, and other processes' CPU.

    `own_pids` are further processes counted as "ours" (idle helper workers) besides this one.
    """

    def __init__(self, own_pids: Iterable[int] = ()):
        self.own_pids = list(own_pids)
        self.result: Optional[Dict[str, float]] = None

    def __enter__(self):
        self._sys = read_system_cpu()
        self._self = self_cpu_seconds()
        self._pids = sum(pid_cpu_seconds(p) for p in self.own_pids)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        own = self_cpu_seconds() - self._self
        pids = sum(pid_cpu_seconds(p) for p in self.own_pids) - self._pids
        sys_now = read_system_cpu()
        busy = sys_now["busy"] - self._sys["busy"]
        others = max(0.0, busy - own - pids)
        w = max(wall, 1e-9)
        self.result = {
            "wall_s": wall,
            "own_cpu_s": own,
            "helper_cpu_s": pids,
            "system_busy_s": busy,
            "others_cpu_s": others,
            "others_cores": others / w,
            "own_cores": own / w,
            "steal_cores": (sys_now["steal"] - self._sys["steal"]) / w,
            "contaminated": others / w > CONTAMINATION_CORES,
        }
        return False


def wait_for_quiet(max_wait_s: float = 30.0, window_s: float = 1.0, own_pids: Iterable[int] = (),
                   threshold: float = CONTAMINATION_CORES) -> Dict[str, float]:
    """Sample `window_s` windows until other processes use < `threshold` cores, for at most
    `max_wait_s`. Returns what happened (quiet found or not, seconds waited, last load)."""
    t0 = time.perf_counter()
    loads: List[float] = []
    while True:
        with CpuWindow(own_pids) as w:
            time.sleep(window_s)
        loads.append(w.result["others_cores"])
        waited = time.perf_counter() - t0
        if loads[-1] < threshold:
            return {"quiet": True, "waited_s": waited, "others_cores": loads[-1], "samples": len(loads)}
        if waited + window_s > max_wait_s:
            return {"quiet": False, "waited_s": waited, "others_cores": loads[-1],
                    "min_others_cores": min(loads), "samples": len(loads)}


def median(xs: List[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def percentile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ----------------------------------------------------------------------------------------------
# the HF model (torch is imported only here)
# ----------------------------------------------------------------------------------------------

class HFBench:
    def __init__(self, model_dir: str, dtype: str, attn: str = "sdpa", threads: Optional[int] = None):
        import torch
        import transformers
        from transformers import DeepseekV3ForCausalLM

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model, info = DeepseekV3ForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn, output_loading_info=True)
        problems = {k: sorted(v) for k, v in info.items() if v}
        if problems:
            raise RuntimeError(f"HF load of {model_dir} is not clean: {problems}")
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
            # the router bias stays fp32, as in the real checkpoints
            for module in model.modules():
                bias = getattr(module, "e_score_correction_bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.data = bias.data.float()
        elif dtype != "fp32":
            raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
        model.eval()
        self.model = model
        self.dtype = dtype
        self.vocab = model.config.vocab_size
        eos = model.config.eos_token_id
        self.eos = int(eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0))
        self.info = {
            "dtype": dtype, "attn_implementation": attn,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "load_s": time.perf_counter() - t0, "loading_info": {k: len(v) for k, v in info.items()},
            "pid": os.getpid(),
        }

    def _prompt(self, batch: int, length: int, seed: int):
        g = self.torch.Generator().manual_seed(int(seed))
        # avoid the special ids 0/1 so the prompts look like ordinary text tokens
        return self.torch.randint(2, self.vocab, (batch, length), generator=g)

    def prefill(self, prompt_len: int = 512, iters: int = 3, seed: int = 0, **_) -> dict:
        torch = self.torch
        times = []
        with torch.inference_mode(), CpuWindow() as w:
            for i in range(iters):
                ids = self._prompt(1, prompt_len, seed * 1000 + i)
                mask = torch.ones_like(ids)
                t = time.perf_counter()
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                out.logits.float().argmax(-1)  # touch the result
                times.append(time.perf_counter() - t)
                del out
        med = median(times)
        return {"op": "prefill", "prompt_len": prompt_len, "times_s": times, "median_s": med,
                "tok_per_s": prompt_len / med, "cpu": w.result}

    def decode(self, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64, seed: int = 0, **_) -> dict:
        torch = self.torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: List[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = self._prompt(batch, prompt_len, seed)
        mask = torch.ones_like(ids)
        with torch.inference_mode(), CpuWindow() as w:
            t = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, use_cache=True, pad_token_id=self.eos,
                                      logits_processor=LogitsProcessorList([Stamp()]))
            total = time.perf_counter() - t
        generated = int(out.shape[1] - prompt_len)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        med = median(steps)
        return {"op": "decode", "batch": batch, "prompt_len": prompt_len, "new_tokens": generated,
                "step_times_s": steps, "median_step_s": med,
                "p10_step_s": percentile(steps, 0.1), "p90_step_s": percentile(steps, 0.9),
                "first_step_s": stamps[0] - t if stamps else float("nan"),
                "tok_per_s": batch / med if steps else float("nan"),
                "total_s": total, "e2e_tok_per_s": batch * generated / total,
                "cpu": w.result}

    def warmup(self, prompt_len: int = 512, batches=(1, 8), **_) -> dict:
        t = time.perf_counter()
        self.prefill(prompt_len=prompt_len, iters=1, seed=999)
        for b in batches:
            self.decode(batch=b, prompt_len=128, new_tokens=4, seed=998)
        return {"op": "warmup", "wall_s": time.perf_counter() - t}

    def run(self, cmd: dict) -> dict:
        op = cmd.get("op")
        args = {k: v for k, v in cmd.items() if k != "op"}
        if op == "prefill":
            return self.prefill(**args)
        if op == "decode":
            return self.decode(**args)
        if op == "warmup":
            return self.warmup(**args)
        if op == "info":
            return dict(self.info, op="info")
        raise ValueError(f"unknown op {op!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF folder (config.json + safetensors)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--serve", action="store_true", help="JSON-lines commands on stdin, replies on stdout")
    ap.add_argument("--op", choices=("prefill", "decode"), help="one measurement, then exit")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args(argv)

    # the protocol owns the real stdout; stray prints (library warnings) go to stderr
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        bench = HFBench(args.model, args.dtype, args.attn, args.threads)
    except Exception as e:  # noqa: BLE001 - reported to the driver, which marks the column "not run"
        reply({"ok": False, "event": "load", "error": f"{type(e).__name__}: {e}"})
        return 1
    if args.serve:
        reply(dict(bench.info, ok=True, event="ready"))
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                cmd = json.loads(line)
                if cmd.get("op") == "quit":
                    reply({"ok": True, "op": "quit"})
                    break
                reply(dict(bench.run(cmd), ok=True))
            except Exception as e:  # noqa: BLE001 - keep serving; the driver records the error
                reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 0
    if args.op is None:
        ap.error("give --op or --serve")
    if not args.no_warmup:
        bench.warmup()
    if args.op == "prefill":
        res = bench.prefill(prompt_len=args.prompt_len or 512, iters=args.iters, seed=args.seed)
    else:
        res = bench.decode(batch=args.batch, prompt_len=args.prompt_len or 128, new_tokens=args.new_tokens,
                           seed=args.seed)
    reply(dict(res, ok=True, info=bench.info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
