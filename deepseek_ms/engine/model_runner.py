"""Runs scheduled work on the network: owns the paged MLA latent cache and the compiled steps.

The cache is one numpy pool per layer, [num_blocks, block_size, latent_dim], wrapped once
as zero-copy MindSpore inputs. Graphs only read it (each step gathers the blocks of its
sequences); the host writes the latent rows a step returns into their slots. Shapes are
static per graph, so batch sizes, chunk lengths and block-table widths are rounded up to
powers of two and each combination compiles once per process.

Restarts skip compilation with `compile_cache_dir`: MindSpore's on-disk compile cache
names its entries by the order in which graphs compile, so with shapes compiled lazily in
whatever order requests arrive, a restart would load a graph for the wrong shape. The
runner therefore appends every shape it compiles to a manifest and, at start-up, replays
the manifest in order (cache hits) before serving; shapes first seen later compile after
the replayed ones and are appended in that order, so the next start lines up again. The
cache is process-wide and order-keyed, so only the first engine of a process uses it, and
that process should compile nothing else (the engine server does not).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..api import MASKED, CausalLM, causal_mask

logger = logging.getLogger(__name__)

MIN_CHUNK = 16
# MindSpore's compile cache is process-wide: only the first runner of a process may use it
_CACHE_OWNER: List["ModelRunner"] = []


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


@dataclass
class PrefillItem:
    token_ids: List[int]   # prompt tokens [start, start + n) of one sequence
    start: int             # tokens [0, start) are cached
    block_table: List[int]


@dataclass
class DecodeItem:
    token_ids: List[int]   # new tokens: the last sampled one, then a draft when speculating
    position: int          # position of token_ids[0]; tokens [0, position) are cached
    block_table: List[int]


@dataclass
class DraftItem:
    """MTP drafter input for consecutive positions [position, position + n): the main model's
    hidden state at each position and the token that follows it."""
    next_token_ids: List[int]
    hidden: np.ndarray     # [n,H]
    position: int
    block_table: List[int]


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, speculative: bool = False, compile_cache_dir: Optional[str] = None):
        import mindspore as ms

        cfg = model.config
        first_user = not model.paged_steps_used
        self.model = model
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.max_num_seqs = max_num_seqs
        self.speculative = speculative
        self.pools = [np.zeros((num_blocks, block_size, cfg.latent_dim), dtype=np.float32)
                      for _ in range(cfg.num_hidden_layers)]
        self._T = ms.Tensor
        prefill, cached = model.paged_steps(return_hidden=speculative)
        pool_inputs = [ms.Tensor.from_numpy(p) for p in self.pools]
        self._steps = {"prefill": (prefill, []), "cached": (cached, pool_inputs)}
        if speculative:
            # the MTP block's own latents, in the same blocks as the main model's
            self.mtp_pool = np.zeros((num_blocks, block_size, cfg.latent_dim), dtype=np.float32)
            self._steps["mtp"] = (model.paged_mtp_step(0), [ms.Tensor.from_numpy(self.mtp_pool)])
        self._compiled = set()
        self._manifest: Optional[str] = None
        self.warmup_seconds = 0.0
        self.warmup_graphs = 0
        if compile_cache_dir:
            self._warm_up(ms, compile_cache_dir, num_blocks, first_user)

    # ---- compiled steps and the restart cache ----
    def _run(self, kind: str, *args: np.ndarray):
        step, pools = self._steps[kind]
        signature = (kind, tuple((tuple(a.shape), a.dtype.str) for a in args))
        if signature not in self._compiled:
            self._compiled.add(signature)
            if self._manifest:
                with open(self._manifest, "a") as f:
                    f.write(json.dumps([kind, [[list(shape), dtype] for shape, dtype in signature[1]]]) + "\n")
        return step(*[self._T(a) for a in args], *pools)

    def _warm_up(self, ms, root: str, num_blocks: int, first_user: bool) -> None:
        if not self.model.layout.is_single:
            # the warm-up runs steps, whose collectives hang unless every rank replays the same
            # shapes in the same order -- which per-rank caches cannot guarantee
            logger.warning("compile cache skipped: it is single-process only (this model runs on %d ranks)",
                           self.model.layout.world_size)
            return
        if not first_user or _CACHE_OWNER:
            logger.warning("compile cache skipped: graphs were already compiled in this process, so MindSpore's "
                           "order-keyed cache entries would not line up")
            return
        try:  # MindSpore keys the cache on the entry script and its imports; some it cannot parse
            from mindspore.graph.api import _get_compile_cache_dep_files
            _get_compile_cache_dep_files()
        except (OSError, ValueError, ImportError, SyntaxError) as e:
            logger.warning("compile cache skipped: MindSpore cannot hash the entry script %r (%s)", sys.argv[0], e)
            return
        _CACHE_OWNER.append(self)
        cfg = self.model.config
        # graphs depend on parameter dtypes too: the loader keeps BF16 checkpoints' experts in bf16
        dtypes = sorted({str(p.dtype) for p in self.model.net.get_parameters()})
        key = json.dumps([cfg.to_dict(), num_blocks, self.block_size, self.max_blocks, self.max_num_seqs,
                          self.speculative, ms.__version__, dtypes], sort_keys=True, default=str)
        path = os.path.join(os.path.abspath(root), hashlib.sha256(key.encode()).hexdigest()[:16])
        os.makedirs(path, exist_ok=True)
        # two processes writing one order-keyed cache would corrupt it: the first one owns it
        self._lock_file = open(os.path.join(path, "lock"), "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.warning("compile cache %s is in use by another process; compiling without it", path)
            self._lock_file.close()
            return
        manifest = os.path.join(path, "shapes.jsonl")
        entries = []
        if os.path.exists(manifest):
            with open(manifest) as f:
                entries = [json.loads(line) for line in f if line.strip()]
        start = time.perf_counter()
        ms.set_context(enable_compile_cache=True, compile_cache_path=path)
        for kind, arrays in entries:
            self._run(kind, *[np.zeros(shape, dtype=np.dtype(dtype)) for shape, dtype in arrays])
        self._manifest = manifest
        self.warmup_graphs = len(entries)
        self.warmup_seconds = time.perf_counter() - start
        logger.info("compile cache %s: %d graphs warmed up in %.1f s", path, len(entries), self.warmup_seconds)

    def keep_alive(self) -> None:
        """Called while the engine is idle. Nothing to do here; rank 0's lockstep runner
        (parallel/lockstep.py) overrides it to ping the follower ranks."""

    @property
    def cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools) + (self.mtp_pool.nbytes if self.speculative else 0)

    def _write(self, pools: Sequence[np.ndarray], latents: np.ndarray, rows: Sequence[int], positions: np.ndarray,
               block_tables: Sequence[Sequence[int]], steps: Sequence[int]) -> None:
        """Store latents[l, rows[i], steps[i]] at positions[i] of sequence i's blocks in pools[l]."""
        bt = [block_tables[i][int(p) // self.block_size] for i, p in enumerate(positions)]
        blocks = np.asarray(bt, dtype=np.int64)
        offsets = np.asarray(positions, dtype=np.int64) % self.block_size
        rows = np.asarray(rows, dtype=np.int64)
        steps = np.asarray(steps, dtype=np.int64)
        for layer, pool in enumerate(pools):
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

    def _batch(self, n: int) -> int:
        return max(min(next_pow2(n), next_pow2(self.max_num_seqs)), n)

    def _positions(self, starts: Sequence[int], batch: int, seq: int) -> np.ndarray:
        positions = np.zeros((batch, seq), dtype=np.int32)
        for i, start in enumerate(starts):
            positions[i] = start + np.arange(seq)
        return np.minimum(positions, self.model.max_seq_len - 1)

    def _past_mask(self, starts: Sequence[int], batch: int, seq: int, width: int) -> np.ndarray:
        past = np.full((batch, seq, width * self.block_size), MASKED, dtype=np.float32)
        for i, start in enumerate(starts):
            past[i, :, :start] = 0
        return past

    def prefill(self, items: Sequence[PrefillItem]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Compute prompt chunks; per item (in order): (logits [V] of the chunk's last token,
        hidden [n,H] when speculating else None).

        First chunks (nothing cached yet) of the same padded length run together in one
        expanded-MLA graph, so the matmuls and experts see more rows per weight read; the
        batch is split into powers of two so that few shapes compile. Later chunks attend to
        their cached past and run one by one in the absorbed graph."""
        results: List[Optional[Tuple[np.ndarray, Optional[np.ndarray]]]] = [None] * len(items)
        groups: Dict[int, List[int]] = {}
        for i, it in enumerate(items):
            if it.start == 0:
                groups.setdefault(next_pow2(len(it.token_ids), MIN_CHUNK), []).append(i)
            else:
                results[i] = self._prefill_cached(it)
        for chunk, members in groups.items():
            while members:
                batch = 1 << (len(members).bit_length() - 1)
                for i, out in zip(members[:batch], self._prefill_first([items[i] for i in members[:batch]], chunk)):
                    results[i] = out
                members = members[batch:]
        return results

    def _prefill_first(self, items: Sequence[PrefillItem], chunk: int):
        B = len(items)
        ids = np.zeros((B, chunk), dtype=np.int32)
        last = np.zeros(B, dtype=np.int32)
        for b, it in enumerate(items):
            ids[b, :len(it.token_ids)] = it.token_ids
            last[b] = b * chunk + len(it.token_ids) - 1
        outs = self._run("prefill", ids, self._positions([0] * B, B, chunk), causal_mask(B, chunk), last)
        logits = outs[0].asnumpy()  # logits first: reading another output first stalls the CPU runtime
        lengths = [len(it.token_ids) for it in items]
        rows = np.repeat(np.arange(B), lengths)
        steps = np.concatenate([np.arange(n) for n in lengths])
        self._write(self.pools, outs[1].asnumpy(), rows, steps, [items[r].block_table for r in rows], steps)
        hidden = outs[2].asnumpy() if self.speculative else None
        return [(logits[b], hidden[b, :n] if self.speculative else None) for b, n in enumerate(lengths)]

    def _prefill_cached(self, item: PrefillItem):
        n, start = len(item.token_ids), item.start
        chunk = next_pow2(n, MIN_CHUNK)
        ids = np.zeros((1, chunk), dtype=np.int32)
        ids[0, :n] = item.token_ids
        width = self._width(-(-start // self.block_size))
        tables = self._block_table_array([item.block_table], 1, width)
        outs = self._run("cached", ids, self._positions([start], 1, chunk), np.array([n - 1], dtype=np.int32), tables,
                         self._past_mask([start], 1, chunk, width), causal_mask(1, chunk))
        logits = outs[0].asnumpy()
        self._write(self.pools, outs[1].asnumpy(), [0] * n, start + np.arange(n), [item.block_table] * n, list(range(n)))
        return logits[0], outs[2].asnumpy()[0, :n] if self.speculative else None

    def decode(self, items: Sequence[DecodeItem]):
        """S new tokens per sequence (S = 1, or 2 when verifying a draft; equal for all items).
        Returns (logits [B,S,V] in the order of `items`, hidden [B,S,H] when speculating)."""
        B = len(items)
        S = len(items[0].token_ids)
        if any(len(it.token_ids) != S for it in items):
            raise ValueError("decode items must all carry the same number of tokens")
        batch = self._batch(B)
        starts = [it.position for it in items]
        width = self._width(-(-max(starts) // self.block_size))
        ids = np.zeros((batch, S), dtype=np.int32)
        for i, it in enumerate(items):
            ids[i] = it.token_ids
        positions = self._positions(starts, batch, S)
        tables = self._block_table_array([it.block_table for it in items], batch, width)
        index = np.arange(batch * S, dtype=np.int32)
        outs = self._run("cached", ids, positions, index, tables, self._past_mask(starts, batch, S, width),
                         causal_mask(batch, S))
        logits = outs[0].asnumpy().reshape(batch, S, -1)[:B]
        rows = np.repeat(np.arange(B), S)
        steps = np.tile(np.arange(S), B)
        self._write(self.pools, outs[1].asnumpy(), rows, positions[:B].reshape(-1),
                    [items[r].block_table for r in rows], steps)
        hidden = outs[2].asnumpy()[:B] if self.speculative else None
        return logits, hidden

    def draft(self, items: Sequence[DraftItem]) -> np.ndarray:
        """Run the MTP drafter; stores its latents and returns the logits [B,V] at each item's
        last position, which propose the token two places after it."""
        B = len(items)
        longest = max(len(it.next_token_ids) for it in items)
        S = next_pow2(longest, 2) if longest <= 2 else next_pow2(longest, MIN_CHUNK)
        batch = self._batch(B)
        starts = [it.position for it in items]
        width = self._width(-(-max(starts) // self.block_size))
        ids = np.zeros((batch, S), dtype=np.int32)
        hidden = np.zeros((batch, S, items[0].hidden.shape[-1]), dtype=items[0].hidden.dtype)
        index = np.zeros(batch, dtype=np.int32)
        for i, it in enumerate(items):
            n = len(it.next_token_ids)
            ids[i, :n] = it.next_token_ids
            hidden[i, :n] = it.hidden
            index[i] = i * S + n - 1
        tables = self._block_table_array([it.block_table for it in items], batch, width)
        logits, latents = self._run("mtp", ids, hidden, self._positions(starts, batch, S), index, tables,
                                    self._past_mask(starts, batch, S, width), causal_mask(batch, S))
        logits = logits.asnumpy()[:B]
        rows = [i for i, it in enumerate(items) for _ in it.next_token_ids]
        steps = [j for it in items for j in range(len(it.next_token_ids))]
        positions = np.asarray([items[r].position + j for r, j in zip(rows, steps)])
        self._write([self.mtp_pool], latents.asnumpy()[None], rows, positions, [items[r].block_table for r in rows],
                    steps)
        return logits
