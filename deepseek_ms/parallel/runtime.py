"""Host-side data parallelism: each data-parallel rank runs its own rows of a batch.

A batch of B rows is padded (repeating its last row) to a multiple of dp so every rank
runs the same shapes -- the MoE layers gather tokens across the dp ranks in-graph, so the
ranks must call their graphs in step -- and each rank's results are gathered back so that
every rank returns the full batch.
"""
from __future__ import annotations

import numpy as np

from ..model.linear import NO_TP, TPGroup


class DataParallelRows:
    def __init__(self, dp: TPGroup = NO_TP):
        self.size, self.rank = dp.size, dp.rank
        self._gather = None
        if dp.size > 1:
            from ..backend import AllGather
            self._gather = AllGather(dp.name, dp.size, dp.rank)

    def rows_per_rank(self, batch: int) -> int:
        return -(-batch // self.size)

    def local(self, x: np.ndarray) -> np.ndarray:
        """This rank's rows of x [B,...] (padded to rows_per_rank(B))."""
        if self.size == 1:
            return x
        per = self.rows_per_rank(x.shape[0])
        pad = per * self.size - x.shape[0]
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
        return np.ascontiguousarray(x[self.rank * per:(self.rank + 1) * per])

    def gather(self, x: np.ndarray, batch: int, axis: int = 0) -> np.ndarray:
        """Every rank's `x` (its rows along `axis`) -> the first `batch` rows of the whole batch."""
        if self.size == 1:
            return x
        import mindspore as ms
        moved = np.moveaxis(x, axis, 0)
        full = self._gather(ms.Tensor(np.ascontiguousarray(moved, dtype=np.float32))).asnumpy()
        return np.moveaxis(full[:batch].astype(x.dtype), 0, axis)
