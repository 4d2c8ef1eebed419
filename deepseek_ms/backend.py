"""The one seam between the model and the hardware.

Everything that differs between CPU, GPU and Ascend lives here: which device MindSpore
runs on, which dtypes a device can compute in, and the collectives tensor/expert
parallelism use. Model code calls these helpers and never branches on the device itself.
"""
from __future__ import annotations

import logging
from typing import Optional

import mindspore as ms
from mindspore import nn, ops

from .config import KERNEL_CHOICES

logger = logging.getLogger(__name__)

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name: str):
    return _DTYPES[name]


def init_device(device_target: Optional[str] = None) -> str:
    """Select the MindSpore device (CPU unless asked otherwise) and return its name."""
    target = (device_target or "CPU")
    target = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}.get(target.lower(), target)
    if ms.get_context("device_target") != target:
        ms.set_device(target)
    return target


def device_target() -> str:
    return ms.get_context("device_target")


def check_compute_dtype(dtype_name: str) -> None:
    """CPU kernels have no bf16 MatMul/Gather and fp16 is slower than fp32 there."""
    if device_target() == "CPU" and dtype_name == "bfloat16":
        raise ValueError("compute_dtype 'bfloat16' is not supported on CPU (no bf16 MatMul/Gather kernels); "
                         "use 'float32'")


def native_kernels(choice: str = "auto"):
    """The native kernels model Cells swap in for some MindSpore ops, or None.

    "auto": on CPU, the AOT kernels of deepseek_ms.kernels.cpu (built on first use; None
    when no compiler works); on GPU/Ascend, None -- MindSpore's device kernels serve there.
    "mindspore": None, i.e. MindSpore's ops everywhere (the reference the kernels are
    tested against)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "mindspore" or device_target() != "CPU":
        return None
    from .kernels import cpu
    return cpu.load()


def comm_group(group: Optional[str]) -> str:
    """A group name for MindSpore's collectives; None is the world group."""
    from mindspore.communication import GlobalComm
    return group or GlobalComm.WORLD_COMM_GROUP


class AllReduce(nn.Cell):
    """Sum over a communication group; the identity for a group of one rank.

    On CPU under msrun this is MindSpore's AllReduce (which works on sub-groups); on
    Ascend/GPU the same op maps to HCCL/NCCL.
    """

    def __init__(self, group: Optional[str] = None, group_size: int = 1):
        super().__init__()
        self.group_size = group_size
        self.op = ops.AllReduce(ops.ReduceOp.SUM, comm_group(group)) if group_size > 1 else None

    def construct(self, x):
        if self.group_size > 1:
            return self.op(x)
        return x


class AllGather(nn.Cell):
    """Concatenate each rank's x [n,...] along axis 0 into [group_size*n,...], in rank order.

    MindSpore's CPU AllGather only runs on the world group, so on CPU every rank places its
    block into zeros at its own offset and the group sums them (AllReduce moves the same
    bytes per rank as a ring all-gather of the full result). Ascend/GPU use AllGather.
    """

    def __init__(self, group: Optional[str] = None, group_size: int = 1, rank: int = 0):
        super().__init__()
        self.group_size = group_size
        self.via_sum = device_target() == "CPU" and group is not None
        if group_size > 1 and self.via_sum:
            self.op = ops.AllReduce(ops.ReduceOp.SUM, comm_group(group))
            self.slot = ms.Tensor([1.0 if r == rank else 0.0 for r in range(group_size)], ms.float32)
        elif group_size > 1:
            self.op = ops.AllGather(comm_group(group))

    def construct(self, x):
        if self.group_size == 1:
            return x
        if self.via_sum:
            placed = x.expand_dims(0) * self.slot.astype(x.dtype).reshape((-1,) + (1,) * x.ndim)
            return self.op(placed).reshape((-1,) + x.shape[1:])
        return self.op(x)
