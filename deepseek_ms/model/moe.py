"""DeepSeekMoE: shared experts plus fine-grained routed experts, and the dense SwiGLU MLP.

Routing (always in fp32) follows DeepSeek's own semantics:

* ``greedy`` (V2-Lite): softmax scores, plain top-k.
* ``group_limited_greedy`` (V2): softmax scores; groups ranked by their best expert; top-k
  inside the best `topk_group` groups.
* ``noaux_tc`` (V3/R1): sigmoid scores; `e_score_correction_bias` is added for *selection
  only*; groups ranked by the sum of their top-2 biased scores; dropped groups masked
  out; the chosen experts are weighted by their unbiased scores.

Weight post-processing: V3 renormalises when `norm_topk_prob` and always multiplies by
`routed_scaling_factor`; V2 renormalises (top_k > 1 and norm_topk_prob) *or* scales.

Experts are addressed by global id. A rank holding experts [first_expert, first_expert +
n_local_experts) computes only those and the expert-parallel all-reduce adds the rest.
"""
from __future__ import annotations

from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

import mindspore as ms

from ..config import DeepseekConfig
from ..parallel.ep_dispatch import AlltoAllDispatcher
from ..parallel.layers import TokenExchange
from ..parallel.layout import NO_EP, ExpertGroups, use_alltoall
from .linear import NO_TP, Linear, TPGroup, native_rows, undo_bf16_storage

