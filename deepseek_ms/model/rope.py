"""Rotary position embedding with YaRN, on DeepSeek's interleaved-pair layout.

DeepSeek checkpoints store the rope dims of q and k as adjacent pairs (x0,x1),(x2,x3)...
so the rotation acts on those pairs directly; applying NeoX "rotate half" to these
weights would be wrong. The cos/sin table is built once on the host in numpy.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from mindspore import Tensor, nn, ops

import mindspore as ms

from ..config import DeepseekConfig, RopeScaling, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rope dim index whose wavelength completes `num_rotations` turns over max_pos."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(dim: int, base: float, rs: Optional[RopeScaling]) -> np.ndarray:
    """inv_freq [dim/2] in float32 (computed as HF does so prefill logits match to 1e-5)."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents).astype(np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rs is None or rs.factor <= 1:
        return inv_freq
    low = math.floor(_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings))
    high = math.ceil(_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    # ramp 0: high-frequency dims keep their original frequency (extrapolate);
    # ramp 1: low-frequency dims are interpolated by `factor`.
    interpolated = (np.float32(1.0) / (np.float32(rs.factor) * pos_freqs)).astype(np.float32)
    return (interpolated * ramp + inv_freq * (1 - ramp)).astype(np.float32)


def rope_attention_factor(rs: Optional[RopeScaling]) -> float:
    """YaRN's multiplier on cos/sin: mscale(f, mscale)/mscale(f, mscale_all_dim); 1.0 in every
    official DeepSeek config."""
    if rs is None or rs.factor <= 1:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor)


def rope_table(config: DeepseekConfig, max_seq_len: int) -> tuple:
    """(cos, sin), each [max_seq_len, qk_rope_head_dim/2] float32."""
    inv_freq = rope_inv_freq(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
    t = np.arange(max_seq_len, dtype=np.float32)
    freqs = np.outer(t, inv_freq).astype(np.float32)
    factor = np.float32(rope_attention_factor(config.rope_scaling))
    return (np.cos(freqs) * factor).astype(np.float32), (np.sin(freqs) * factor).astype(np.float32)


class RotaryEmbedding(nn.Cell):
    """Looks up cos/sin for positions; the table is a constant of the graph."""

    def __init__(self, config: DeepseekConfig, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        cos, sin = rope_table(config, max_seq_len)
        self.cos = Tensor(cos)
        self.sin = Tensor(sin)

    def construct(self, positions):
        """positions [B,S] int32 -> cos, sin [B,S,dr/2]."""
        return ops.gather(self.cos, positions, 0), ops.gather(self.sin, positions, 0)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs of the last dim. x [B,S,(heads,)dr]; cos/sin [B,S,dr/2] broadcast
    over a heads axis when x has one."""
    dtype = x.dtype
    if x.ndim == 4:
        cos = cos.expand_dims(2)
        sin = sin.expand_dims(2)
    shape = x.shape
    pairs = x.astype(ms.float32).reshape(shape[:-1] + (shape[-1] // 2, 2))
    x0 = pairs[..., 0]
    x1 = pairs[..., 1]
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return ops.stack((r0, r1), -1).reshape(shape).astype(dtype)
