"""The single linear-layer abstraction every projection goes through.

A `Linear` knows two things besides its size:

* its tensor-parallel role -- "column" (output features split across ranks), "row"
  (input features split; partial sums all-reduced) or "replicated";
* its weight format -- how the weight is stored and turned into a matmul. "dense" keeps
  the weight in `param_dtype`; quantized formats plug in as further `WeightFormat`s.

Weights are stored in the checkpoint's [out, in] layout (y = x W^T), so each rank's slice
of an HF tensor is a contiguous row or column range that can be read lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

import mindspore as ms

from ..backend import AllReduce


@dataclass(frozen=True)
class TPGroup:
    """A rank's place in a tensor-parallel group (size 1 = no parallelism)."""
    size: int = 1
    rank: int = 0
    name: Optional[str] = None


NO_TP = TPGroup()

ROLES = ("column", "row", "replicated")
# Row counts up to which a native kernel (when attached) beats MindSpore's MatMul: decode.
NATIVE_MAX_ROWS = 16


def native_rows(rows: int, any_rows: bool, weight) -> bool:
    """Whether a product of `rows` rows with `weight` takes its attached native kernel: few
    rows (decode) always; any number when the kernel beats MatMul at any row count for
    bfloat16 weights (`any_rows`, see CpuKernels.any_rows) and this weight is kept in bf16."""
    return rows <= NATIVE_MAX_ROWS or (any_rows and weight.dtype == ms.bfloat16)


class DenseWeight:
    """Plain weights in param_dtype, multiplied in compute_dtype."""
    name = "dense"

    @staticmethod
    def create(shape, param_dtype):
        return {"weight": Parameter(initializer("zeros", shape, param_dtype), name="weight")}

    @staticmethod
    def matmul(cell, x2d):
        w = cell.weight
        if cell.native_widen is not None and w.dtype == ms.bfloat16:  # see Linear.bf16_storage
            w = cell.native_widen(w)
        return cell.matmul(x2d, w.astype(x2d.dtype))


WEIGHT_FORMATS = {DenseWeight.name: DenseWeight}


def undo_bf16_storage(params, dtype) -> None:
    """Widen parameters the checkpoint loader kept in bfloat16 (see `Linear.bf16_storage`)
    back to `dtype`, for MindSpore's ops once the native kernels are detached."""
    for p in params:
        if p.dtype != dtype:
            widened = p.astype(dtype)
            p.set_dtype(dtype)
            p.set_data(widened)


class Linear(nn.Cell):
    def __init__(self, in_features: int, out_features: int, role: str = "replicated",
                 tp: TPGroup = NO_TP, param_dtype=ms.float32, weight_format: str = "dense",
                 bf16_storage_ok: bool = True):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"Linear role must be one of {ROLES}, got {role!r}")
        if role != "replicated" and tp.size > 1:
            split = out_features if role == "column" else in_features
            if split % tp.size:
                raise ValueError(f"{role}-parallel Linear: {split} features do not divide over "
                                 f"tensor-parallel size {tp.size}")
        self.in_features = in_features
        self.out_features = out_features
        self.role = role
        self.tp = tp
        self.local_in = in_features // tp.size if role == "row" else in_features
        self.local_out = out_features // tp.size if role == "column" else out_features
        self.fmt = WEIGHT_FORMATS[weight_format]
        self.param_dtype = param_dtype  # the storage may differ: see `bf16_storage`
        self.bf16_storage_ok = bf16_storage_ok
        for name, param in self.fmt.create((self.local_out, self.local_in), param_dtype).items():
            setattr(self, name, param)
        self.matmul = ops.MatMul(transpose_b=True)
        self.reduce = AllReduce(tp.name, tp.size) if role == "row" else None
        self.native_linear = None
        self.native_widen = None
        self.native_any_rows = False

    @property
    def dense_fp32(self) -> bool:
        """Plain fp32 weights: what the native kernels read."""
        return self.fmt is DenseWeight and self.param_dtype == ms.float32

    def use_kernels(self, kernels) -> None:
        """Route few-row fp32 products of dense weights through `kernels.linear` (inference only)."""
        self.native_linear = kernels.linear() if kernels is not None and self.dense_fp32 else None
        self.native_widen = kernels.widen_bf16() if self.native_linear is not None else None
        self.native_any_rows = self.native_linear is not None and kernels.any_rows(self.local_in)
        if self.native_linear is None and self.fmt is DenseWeight:
            undo_bf16_storage([self.weight], self.param_dtype)

    @property
    def bf16_storage(self) -> bool:
        """Whether the checkpoint loader may keep the weight in bfloat16 when the checkpoint
        stores it so. Exact: the native kernel widens it to fp32 in registers, or multiplies it
        on the tile unit (AMX) against activations split exactly into bf16 parts, and a
        many-row product without the tile unit (prefill) widens it for MindSpore's MatMul in
        that call (`kernels.widen_bf16`) instead of keeping an fp32 copy. Decode, which reads
        every weight each step for a few rows, reads half the bytes. Off under MindSpore's ops
        only (devices, training) and where another kernel reads the weight as fp32
        (`bf16_storage_ok`)."""
        return self.native_linear is not None and self.bf16_storage_ok

    def construct(self, x):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if (self.native_linear is not None and not self.training and x2d.dtype == ms.float32
                and native_rows(x2d.shape[0], self.native_any_rows, self.weight)):
            y = self.native_linear(x2d, self.weight)
        else:
            y = self.fmt.matmul(self, x2d)
        if self.reduce is not None:
            y = self.reduce(y)
        return y.reshape(shape[:-1] + (self.local_out,))

    # ---- checkpoint seam ----
    def shard_of(self):
        """(axis, start, stop) of this rank's slice of the [out, in] HF tensor, or None."""
        if self.tp.size == 1 or self.role == "replicated":
            return None
        if self.role == "column":
            return 0, self.tp.rank * self.local_out, (self.tp.rank + 1) * self.local_out
        return 1, self.tp.rank * self.local_in, (self.tp.rank + 1) * self.local_in

    def expected_hf_shape(self):
        return (self.out_features, self.in_features)


def take_shard(array: np.ndarray, shard) -> np.ndarray:
    if shard is None:
        return array
    axis, start, stop = shard
    return np.ascontiguousarray(np.take(array, np.arange(start, stop), axis=axis))