_MASKED = -1e30  # a dropped group's experts can never be selected


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup = NO_TP, param_dtype=ms.float32):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, "column", tp, param_dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, "column", tp, param_dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, "row", tp, param_dtype)
        self.native_swiglu = None
        self.native_silu_mul = None
        self.native_any_rows = False

    def use_kernels(self, kernels) -> None:
        """Few-row inputs (decode), and any number when the kernels run bf16 weights on the
        tile unit (`any_rows`), take gate, up and the activation as one `kernels.swiglu` call
        when the projections take the native kernels (the Linears get theirs separately);
        otherwise the projections stay apart and the activation is one `silu_mul`."""
        self.native_swiglu = kernels.swiglu() if kernels is not None and self.gate_proj.dense_fp32 else None
        self.native_silu_mul = kernels.silu_mul() if kernels is not None else None
        self.native_any_rows = self.native_swiglu is not None and kernels.any_rows(self.gate_proj.local_in)

    def construct(self, x):
        x2d = x.reshape(-1, x.shape[-1])
        native = not self.training and x2d.dtype == ms.float32
        if (native and self.native_swiglu is not None
                and native_rows(x2d.shape[0], self.native_any_rows, self.gate_proj.weight)):
            h = self.native_swiglu(x2d, self.gate_proj.weight, self.up_proj.weight)
            return self.down_proj(h.reshape(x.shape[:-1] + (h.shape[-1],)))
        if native and self.native_silu_mul is not None:
            return self.down_proj(self.native_silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Cell):
    """Top-k expert selection. Returns (indices [N,k] int32, weights [N,k] fp32)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        c = config
        self.n_routed_experts = c.n_routed_experts
        self.top_k = c.num_experts_per_tok
        self.n_group = c.n_group or 1
        self.topk_group = c.topk_group or 1
        self.topk_method = c.topk_method
        self.scoring_func = c.scoring_func
        self.norm_topk_prob = bool(c.norm_topk_prob)
        self.routed_scaling_factor = float(c.routed_scaling_factor)
        self.v3_weighting = c.model_type == "deepseek_v3"
        # the router runs in fp32 whatever the model dtype
        self.weight = Parameter(initializer("zeros", (c.n_routed_experts, c.hidden_size), ms.float32),
                                name="weight")
        self.use_bias = c.topk_method == "noaux_tc"
        if self.use_bias:
            self.e_score_correction_bias = Parameter(initializer("zeros", (c.n_routed_experts,), ms.float32),
                                                     name="e_score_correction_bias", requires_grad=False)
        self.matmul = ops.MatMul(transpose_b=True)
        self.topk = ops.TopK(sorted=True)
        self.native_router = None

    def use_kernels(self, kernels) -> None:
        """Route with `kernels.router`: one kernel instead of about twenty small ops."""
        self.native_router = None if kernels is None else kernels.router(self.top_k)
        methods = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}
        self.native_config = ms.Tensor([self.top_k, self.n_group, self.topk_group, methods[self.topk_method],
                                        self.scoring_func == "sigmoid", self.v3_weighting, self.norm_topk_prob,
                                        self.routed_scaling_factor], ms.float32)
        self.no_bias = ms.Tensor([0.0] * self.n_routed_experts, ms.float32)

    def _keep_best_groups(self, select_scores, group_scores):
        """Mask every expert outside the `topk_group` best groups."""
        N = select_scores.shape[0]
        _, group_idx = self.topk(group_scores, self.topk_group)                    # [N,tg]
        group_mask = ops.one_hot(group_idx, self.n_group, ms.Tensor(1.0, ms.float32),
                                 ms.Tensor(0.0, ms.float32)).sum(1)                 # [N,G]
        per_group = self.n_routed_experts // self.n_group
        expert_mask = ops.broadcast_to(group_mask.expand_dims(-1), (N, self.n_group, per_group))
        expert_mask = expert_mask.reshape(N, self.n_routed_experts)
        return select_scores * expert_mask + (1.0 - expert_mask) * _MASKED

    def construct(self, x):
        if self.native_router is not None and not self.training:
            bias = self.e_score_correction_bias if self.use_bias else self.no_bias
            return self.native_router(x.astype(ms.float32), self.weight, bias, self.native_config)
        logits = self.matmul(x.astype(ms.float32), self.weight)                    # [N,E]
        if self.scoring_func == "sigmoid":
            scores = ops.sigmoid(logits)
        else:
            scores = ops.softmax(logits, -1)
        N = scores.shape[0]
        select = scores
        if self.use_bias:
            select = scores + self.e_score_correction_bias.expand_dims(0)
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = select.reshape(N, self.n_group, self.n_routed_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                top2, _ = self.topk(grouped, 2)
                group_scores = top2.sum(-1)
            else:
                group_scores = grouped.max(-1)
            select = self._keep_best_groups(select, group_scores)
        _, idx = self.topk(select, self.top_k)
        weights = ops.gather_elements(scores, 1, idx)                              # unbiased scores
        if self.v3_weighting:
            if self.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
            weights = weights * self.routed_scaling_factor
        elif self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return idx, weights


class RoutedExperts(nn.Cell):
    """This rank's routed SwiGLU experts, stacked: [n_local_experts, out, in] per projection."""

    def __init__(self, config: DeepseekConfig, first_expert: int = 0, n_local_experts=None,
                 param_dtype=ms.float32, moe_tp: TPGroup = NO_TP):
        super().__init__()
        c = config
        self.n_routed_experts = c.n_routed_experts
        self.first_expert = first_expert
        self.n_local_experts = n_local_experts or c.n_routed_experts
        if c.moe_intermediate_size % moe_tp.size:
            raise ValueError(f"moe_intermediate_size ({c.moe_intermediate_size}) does not divide over "
                             f"expert tensor-parallel size {moe_tp.size}")
        # with moe_tp > 1 this rank holds a slice of every local expert's intermediate dimension
        self.moe_tp = moe_tp
        E, H, I = self.n_local_experts, c.hidden_size, c.moe_intermediate_size // moe_tp.size
        self.gate_proj = Parameter(initializer("zeros", (E, I, H), param_dtype), name="gate_proj")
        self.up_proj = Parameter(initializer("zeros", (E, I, H), param_dtype), name="up_proj")
        self.down_proj = Parameter(initializer("zeros", (E, H, I), param_dtype), name="down_proj")
        self.param_dtype = param_dtype  # the storage may differ: see `bf16_storage`
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.native_experts = None
        self.first_expert_tensor = ms.Tensor([first_expert], ms.int32)

    def use_kernels(self, kernels) -> None:
        """Run inference through `kernels.moe_experts` (exact, any token count) for fp32 weights
        (which the loader may keep in bf16, see `bf16_storage`)."""
        fp32 = self.param_dtype == ms.float32
        self.native_experts = kernels.moe_experts() if kernels is not None and fp32 else None
        if self.native_experts is None:  # MindSpore's ops take the configured dtype
            undo_bf16_storage((self.gate_proj, self.up_proj, self.down_proj), self.param_dtype)

    @property
    def bf16_storage(self) -> bool:
        """Whether the checkpoint loader may keep these weights in bfloat16 when the checkpoint
        stores them so: exact, since the native kernel widens them to fp32 in registers (or
        multiplies them on the tile unit against activations split exactly into bf16 parts),
        and decode, which reads every expert's weights each step at large batch, reads half
        the bytes. MindSpore's own ops (devices, training) keep fp32."""
        return self.native_experts is not None

    def construct(self, x, idx, weights):
        """x [N,H]; idx/weights [N,k] -> sum over chosen local experts of weight * expert(x)."""
        N = x.shape[0]
        k = idx.shape[1]
        if self.native_experts is not None and not self.training and x.dtype == ms.float32:
            return self.native_experts(x, idx, self.first_expert_tensor, weights.astype(ms.float32),
                                       self.gate_proj, self.up_proj, self.down_proj)
        # With MindSpore's ops (devices, training) shapes are static, so the strategy is fixed
        # per compiled graph: few tokens (decode) read only the chosen experts' weights; more
        # tokens go through per-expert slots.
        if N * k < self.n_local_experts:
            return self._gathered(x, idx, weights)
        capacity = self.capacity(N * k)
        if self.training or capacity >= N:
            return self._dense(x, idx, weights)
        return self._slotted(x, idx, weights, capacity)

    def capacity(self, n_pairs: int) -> int:
        """Slots per expert for `n_pairs` (token, expert) choices: the mean load of a balanced
        router plus four binomial standard deviations, so a load past it -- which falls back to
        the exact dense path -- is rare; rounded up to a multiple of 8 for the matmuls."""
        mean = n_pairs / self.n_routed_experts
        return -(-int(mean + 4.0 * mean ** 0.5 + 1.0) // 8) * 8

    def _local_ids(self, idx, fill: int):
        """idx [N,k] global expert ids -> (this rank's expert index per choice [N*k], with `fill`
        where another expert-parallel rank owns the expert; whether this rank owns it [N*k])."""
        local = idx.reshape(-1) - self.first_expert
        owned = ops.logical_and(local >= 0, local < self.n_local_experts)
        return ops.select(owned, local, ops.full_like(local, fill)), owned

    def _slotted(self, x, idx, weights, capacity: int):
        """Each local expert runs on `capacity` slots filled with the tokens that chose it: one
        batched matmul per projection over [E, capacity] rows instead of [E, N] (dense),
        reading the stacked weights in place. Exact whatever the load: when an expert got more
        tokens than it has slots, the step doubles the slots, and past that takes the dense path."""
        N = x.shape[0]
        E = self.n_local_experts
        local, owned = self._local_ids(idx, E)                                      # other ranks' -> E
        chosen = ops.one_hot(local, E + 1, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32))  # [N*k,E+1]
        rank = (ops.cumsum(chosen, 0) * chosen).sum(1) - 1                          # order within its expert
        load = chosen.sum(0)[:E].max()
        if load <= capacity:
            return self._run_slots(x, weights, local, owned, rank, capacity)
        if 2 * capacity < N:
            if load <= 2 * capacity:
                return self._run_slots(x, weights, local, owned, rank, 2 * capacity)
        return self._dense(x, idx, weights)

    def _run_slots(self, x, weights, local, owned, rank, capacity: int):
        N, H = x.shape
        k = weights.shape[1]
        dtype = x.dtype
        trash = self.n_local_experts * capacity  # one extra slot that collects other ranks' choices
        slot = ops.select(owned, local * capacity + rank, ops.full_like(local, trash))
        token = ops.arange(N * k, dtype=ms.int32) // k
        table = ops.scatter_nd(slot.reshape(-1, 1), token, (trash + 1,))[:trash]    # slot -> token
        xs = ops.gather(x, table, 0).reshape(self.n_local_experts, capacity, H)    # empty slots: token 0
        g = self.bmm_t(xs, self.gate_proj.astype(dtype))
        u = self.bmm_t(xs, self.up_proj.astype(dtype))
        y = self.bmm_t(ops.silu(g) * u, self.down_proj.astype(dtype)).reshape(trash, H)
        y = ops.concat((y, ops.zeros((1, H), dtype)), 0)
        w = (weights.reshape(-1) * owned.astype(weights.dtype)).reshape(N * k, 1).astype(dtype)
        return (ops.gather(y, slot, 0) * w).reshape(N, k, H).sum(1)

    def _dense(self, x, idx, weights):
        """Every local expert sees every token, weighted 0 where not chosen: one batched matmul
        per projection, exact, and fast while expert counts are small."""
        N, H = x.shape
        dtype = x.dtype
        # combine[n, e]: weight of global expert e for token n (0 when not chosen)
        combine = (ops.one_hot(idx, self.n_routed_experts, ms.Tensor(1.0, ms.float32),
                               ms.Tensor(0.0, ms.float32)) * weights.expand_dims(-1)).sum(1)
        combine = combine[:, self.first_expert:self.first_expert + self.n_local_experts]
        xb = ops.broadcast_to(x.expand_dims(0), (self.n_local_experts, N, H))
        g = self.bmm_t(xb, self.gate_proj.astype(dtype))
        u = self.bmm_t(xb, self.up_proj.astype(dtype))
        y = self.bmm_t(ops.silu(g) * u, self.down_proj.astype(dtype))               # [E,N,H]
        return (y * combine.transpose(1, 0).expand_dims(-1).astype(dtype)).sum(0)

    def _gathered(self, x, idx, weights):
        """Gather the k chosen experts' weights per token; experts owned by other
        expert-parallel ranks contribute 0 here."""
        N, H = x.shape
        k = idx.shape[1]
        dtype = x.dtype
        local, owned = self._local_ids(idx, 0)
        xr = ops.broadcast_to(x.expand_dims(1), (N, k, H)).reshape(N * k, 1, H)
        g = self.bmm_t(xr, ops.gather(self.gate_proj, local, 0).astype(dtype))       # [Nk,1,I]
        u = self.bmm_t(xr, ops.gather(self.up_proj, local, 0).astype(dtype))
        y = self.bmm_t(ops.silu(g) * u, ops.gather(self.down_proj, local, 0).astype(dtype))  # [Nk,1,H]
        w = (weights.reshape(-1) * owned.astype(weights.dtype)).reshape(N * k, 1, 1).astype(dtype)
        return (y * w).reshape(N, k, H).sum(1)


