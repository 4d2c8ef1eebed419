"""Build and load the CPU kernels (cpu_kernels.cc) as MindSpore AOT custom ops.

MindSpore's CPU MatMul is slow for the few-row products of decode, and a static graph can
only run routed experts densely, over padded slots, or after copying the chosen experts'
weights. The kernels here read weights in place: `linear` (y = x W^T for few rows),
`moe_experts` (exact routed SwiGLU experts for any number of tokens, fp32 or bf16 weights),
the router, and the pieces of attention that MindSpore runs op by op (RMSNorm, rotary
embedding, absorbed MLA decode, expanded MLA prefill). On a CPU with AMX, products with
bfloat16 weights run on its tile unit at float32 accuracy and beat MatMul at any row
count, so `linear`, `swiglu` and `moe_experts` take prefill's rows too (`any_rows`).

The library is compiled once per source and compiler with `-march=native` (it runs where
it is built) into the user cache, written atomically so concurrent ranks can race safely.
When no compiler works, `load()` returns None and the model keeps MindSpore's ops.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=c++14"]


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deepseek_ms", "kernels")


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.processor().encode()


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(compiler: Optional[str] = None, out_dir: Optional[str] = None, extra_flags: Sequence[str] = ()) -> str:
    """Compile cpu_kernels.cc (if this source + compiler + flags has not been built yet) and
    return the library's path. Raises RuntimeError with the compiler's output when it fails.
    `extra_flags` follow -march=native: tests build the AVX2 path with -mno-avx512f."""
    flags = [*FLAGS, *extra_flags]
    compiler = compiler or _compiler()
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C++ compiler {compiler!r} does not run: {e}") from e
    # -march=native: a library built on one CPU may not run on another sharing the cache
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode() + _cpu_flags()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    path = os.path.join(out_dir, f"cpu_kernels-{key}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE} with {compiler} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built CPU kernels %s", path)
    return path


def _mla_out_shape(q, new, pool, tables, past_mask, self_mask, kv_b, scale):
    B, S, heads, qk_head_dim = q
    rope_dim = new[2] - kv_b[1]                    # latent = kv_lora_rank + rope dims
    v_head_dim = kv_b[0] // heads - (qk_head_dim - rope_dim)
    return [B, S, heads * v_head_dim]


class CpuKernels:
    """Factories for the custom ops; each Cell makes its own primitive instances."""

    def __init__(self, library: str):
        self.library = library

    @functools.cached_property
    def matrix_unit(self) -> bool:
        """Whether the kernels multiply bfloat16 weights on the CPU's tile unit (AMX), exactly
        to float32 accuracy (cpu_kernels.cc: split rows)."""
        import ctypes
        return bool(ctypes.CDLL(self.library).dsms_matrix_unit())

    def any_rows(self, in_features: int) -> bool:
        """Whether a product with bfloat16 weights of `in_features` columns beats MindSpore's
        MatMul here at any row count (prefill too), not only for the few rows of decode: on
        the tile unit, whose tiles take 32 columns at a time."""
        return self.matrix_unit and in_features % 32 == 0

    def linear(self):
        """(x [..., K], w [N, K] float32 or bfloat16) -> x W^T [..., N], float32."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_linear", out_shape=lambda x, w: x[:-1] + [w[0]],
                          out_dtype=lambda x, w: x, func_type="aot")

    def swiglu(self):
        """(x [..., K], gate weight [I, K], up weight [I, K], each float32 or bfloat16) ->
        silu(x Wg^T) * (x Wu^T) [..., I], float32."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_swiglu", out_shape=lambda x, g, u: x[:-1] + [g[0]],
                          out_dtype=lambda x, g, u: x, func_type="aot")

    def silu_mul(self):
        """(g, u) float32 of one shape -> silu(g) * u."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_silu_mul", out_shape=lambda g, u: g, out_dtype=lambda g, u: g,
                          func_type="aot")

    def widen_bf16(self):
        """(w bfloat16) -> w float32, exactly."""
        import mindspore as ms
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_widen_bf16", out_shape=lambda w: w,
                          out_dtype=lambda w: ms.float32, func_type="aot")

    def rms_norm(self):
        """(x [..., W], weight [D], eps [1]) -> x with its first D columns RMS-normalised."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_rms_norm", out_shape=lambda x, w, e: x,
                          out_dtype=lambda x, w, e: x, func_type="aot")

    def rope(self):
        """(x [B,S,(heads,)W], cos [B,S,h], sin [B,S,h]) -> x with DeepSeek's interleaved
        rotary embedding applied to its last 2h columns."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_rope", out_shape=lambda x, c, s: x,
                          out_dtype=lambda x, c, s: x, func_type="aot")

    def mla_project(self, heads: int):
        """MLA's input side for few tokens: (x [B,S,H], q_a weight [R,H], q_a norm weight [R],
        q_b weight [heads*dq, R], kv_a weight [L,H], kv_a norm weight [r], cos [B,S,dr/2],
        sin [B,S,dr/2], eps [1]) -> (q [B,S,heads,dq] with rope on each head's last dr
        columns, latent [B,S,L] = [rms_norm(c_kv) ; rope(k_pe)]); projections float32 or
        bfloat16."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_mla_project",
                          out_shape=lambda x, qa, qn, qb, kva, kvn, c, s, e: (
                              [x[0], x[1], heads, qb[0] // heads], [x[0], x[1], kva[0]]),
                          out_dtype=lambda x, *rest: (x, x), func_type="aot")

    def mla_decode(self):
        """Absorbed MLA for a few new tokens: (q [B,S,nh,dn+dr], new latents [B,S,L], paged
        pool [num_blocks,bs,L], block tables [B,MB] int32, past_mask [B,S,MB*bs], self_mask
        [B,S,S], kv_b_proj weight [nh*(dn+dv), r], softmax scale [1]) -> attention output
        [B,S,nh*dv] before o_proj."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_mla_decode", out_shape=_mla_out_shape,
                          out_dtype=lambda q, n, p, t, pm, sm, w, sc: q, func_type="aot")

    def mla_prefill(self):
        """Expanded MLA over a prompt with no cached past: (q [B,S,nh,dn+dr], kv_b_proj output
        [B,T,nh*(dn+dv)], k_pe [B,T,dr], mask [B,S,T] additive, softmax scale [1]) -> attention
        output [B,S,nh*dv] before o_proj."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_mla_prefill",
                          out_shape=lambda q, kv, pe, m, s: [q[0], q[1], kv[2] - q[2] * (q[3] - pe[2])],
                          out_dtype=lambda q, kv, pe, m, s: q, func_type="aot")

    def moe_experts(self, with_shared: bool = False):
        """(x [N,H], global expert ids [N,k] int32, first local expert [1] int32, weights
        [N,k], gate/up [E,I,H], down [E,H,I], each float32 or bfloat16) -> y [N,H], float32:
        the sum over each token's chosen experts that this rank holds. `with_shared` takes
        three more weights, the shared experts' gate/up [Is,H] and down [H,Is], and adds
        their output for every token."""
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_moe_experts", out_shape=lambda x, *rest: x,
                          out_dtype=lambda x, *rest: x, func_type="aot")

    def router(self, top_k: int):
        """(x [N,H], weight [E,H], correction bias [E], config [8]) -> (expert ids [N,top_k]
        int32, weights [N,top_k] float32); config layout in cpu_kernels.cc (dsms_router)."""
        import mindspore as ms
        from mindspore import ops
        return ops.Custom(f"{self.library}:dsms_router",
                          out_shape=lambda x, w, b, c: ([x[0], top_k], [x[0], top_k]),
                          out_dtype=lambda x, w, b, c: (ms.int32, ms.float32), func_type="aot")


@functools.lru_cache(maxsize=None)
def load() -> Optional[CpuKernels]:
    """The CPU kernels, built if needed (once per process); None (with a warning) when they
    cannot be built."""
    try:
        return CpuKernels(build())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable, using MindSpore's ops only: %s", e)
        return None
