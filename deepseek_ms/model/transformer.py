"""The DeepSeek decoder stack as MindSpore Cells.

Cell attribute names follow the HF checkpoint (`model.layers.3.self_attn.kv_b_proj`), so
most parameters are named exactly like their checkpoint tensors; see
`deepseek_ms.checkpoint.hf_loader` for the few that are not (stacked experts, MTP).

The stack has two forward forms, both pure functions of their inputs so that each
compiles into one static graph:

* `prefill(ids, positions, mask)`: no cached past, expanded attention.
* `cached(ids, positions, past_mask, self_mask, caches)`: new tokens over a latent cache,
  absorbed attention. The cache is never written in the graph: each layer returns its new
  latent rows and the caller stores them.
"""
from __future__ import annotations

from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

import mindspore as ms

from ..config import DeepseekConfig
from ..parallel.layers import GatherLastDim, VocabParallelEmbedding
from ..parallel.layout import NO_EP, ExpertGroups
from .attention import MLAttention
from .linear import NO_TP, Linear, TPGroup
from .moe import MLP, MoE, RoutedExperts, Router
from .norm import RMSNorm
from .rope import RotaryEmbedding


def use_kernels(root: nn.Cell, kernels) -> None:
    """Attach native kernels (deepseek_ms.backend.native_kernels; None detaches them) to the
    projections, SwiGLU MLPs, MoE layers, routers, routed experts, norms and attention under `root`.
    Call before compiling."""
    for _, cell in root.cells_and_names():
        if isinstance(cell, (Linear, MLP, MoE, Router, RoutedExperts, RMSNorm, MLAttention)):
            cell.use_kernels(kernels)


class DecoderLayer(nn.Cell):
    def __init__(self, config: DeepseekConfig, layer_id: int, tp: TPGroup = NO_TP, ep: ExpertGroups = NO_EP,
                 param_dtype=ms.float32):
        super().__init__()
        c = config
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        self.self_attn = MLAttention(c, tp, param_dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        self.is_moe = c.is_moe_layer(layer_id)
        if self.is_moe:
            self.mlp = MoE(c, tp, ep, param_dtype)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, tp, param_dtype)

    def _ffn(self, h):
        """Returns (output, routing); routing is (indices, weights) for MoE layers, () otherwise."""
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, idx, weights = self.mlp(x)
            return h + y, (idx, weights)
        return h + self.mlp(x), ()

    def prefill(self, x, cos, sin, mask):
        a, latent = self.self_attn.prefill(self.input_layernorm(x), cos, sin, mask)
        h, routing = self._ffn(x + a)
        return h, latent, routing

    def cached(self, x, cos, sin, cache, past_mask, self_mask, block_tables=None):
        a, latent = self.self_attn.cached(self.input_layernorm(x), cos, sin, cache, past_mask, self_mask,
                                          block_tables)
        h, routing = self._ffn(x + a)
        return h, latent, routing


class Embedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, param_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (vocab_size, hidden_size), param_dtype), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class DeepseekModel(nn.Cell):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: DeepseekConfig, tp: TPGroup = NO_TP, ep: ExpertGroups = NO_EP,
                 param_dtype=ms.float32):
        super().__init__()
        if tp.size > 1:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, param_dtype)
        else:
            self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, param_dtype)
        self.layers = nn.CellList([DecoderLayer(config, i, tp, ep, param_dtype)
                                   for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)


class MTPLayer(nn.Cell):
    """One multi-token-prediction module (DeepSeek-V3 section 2.2).

    Position i combines the main model's final hidden state h_i with the embedding of the
    next token t_{i+1} and predicts t_{i+2}: eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) ->
    its own decoder block -> shared_head.norm -> the main model's lm_head. The embedding
    and output head are shared with the main model, as in DeepSeek's checkpoints.
    """

    def __init__(self, config: DeepseekConfig, layer_id: int, tp: TPGroup = NO_TP, ep: ExpertGroups = NO_EP,
                 param_dtype=ms.float32):
        super().__init__()
        H = config.hidden_size
        self.enorm = RMSNorm(H, config.rms_norm_eps, param_dtype)
        self.hnorm = RMSNorm(H, config.rms_norm_eps, param_dtype)
        self.eh_proj = Linear(2 * H, H, "replicated", tp, param_dtype)
        self.block = DecoderLayer(config, layer_id, tp, ep, param_dtype)
        self.shared_head_norm = RMSNorm(H, config.rms_norm_eps, param_dtype)

    def combine(self, next_token_embeds, hidden):
        return self.eh_proj(ops.concat((self.enorm(next_token_embeds), self.hnorm(hidden)), -1))


class DeepseekForCausalLM(nn.Cell):
    def __init__(self, config: DeepseekConfig, max_seq_len: int = 4096, tp: TPGroup = NO_TP,
                 ep: ExpertGroups = NO_EP, param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.model = DeepseekModel(config, tp, ep, param_dtype)
        # vocabulary-parallel head: each rank computes its slice of the logits, then all gather
        self.lm_head = Linear(config.hidden_size, config.vocab_size, "column", tp, param_dtype)
        self.gather_vocab = GatherLastDim(tp)
        self.rotary = RotaryEmbedding(config, max_seq_len)
        self.mtp = nn.CellList([MTPLayer(config, config.num_hidden_layers + k, tp, ep, param_dtype)
                                for k in range(config.num_nextn_predict_layers)])

    def use_kernels(self, kernels) -> None:
        use_kernels(self, kernels)

    def embed(self, ids):
        return self.model.embed_tokens(ids).astype(self.compute_dtype)

    def head(self, hidden):
        return self.gather_vocab(self.lm_head(hidden)).astype(ms.float32)

    def prefill(self, ids, positions, mask):
        """Returns (final hidden [B,S,H] after the norm, latents list, routing list)."""
        cos, sin = self.rotary(positions)
        h = self.embed(ids)
        latents = []
        routing = []
        for layer in self.model.layers:
            h, latent, r = layer.prefill(h, cos, sin, mask)
            latents.append(latent)
            if layer.is_moe:
                routing.append(r)
        return self.model.norm(h), latents, routing

    def cached(self, ids, positions, past_mask, self_mask, caches, block_tables=None):
        """`caches`: per layer [B,T,latent_dim], or paged pools read through `block_tables`
        (MLAttention.cached)."""
        cos, sin = self.rotary(positions)
        h = self.embed(ids)
        latents = []
        routing = []
        for i, layer in enumerate(self.model.layers):
            h, latent, r = layer.cached(h, cos, sin, caches[i], past_mask, self_mask, block_tables)
            latents.append(latent)
            if layer.is_moe:
                routing.append(r)
        return self.model.norm(h), latents, routing

    def mtp_prefill(self, ids, hidden, positions, mask, depth: int = 0):
        """MTP logits [B,S-1,V]: entry i predicts token i+2 from hidden[:, i] and ids[:, i+1].

        positions/mask are for the S-1 combined positions."""
        layer = self.mtp[depth]
        x = layer.combine(self.embed(ids[:, 1:]), hidden[:, :-1])
        cos, sin = self.rotary(positions)
        h, _, _ = layer.block.prefill(x, cos, sin, mask)
        return self.head(layer.shared_head_norm(h))


class PrefillStep(nn.Cell):
    """Graph entry: prompt logits [B,S,V], latents [L,B,S,latent_dim] and, for models with
    MoE layers, the routing of every MoE layer ([n_moe,B*S,k] indices and weights)."""

    def __init__(self, net: DeepseekForCausalLM):
        super().__init__(auto_prefix=False)  # keep parameter names identical to the network's
        self.net = net
        self.has_moe = any(layer.is_moe for layer in net.model.layers)

    def construct(self, ids, positions, mask):
        hidden, latents, routing = self.net.prefill(ids, positions, mask)
        logits = self.net.head(hidden)
        stacked = ops.stack(latents, 0)
        if self.has_moe:
            indices = []
            weights = []
            for r in routing:
                indices.append(r[0])
                weights.append(r[1])
            return logits, stacked, ops.stack(indices, 0), ops.stack(weights, 0)
        return logits, stacked


class CachedStep(nn.Cell):
    """Graph entry: S new tokens against the latent caches (decode when S == 1)."""

    def __init__(self, net: DeepseekForCausalLM):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, ids, positions, past_mask, self_mask, *caches):
        hidden, latents, _ = self.net.cached(ids, positions, past_mask, self_mask, caches)
        return self.net.head(hidden), ops.stack(latents, 0)


class MTPStep(nn.Cell):
    """Graph entry: main-model prefill followed by the MTP module's prediction."""

    def __init__(self, net: DeepseekForCausalLM, depth: int = 0):
        super().__init__(auto_prefix=False)
        self.net = net
        self.depth = depth

    def construct(self, ids, positions, mask, mtp_positions, mtp_mask):
        hidden, _, _ = self.net.prefill(ids, positions, mask)
        return self.net.mtp_prefill(ids, hidden, mtp_positions, mtp_mask, self.depth)


def _select_rows(hidden, flat_index):
    """hidden [B,S,H], flat_index [R] into B*S -> [R,H]: the positions whose logits are needed."""
    B, S, H = hidden.shape
    return ops.gather(hidden.reshape(B * S, H), flat_index, 0)


class PagedPrefillStep(nn.Cell):
    """Engine graph: a prompt chunk with no cached past (expanded MLA).

    Returns the logits at `logits_index` (flat indices into B*S), the latents
    [L,B,S,latent_dim] to store in the paged cache and, with `return_hidden` (speculative
    decoding: the MTP drafter reads it), the final hidden states [B,S,H]."""

    def __init__(self, net: DeepseekForCausalLM, return_hidden: bool = False):
        super().__init__(auto_prefix=False)
        self.net = net
        self.return_hidden = return_hidden

    def construct(self, ids, positions, mask, logits_index):
        hidden, latents, _ = self.net.prefill(ids, positions, mask)
        logits = self.net.head(_select_rows(hidden, logits_index))
        if self.return_hidden:
            return logits, ops.stack(latents, 0), hidden
        return logits, ops.stack(latents, 0)


class PagedCachedStep(nn.Cell):
    """Engine graph: new tokens (decode, speculative verification, or a later prompt chunk)
    against the paged cache.

    `pools` are the per-layer block pools [num_blocks, block_size, latent_dim], passed
    zero-copy from host memory; `block_tables` [B,MB] picks each sequence's blocks in order."""

    def __init__(self, net: DeepseekForCausalLM, return_hidden: bool = False):
        super().__init__(auto_prefix=False)
        self.net = net
        self.return_hidden = return_hidden

    def construct(self, ids, positions, logits_index, block_tables, past_mask, self_mask, *pools):
        hidden, latents, _ = self.net.cached(ids, positions, past_mask, self_mask, pools, block_tables)
        logits = self.net.head(_select_rows(hidden, logits_index))
        if self.return_hidden:
            return logits, ops.stack(latents, 0), hidden
        return logits, ops.stack(latents, 0)


class PagedMTPStep(nn.Cell):
    """Engine graph for the MTP drafter (speculative decoding).

    Entry i combines the main model's final hidden state at position p_i with the embedding
    of the token at p_i + 1 and runs the MTP block over its own paged latent pool, so its
    logits propose the token at p_i + 2. Returns the logits at `logits_index` and the MTP
    latents [B,S,latent_dim] to store."""

    def __init__(self, net: DeepseekForCausalLM, depth: int = 0):
        super().__init__(auto_prefix=False)
        self.net = net
        self.depth = depth

    def construct(self, next_ids, hidden, positions, logits_index, block_tables, past_mask, self_mask, pool):
        layer = self.net.mtp[self.depth]
        x = layer.combine(self.net.embed(next_ids), hidden.astype(self.net.compute_dtype))
        cos, sin = self.net.rotary(positions)
        h, latent, _ = layer.block.cached(x, cos, sin, pool, past_mask, self_mask, block_tables)
        return self.net.head(_select_rows(layer.shared_head_norm(h), logits_index)), latent