class MoE(nn.Cell):
    def __init__(self, config: DeepseekConfig, tp: TPGroup = NO_TP, ep: ExpertGroups = NO_EP,
                 param_dtype=ms.float32):
        super().__init__()
        c = config
        if c.n_routed_experts % ep.ep.size:
            raise ValueError(f"n_routed_experts ({c.n_routed_experts}) does not divide over "
                             f"expert-parallel size {ep.ep.size}")
        n_local = c.n_routed_experts // ep.ep.size
        self.gate = Router(c)
        self.experts = RoutedExperts(c, ep.ep.rank * n_local, n_local, param_dtype, ep.moe_tp)
        # expert-parallel communication lives in deepseek_ms.parallel: AlltoAll dispatch on
        # devices that have it, otherwise replicated tokens and one sum over the stage
        self.alltoall = use_alltoall(ep)
        self.exchange = AlltoAllDispatcher(ep, c.n_routed_experts) if self.alltoall else TokenExchange(ep)
        self.has_shared = bool(c.n_shared_experts)
        if self.has_shared:
            self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, tp, param_dtype)
        # on a single rank the routed and shared experts' sum needs no communication
        self.single_rank = all(g.size == 1 for g in (tp, ep.ep, ep.moe_tp, ep.dp, ep.reduce))
        self.native_with_shared = None
        self.native_any_rows = False

    def use_kernels(self, kernels) -> None:
        """On a single rank, few-token inputs (decode), and any number when the shared experts'
        bf16 weights run on the tile unit (`any_rows`), take the routed and the shared experts
        in one `kernels.moe_experts` call when both take the native kernels (their own
        kernels are attached to them separately)."""
        native = (kernels is not None and self.has_shared and self.single_rank
                  and self.shared_experts.gate_proj.dense_fp32 and self.experts.param_dtype == ms.float32)
        self.native_with_shared = kernels.moe_experts(with_shared=True) if native else None
        self.native_any_rows = native and all(kernels.any_rows(p.local_in) for p in (
            self.shared_experts.gate_proj, self.shared_experts.down_proj))

    def construct(self, x):
        """x [B,S,H] -> (y [B,S,H], routing indices [B*S,k], routing weights [B*S,k])."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if (self.native_with_shared is not None and not self.training and flat.dtype == ms.float32
                and native_rows(flat.shape[0], self.native_any_rows, self.shared_experts.gate_proj.weight)):
            idx, weights = self.gate(flat)
            e, s = self.experts, self.shared_experts
            y = self.native_with_shared(flat, idx, e.first_expert_tensor, weights.astype(ms.float32), e.gate_proj,
                                        e.up_proj, e.down_proj, s.gate_proj.weight, s.up_proj.weight,
                                        s.down_proj.weight)
            return y.reshape(shape), idx, weights
        if self.alltoall:
            idx, weights = self.gate(flat)
            rows, row_ids, row_weights, slot = self.exchange.send(flat, idx)
            y = self.exchange.receive(self.experts(rows, row_ids, row_weights), weights, slot)
        else:
            tokens = self.exchange.gather(flat)
            idx, weights = self.gate(tokens)
            y = self.exchange.reduce(self.experts(tokens, idx, weights))
            idx, weights = self.exchange.local(idx), self.exchange.local(weights)
        if self.has_shared:
            y = y + self.shared_experts(flat)
        return y.reshape(shape), idx, weights
