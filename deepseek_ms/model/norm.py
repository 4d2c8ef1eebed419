"""RMSNorm, written with classic ops (the fused RmsNorm kernel is Ascend-only)."""
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

import mindspore as ms


class RMSNorm(nn.Cell):
    """w * (x / rms(x)) with the normalisation in fp32, then cast back (Llama/DeepSeek order)."""

    def __init__(self, dim: int, eps: float = 1e-6, param_dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), param_dtype), name="weight")

    def construct(self, x):
        dtype = x.dtype
        x32 = x.astype(ms.float32)
        var = ops.mean(x32 * x32, -1, keep_dims=True)
        y = (x32 * ops.rsqrt(var + self.eps)).astype(dtype)
        return y * self.weight.astype(dtype)
