"""Tensor/data-parallel building blocks the model uses beyond `Linear`'s row/column roles."""
from __future__ import annotations

from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

import mindspore as ms

from ..backend import AllGather, AllReduce
from ..model.linear import NO_TP, TPGroup
from .layout import ExpertGroups


class VocabParallelEmbedding(nn.Cell):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the embedding table; ids outside them embed to
    zero here and the tensor-parallel sum fills them in from their owner."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = NO_TP, param_dtype=ms.float32):
        super().__init__()
        if vocab_size % tp.size:
            raise ValueError(f"vocab_size ({vocab_size}) does not divide over tensor-parallel size {tp.size}")
        self.vocab_size, self.hidden_size, self.tp = vocab_size, hidden_size, tp
        self.local_vocab = vocab_size // tp.size
        self.start = tp.rank * self.local_vocab
        self.weight = Parameter(initializer("zeros", (self.local_vocab, hidden_size), param_dtype), name="weight")
        self.reduce = AllReduce(tp.name, tp.size)

    def construct(self, ids):
        local = ids - self.start
        owned = ops.logical_and(local >= 0, local < self.local_vocab)
        rows = ops.gather(self.weight, ops.select(owned, local, ops.zeros_like(local)), 0)
        return self.reduce(rows * owned.expand_dims(-1).astype(rows.dtype))

    def shard_of(self):
        return 0, self.start, self.start + self.local_vocab

    def expected_hf_shape(self):
        return (self.vocab_size, self.hidden_size)


class GatherLastDim(nn.Cell):
    """[..., n/tp] column-parallel outputs -> [..., n] on every rank (the LM head's logits)."""

    def __init__(self, tp: TPGroup = NO_TP):
        super().__init__()
        self.size = tp.size
        self.gather = AllGather(tp.name, tp.size, tp.rank)

    def construct(self, x):
        if self.size == 1:
            return x
        lead, part = x.shape[:-1], x.shape[-1]
        blocks = self.gather(x.reshape(1, -1, part))                              # [tp,N,part]
        return blocks.transpose(1, 0, 2).reshape(lead + (self.size * part,))


class TokenExchange(nn.Cell):
    """Routed experts with replicated tokens (the CPU path, and any moe_tp > 1 layout).

    `gather` gives every rank the tokens of all data-parallel ranks; after each rank ran its
    experts' slice on all of them, `reduce` sums the slices over the stage and keeps this
    data-parallel rank's rows."""

    def __init__(self, groups: ExpertGroups):
        super().__init__()
        self.dp_size, self.dp_rank = groups.dp.size, groups.dp.rank
        self.gather_dp = AllGather(groups.dp.name, groups.dp.size, groups.dp.rank)
        self.reduce_all = AllReduce(groups.reduce.name, groups.reduce.size)

    def gather(self, x):
        return self.gather_dp(x)

    def local(self, x):
        if self.dp_size == 1:
            return x
        n = x.shape[0] // self.dp_size
        return x[self.dp_rank * n:(self.dp_rank + 1) * n]

    def reduce(self, y):
        return self.local(self.reduce_all(y))
