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


class AllReduce(nn.Cell):
    """Sum over a communication group; the identity for a group of one rank.

    On CPU under msrun this is MindSpore's AllReduce (which works on sub-groups); on
    Ascend/GPU the same op maps to HCCL/NCCL.
    """

    def __init__(self, group: Optional[str] = None, group_size: int = 1):
        super().__init__()
        self.group_size = group_size
        self.op = ops.AllReduce(ops.ReduceOp.SUM, group) if group_size > 1 else None

    def construct(self, x):
        if self.group_size > 1:
            return self.op(x)
        return x
