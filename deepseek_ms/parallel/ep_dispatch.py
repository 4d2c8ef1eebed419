"""Expert-parallel token dispatch for devices with AlltoAll (Ascend/GPU).

Each rank routes its own tokens; every (token, choice) row travels to the rank owning its
expert, is computed there, and travels back. Shapes stay static, as a compiled graph
needs: each rank sends a [ep, capacity, H] buffer where capacity = N*k (the worst case,
every row to one rank), so no token is ever dropped and one equal-split AlltoAll moves it.

The plan is a counting sort, computed with one-hot sums and cumulative sums (no sort op):

* `expert_counts[e]`: rows routed to expert e (what a grouped matmul needs);
* `send_counts[r]`: rows for rank r;
* `slot[m]`: where flat row m = token*k + choice goes in the send buffer: rank block
  `r*capacity`, then ordered by expert and, within an expert, by m -- the permutation;
* `source[s]`: the flat row at send slot s, or -1 for padding -- its inverse.

`pack` fills the send buffer through `source`; after the experts ran and the results came
back, `unpack` reads each row's result at `slot[m]`, which undoes the permutation. Both
are plain functions of MindSpore tensors, so tests run them on CPU against a simulated
communicator (CPU has no AlltoAll kernel).
"""
from __future__ import annotations

from mindspore import nn, ops

import mindspore as ms

from ..backend import comm_group
from .layout import ExpertGroups


def dispatch_plan(idx, n_experts: int, ep_size: int):
    """idx [N,k] global expert ids (experts split contiguously over ep_size ranks) ->
    (expert_counts [E], send_counts [ep], slot [N*k], source [ep*N*k]), all int32.

    A plain tuple: graph mode compiles tuples, while a NamedTuple falls back to Python."""
    flat = idx.reshape(-1).astype(ms.int32)
    M = flat.shape[0]
    n_local = n_experts // ep_size
    onehot = ops.one_hot(flat, n_experts, ms.Tensor(1, ms.int32), ms.Tensor(0, ms.int32))     # [M,E]
    expert_counts = onehot.sum(0)
    rank_in_expert = (ops.cumsum(onehot, 0) * onehot).sum(1) - 1                              # [M]
    per_rank = expert_counts.reshape(ep_size, n_local)
    send_counts = per_rank.sum(1)
    # first position of each expert inside its destination rank's block
    expert_start = (ops.cumsum(per_rank, 1) - per_rank).reshape(n_experts)
    dest = flat // n_local
    slot = dest * M + ops.gather(expert_start, flat, 0) + rank_in_expert
    rows = ops.cumsum(ops.ones((M,), ms.int32), 0) - 1  # arange(M) with a static shape in graphs
    source = ops.tensor_scatter_elements(ops.full((ep_size * M,), -1, dtype=ms.int32), slot, rows, 0)
    return expert_counts, send_counts, slot.astype(ms.int32), source


def pack(x, idx, source):
    """x [N,H] -> the send buffer [ep*capacity,H] and each slot's global expert id (-1 = padding)."""
    k = idx.shape[1]
    valid = source >= 0
    src = ops.select(valid, source, ops.zeros_like(source))
    rows = ops.gather(x, src // k, 0) * valid.expand_dims(-1).astype(x.dtype)
    experts = ops.select(valid, ops.gather(idx.reshape(-1).astype(ms.int32), src, 0), -ops.ones_like(src))
    return rows, experts


def unpack(back, weights, slot):
    """back [ep*capacity,H]: results returned into this rank's send layout -> [N,H], each
    token's routing-weighted sum over its k experts (`slot` is the plan's)."""
    N, k = weights.shape
    rows = ops.gather(back, slot, 0).reshape(N, k, -1)
    return (rows * weights.expand_dims(-1).astype(rows.dtype)).sum(1)


class AlltoAllDispatcher(nn.Cell):
    """The device path: `send` a rank's routed rows to their experts' owners over the
    expert-parallel group; `receive` their results back and combine them per token."""

    def __init__(self, groups: ExpertGroups, n_experts: int):
        super().__init__()
        self.n_experts, self.ep_size = n_experts, groups.ep.size
        self.all_to_all = ops.AlltoAll(groups.ep.size, 0, 0, comm_group(groups.ep.name))

    def send(self, x, idx):
        """-> (rows [ep*cap,H], expert ids [ep*cap,1] (0 on padding), row weights [ep*cap,1]
        (0 on padding), slot) -- ids and weights in the form RoutedExperts takes."""
        _, _, slot, source = dispatch_plan(idx, self.n_experts, self.ep_size)
        rows, ids = pack(x, idx, source)
        rows, ids = self.all_to_all(rows), self.all_to_all(ids)
        valid = ids >= 0
        return (rows, ops.select(valid, ids, ops.zeros_like(ids)).expand_dims(-1),
                valid.astype(ms.float32).expand_dims(-1), slot)

    def receive(self, y, weights, slot):
        return unpack(self.all_to_all(y), weights, slot)
