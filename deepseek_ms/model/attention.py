"""Multi-head Latent Attention (MLA, DeepSeek-V2 paper section 2.1).

Per token, keys and values are compressed into one latent c_kv of `kv_lora_rank` values
plus a single rope key k_pe of `qk_rope_head_dim` values shared by all heads. Only
[c_kv ; k_pe] -- `latent_dim` values per token per layer -- is ever cached.

Two forms of the same attention:

* `prefill` (expanded): up-project c_kv into per-head k_nope and v with `kv_b_proj`, as
  in training. Cheapest when every key is new.
* `cached` (absorbed): fold kv_b_proj's key half into the query (W_UK) and its value half
  into the output (W_UV), so attention runs directly against the cached latents. This is
  what makes decode read latent_dim values per past token instead of heads*(dn+dr+dv).
  New tokens attend to the cache and to themselves; the softmax is split over the two
  parts so the graph never has to write into the cache.
"""
from __future__ import annotations

from mindspore import nn, ops

import mindspore as ms

from ..config import DeepseekConfig
from .linear import NATIVE_MAX_ROWS, NO_TP, Linear, TPGroup
from .norm import RMSNorm
from .rope import apply_rope

# DeepSeek hard-codes the eps of the two latent norms; rms_norm_eps does not apply to them.
LATENT_NORM_EPS = 1e-6
# New tokens per sequence up to which the native absorbed kernel runs (decode, draft
# verification); longer chunks keep MindSpore's batched matmuls.
NATIVE_DECODE_TOKENS = 4


def gather_blocks(pool, block_tables):
    """pool [num_blocks,block_size,D], block_tables [B,MB] -> [B,MB*block_size,D]: each
    sequence's cache in token order (gathered position t is token position t)."""
    B, MB = block_tables.shape
    return ops.gather(pool, block_tables, 0).reshape(B, MB * pool.shape[1], pool.shape[2])


