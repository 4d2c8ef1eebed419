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
        self.native_norm = None
        self.eps_tensor = ms.Tensor([eps], ms.float32)

    def use_kernels(self, kernels) -> None:
        fp32 = self.weight.dtype == ms.float32
        self.native_norm = kernels.rms_norm() if kernels is not None and fp32 else None

    def leading(self, x):
        """Normalise the first `dim` columns of x and pass the rest through (MLA's kv_a
        output, whose tail is the rope key)."""
        if self.native_norm is not None and not self.training and x.dtype == ms.float32:
            return self.native_norm(x, self.weight, self.eps_tensor)
        dim = self.weight.shape[0]
        return ops.concat((self(x[..., :dim]), x[..., dim:]), -1)

    def construct(self, x):
        if self.native_norm is not None and not self.training and x.dtype == ms.float32:
            return self.native_norm(x, self.weight, self.eps_tensor)
        dtype = x.dtype
        x32 = x.astype(ms.float32)
        var = ops.mean(x32 * x32, -1, keep_dims=True)
        y = (x32 * ops.rsqrt(var + self.eps)).astype(dtype)
        return y * self.weight.astype(dtype)
