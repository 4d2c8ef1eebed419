"""`deepseek-ms bench hw` and `deepseek-ms bench comm`: what this machine and its
interconnect can do, measured before optimising anything against them.

* hw: GEMM GFLOP/s for square sizes and each dtype the device computes in, plus memory
  bandwidth (copy, which reads and writes, and a streaming read).
* comm (run under msrun, one process per rank): AllReduce and AllGather on the world group,
  latency and bandwidth against message size. Bus bandwidth follows the usual convention:
  AllReduce moves 2(n-1)/n of the message per rank, AllGather (n-1)/n of the result.

Both print a table and write JSON (rank 0 only for comm).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from typing import Callable, Dict, List, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _best_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.2) -> float:
    """Best per-call seconds over `repeats` timed batches of calls (each batch >= min_seconds/repeats)."""
    fn()  # warm up (compiles)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_seconds / repeats / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _table(headers: Sequence[str], rows: List[Sequence]) -> str:
    cells = [list(map(str, headers))] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bench_hw(sizes: Sequence[int] = (256, 512, 1024, 2048), dtypes: Sequence[str] = ("float32", "float16"),
             memory_mb: int = 256, repeats: int = 3, device_target: str = "CPU") -> Dict:
    import mindspore as ms

    from .backend import init_device

    init_device(device_target)
    gemm = []
    for dtype in dtypes:
        if device_target.upper() == "CPU" and dtype == "bfloat16":
            logger.warning("skipping bfloat16: MindSpore has no bf16 MatMul kernel on CPU")
            continue
        matmul = ms.jit(ms.ops.matmul)
        for n in sizes:
            rng = np.random.default_rng(n)
            a = ms.Tensor(rng.standard_normal((n, n)).astype(np.float32)).astype(getattr(ms, dtype))
            b = ms.Tensor(rng.standard_normal((n, n)).astype(np.float32)).astype(getattr(ms, dtype))
            sec = _best_time(lambda: matmul(a, b).asnumpy(), repeats)
            gemm.append({"dtype": dtype, "m": n, "n": n, "k": n, "seconds": sec, "gflops": 2 * n ** 3 / sec / 1e9})
    src = np.ones(memory_mb * 2 ** 20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy = _best_time(lambda: np.copyto(dst, src), repeats, min_seconds=0.5)
    read = _best_time(lambda: src.sum(), repeats, min_seconds=0.5)
    memory = [{"test": "copy (read+write)", "bytes": 2 * src.nbytes, "seconds": copy, "gb_per_s": 2 * src.nbytes / copy / 1e9},
              {"test": "sum (read)", "bytes": src.nbytes, "seconds": read, "gb_per_s": src.nbytes / read / 1e9}]
    return {"device_target": device_target, "machine": platform.machine(), "processor": platform.processor(),
            "mindspore": ms.__version__, "gemm": gemm, "memory": memory}


def bench_comm(sizes_kb: Sequence[int] = (4, 64, 1024, 16384), repeats: int = 5) -> Dict:
    import mindspore as ms
    from mindspore import communication as comm, nn, ops

    from .backend import comm_group

    comm.init()
    rank, n = comm.get_rank(), comm.get_group_size()
    world = comm_group(None)

    class Collective(nn.Cell):  # compiled like the model's steps: PyNative dispatch would dominate
        def __init__(self, op):
            super().__init__()
            self.op = op

        def construct(self, x):
            return self.op(x)

    all_reduce = ms.jit(Collective(ops.AllReduce(ops.ReduceOp.SUM, world)))
    all_gather = ms.jit(Collective(ops.AllGather(world)))
    barrier = ms.Tensor(np.zeros(1, np.float32))
    rows = []
    for kb in sizes_kb:
        x = ms.Tensor(np.ones(kb * 1024 // 4, dtype=np.float32))
        # the call count must be the same on every rank (each call is a collective), so it
        # depends on the message size only
        calls = max(5, min(200, (64 << 20) // (kb * 1024)))
        for name, op, moved in (("AllReduce", all_reduce, 2 * (n - 1) / n * kb * 1024),
                                ("AllGather", all_gather, (n - 1) * kb * 1024)):
            op(x).asnumpy()
            best = float("inf")
            for _ in range(repeats):
                all_reduce(barrier).asnumpy()  # line the ranks up
                t0 = time.perf_counter()
                for _ in range(calls):
                    op(x).asnumpy()
                best = min(best, (time.perf_counter() - t0) / calls)
            mean = float(all_reduce(ms.Tensor(np.array([best], np.float32))).asnumpy()[0]) / n
            rows.append({"op": name, "message_bytes": kb * 1024, "ranks": n, "calls": calls,
                         "latency_us": mean * 1e6, "bus_gb_per_s": moved / mean / 1e9})
    return {"rank": rank, "world_size": n, "backend": ms.get_context("device_target"), "results": rows}


def print_hw(result: Dict) -> None:
    print(f"GEMM on {result['device_target']} ({result['machine']}, mindspore {result['mindspore']})")
    print(_table(["dtype", "size", "ms", "GFLOP/s"],
                 [(r["dtype"], f"{r['m']}^3", r["seconds"] * 1e3, r["gflops"]) for r in result["gemm"]]))
    print("\nmemory bandwidth (numpy)")
    print(_table(["test", "MB", "GB/s"], [(r["test"], r["bytes"] // 2 ** 20, r["gb_per_s"]) for r in result["memory"]]))


def print_comm(result: Dict) -> None:
    print(f"collectives over {result['world_size']} {result['backend']} ranks (world group; mean over ranks)")
    print(_table(["op", "message KB", "latency us", "bus GB/s"],
                 [(r["op"], r["message_bytes"] // 1024, r["latency_us"], r["bus_gb_per_s"])
                  for r in result["results"]]))


def write_json(result: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    logger.info("wrote %s", path)