class MLAttention(nn.Cell):
    def __init__(self, config: DeepseekConfig, tp: TPGroup = NO_TP, param_dtype=ms.float32):
        super().__init__()
        c = config
        if c.num_attention_heads % tp.size:
            raise ValueError(f"num_attention_heads ({c.num_attention_heads}) does not divide over "
                             f"tensor-parallel size {tp.size}")
        self.n_local_heads = c.num_attention_heads // tp.size
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim = c.qk_nope_head_dim
        self.qk_rope_head_dim = c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        self.softmax_scale = c.softmax_scale
        H, n_heads = c.hidden_size, c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = Linear(H, n_heads * c.qk_head_dim, "column", tp, param_dtype)
        else:
            self.q_a_proj = Linear(H, c.q_lora_rank, "replicated", tp, param_dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, param_dtype)
            self.q_b_proj = Linear(c.q_lora_rank, n_heads * c.qk_head_dim, "column", tp, param_dtype)
        self.kv_a_proj_with_mqa = Linear(H, c.kv_lora_rank + c.qk_rope_head_dim, "replicated", tp, param_dtype)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, param_dtype)
        # the absorbed decode kernel reads kv_b_proj's weight itself, as fp32
        self.kv_b_proj = Linear(c.kv_lora_rank, n_heads * (c.qk_nope_head_dim + c.v_head_dim), "column", tp,
                                param_dtype, bf16_storage_ok=False)
        self.o_proj = Linear(n_heads * c.v_head_dim, H, "row", tp, param_dtype)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.native_rope = None
        self.native_project = None
        self.native_decode = None
        self.native_prefill = None
        self.scale_tensor = ms.Tensor([self.softmax_scale], ms.float32)

    def use_kernels(self, kernels) -> None:
        self.native_rope = kernels.rope() if kernels is not None else None
        projections_native = self.q_lora_rank is not None and all(
            p.dense_fp32 for p in (self.q_a_proj, self.q_b_proj, self.kv_a_proj_with_mqa)) and all(
            n.weight.dtype == ms.float32 for n in (self.q_a_layernorm, self.kv_a_layernorm))
        self.native_project = (kernels.mla_project(self.n_local_heads)
                               if kernels is not None and projections_native else None)
        self.native_decode = kernels.mla_decode() if kernels is not None and self.kv_b_proj.dense_fp32 else None
        self.native_prefill = kernels.mla_prefill() if kernels is not None else None

    def _project(self, x, cos, sin):
        """(q [B,S,nh,dn+dr] with its rope part rotated, the new tokens' latent [c_kv ; k_pe])."""
        B, S, _ = x.shape
        nh, dn, dr = self.n_local_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if (self.native_project is not None and not self.training and B * S <= NATIVE_MAX_ROWS
                and x.dtype == ms.float32):
            # decode: the seven ops below as one call
            return self.native_project(x, self.q_a_proj.weight, self.q_a_layernorm.weight, self.q_b_proj.weight,
                                       self.kv_a_proj_with_mqa.weight, self.kv_a_layernorm.weight, cos, sin,
                                       self.q_a_layernorm.eps_tensor)
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, S, nh, dn + dr)
        kv = self.kv_a_proj_with_mqa(x)
        if self.native_rope is not None and not self.training and x.dtype == ms.float32:
            # rope and the latent norm act on column ranges in place: no slices, no concat
            return self.native_rope(q, cos, sin), self.native_rope(self.kv_a_layernorm.leading(kv), cos, sin)
        q_pe = apply_rope(q[:, :, :, dn:], cos, sin)
        c_kv = self.kv_a_layernorm(kv[:, :, :self.kv_lora_rank])
        k_pe = apply_rope(kv[:, :, self.kv_lora_rank:], cos, sin)
        return ops.concat((q[:, :, :, :dn], q_pe), -1), ops.concat((c_kv, k_pe), -1)

    def prefill(self, x, cos, sin, mask):
        """Expanded MLA over S new tokens with no cached past.

        x [B,S,H]; cos/sin [B,S,dr/2]; mask [B,S,S] additive (0 or -1e30).
        Returns (out [B,S,H], latent [B,S,latent_dim]).
        """
        B, S, _ = x.shape
        nh, dn, dr, dv = self.n_local_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q, latent = self._project(x, cos, sin)
        r = self.kv_lora_rank
        k_pe = latent[:, :, r:]
        kv = self.kv_b_proj(latent[:, :, :r])
        if self.native_prefill is not None and not self.training and x.dtype == ms.float32:
            return self.o_proj(self.native_prefill(q, kv, k_pe, mask, self.scale_tensor)), latent
        kv = kv.reshape(B, S, nh, dn + dv)
        q_nope, q_pe = q[:, :, :, :dn], q[:, :, :, dn:]
        k_nope = kv[:, :, :, :dn]
        v = kv[:, :, :, dn:]
        scores = self.bmm_t(q_nope.transpose(0, 2, 1, 3), k_nope.transpose(0, 2, 1, 3))       # [B,nh,S,S]
        # the rope key is one head shared by all query heads: fold heads into the query axis
        s_pe = self.bmm_t(q_pe.reshape(B, S * nh, dr), k_pe).reshape(B, S, nh, S)
        scores = (scores + s_pe.transpose(0, 2, 1, 3)).astype(ms.float32) * self.softmax_scale
        probs = ops.softmax(scores + mask.expand_dims(1), -1).astype(v.dtype)
        out = self.bmm(probs, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3).reshape(B, S, nh * dv)
        return self.o_proj(out), latent

    def cached(self, x, cos, sin, cache, past_mask, self_mask, block_tables=None):
        """Absorbed MLA: S new tokens attend to T cached latents and to themselves.

        cache: [B,T,latent_dim], or with `block_tables` [B,MB] a paged pool
        [num_blocks,block_size,latent_dim] of which each sequence's blocks hold its T =
        MB*block_size positions in order (read only). past_mask [B,S,T]; self_mask [B,S,S]
        (additive). Returns (out [B,S,H], new latent rows [B,S,latent_dim]) -- the caller
        stores the rows.
        """
        B, S, _ = x.shape
        nh, dn, dr, dv = self.n_local_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        r = self.kv_lora_rank
        q, new = self._project(x, cos, sin)
        if (self.native_decode is not None and not self.training and S <= NATIVE_DECODE_TOKENS
                and x.dtype == ms.float32):
            if block_tables is None:  # a contiguous cache is a pool of B blocks of T rows
                block_tables = ops.arange(B, dtype=ms.int32).reshape(B, 1)
            o = self.native_decode(q, new, cache, block_tables, past_mask, self_mask, self.kv_b_proj.weight,
                                   self.scale_tensor)
            return self.o_proj(o), new
        if block_tables is not None:
            cache = gather_blocks(cache, block_tables)
        q_nope, q_pe = q[:, :, :, :dn], q[:, :, :, dn:]
        w = self.kv_b_proj.weight.astype(x.dtype).reshape(nh, dn + dv, r)
        w_uk = w[:, :dn, :]                                                     # [nh,dn,r]
        w_uv = w[:, dn:, :]                                                     # [nh,dv,r]
        q_lat = self.bmm(q_nope.reshape(B * S, nh, dn).transpose(1, 0, 2), w_uk)   # [nh,BS,r]
        q_lat = q_lat.transpose(1, 0, 2).reshape(B, S * nh, r)
        q_full = ops.concat((q_lat, q_pe.reshape(B, S * nh, dr)), -1)          # [B,S*nh,latent]
        T = cache.shape[1]
        scale = self.softmax_scale
        s_past = self.bmm_t(q_full, cache.astype(x.dtype)).astype(ms.float32).reshape(B, S, nh, T) * scale
        s_past = s_past + past_mask.expand_dims(2)
        s_new = self.bmm_t(q_full, new).astype(ms.float32).reshape(B, S, nh, S) * scale
        s_new = s_new + self_mask.expand_dims(2)
        m = ops.maximum(s_past.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
        e_past = ops.exp(s_past - m)
        e_new = ops.exp(s_new - m)
        denom = (e_past.sum(-1, keepdims=True) + e_new.sum(-1, keepdims=True)).reshape(B, S * nh, 1)
        o_past = self.bmm(e_past.reshape(B, S * nh, T).astype(x.dtype), cache.astype(x.dtype))
        o_new = self.bmm(e_new.reshape(B, S * nh, S).astype(x.dtype), new)
        # the rope columns of the latent carry no value information: drop them after the product
        o_lat = ((o_past + o_new)[:, :, :r] / denom.astype(x.dtype))           # [B,S*nh,r]
        o = self.bmm_t(o_lat.reshape(B * S, nh, r).transpose(1, 0, 2), w_uv)   # [nh,BS,dv]
        o = o.transpose(1, 0, 2).reshape(B, S, nh * dv)
        return self.o_proj(o), new
