"""Runs scheduled work on the network: owns the paged MLA latent cache and the compiled steps.

The cache is one numpy pool per layer, [num_blocks, block_size, latent_dim], wrapped once
as zero-copy MindSpore inputs. Graphs only read it (each step gathers the blocks of its
sequences); the host writes the latent rows a step returns into their slots. Shapes are
static per graph, so batch sizes, chunk lengths and block-table widths are rounded up to
powers of two and each combination compiles once per process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from ..api import MASKED, CausalLM, causal_mask

logger = logging.getLogger(__name__)

MIN_CHUNK = 16


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


@dataclass
class DecodeItem:
    token_id: int
    position: int          # position of token_id; tokens [0, position) are cached
    block_table: List[int]


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int):
        import mindspore as ms

        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.max_num_seqs = max_num_seqs
        self.pools = [np.zeros((num_blocks, block_size, cfg.latent_dim), dtype=np.float32)
                      for _ in range(cfg.num_hidden_layers)]
        self._pool_inputs = [ms.Tensor.from_numpy(p) for p in self.pools]
        self._T = ms.Tensor
        self._prefill, self._cached = model.paged_steps()

    @property
    def cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools)

    def _write(self, latents: np.ndarray, rows: Sequence[int], positions: np.ndarray,
               block_tables: Sequence[Sequence[int]], steps: Sequence[int]) -> None:
        """Store latents[l, rows[i], steps[i]] at positions[i] of sequence i's blocks."""
        bt = [block_tables[i][int(p) // self.block_size] for i, p in enumerate(positions)]
        blocks = np.asarray(bt, dtype=np.int64)
        offsets = np.asarray(positions, dtype=np.int64) % self.block_size
        rows = np.asarray(rows, dtype=np.int64)
        steps = np.asarray(steps, dtype=np.int64)
        for layer, pool in enumerate(self.pools):
            pool[blocks, offsets] = latents[layer, rows, steps]

    def _width(self, blocks_needed: int) -> int:
        """Block-table width for a step: a power of two, but never below a quarter of the
        maximum, so at most three widths (three compiled graphs per batch size) exist."""
        width = max(next_pow2(blocks_needed), self.max_blocks // 4, 1)
        return max(min(width, next_pow2(self.max_blocks)), blocks_needed)

    def _block_table_array(self, tables: Sequence[Sequence[int]], batch: int, width: int) -> np.ndarray:
        out = np.zeros((batch, width), dtype=np.int32)  # block 0 is the never-allocated null block
        for i, table in enumerate(tables):
            n = min(len(table), width)
            out[i, :n] = table[:n]
        return out

    def prefill_chunk(self, token_ids: Sequence[int], start: int, block_table: Sequence[int]) -> np.ndarray:
        """Compute tokens [start, start+n) of one sequence whose tokens [0, start) are cached;
        returns the logits [1,V] of the chunk's last token."""
        n = len(token_ids)
        chunk = next_pow2(n, MIN_CHUNK)
        T = self._T
        ids = np.zeros((1, chunk), dtype=np.int32)
        ids[0, :n] = token_ids
        positions = np.minimum(start + np.arange(chunk, dtype=np.int32), self.model.max_seq_len - 1)[None, :]
        last = np.array([n - 1], dtype=np.int32)
        if start == 0:
            logits, latents = self._prefill(T(ids), T(positions), T(causal_mask(1, chunk)), T(last))
        else:
            width = self._width(-(-start // self.block_size))
            tables = self._block_table_array([block_table], 1, width)
            past = np.full((1, chunk, width * self.block_size), MASKED, dtype=np.float32)
            past[:, :, :start] = 0
            logits, latents = self._cached(T(ids), T(positions), T(last), T(tables), T(past),
                                           T(causal_mask(1, chunk)), *self._pool_inputs)
        logits = logits.asnumpy()  # logits first: reading another output first stalls the CPU runtime
        self._write(latents.asnumpy(), [0] * n, start + np.arange(n), [block_table] * n, list(range(n)))
        return logits

    def decode(self, items: Sequence[DecodeItem]) -> np.ndarray:
        """One new token per sequence; returns logits [B,V] in the order of `items`."""
        B = len(items)
        batch = max(min(next_pow2(B), next_pow2(self.max_num_seqs)), B)
        longest = max(it.position for it in items)
        width = self._width(-(-longest // self.block_size))
        T = self._T
        ids = np.zeros((batch, 1), dtype=np.int32)
        positions = np.zeros((batch, 1), dtype=np.int32)
        past = np.full((batch, 1, width * self.block_size), MASKED, dtype=np.float32)
        for i, it in enumerate(items):
            ids[i, 0] = it.token_id
            positions[i, 0] = it.position
            past[i, 0, :it.position] = 0
        tables = self._block_table_array([it.block_table for it in items], batch, width)
        index = np.arange(batch, dtype=np.int32)
        self_mask = np.zeros((batch, 1, 1), dtype=np.float32)
        logits, latents = self._cached(T(ids), T(positions), T(index), T(tables), T(past), T(self_mask),
                                       *self._pool_inputs)
        logits = logits.asnumpy()[:B]
        self._write(latents.asnumpy(), list(range(B)), positions[:B, 0], [it.block_table for it in items], [0] * B)
        return logits
