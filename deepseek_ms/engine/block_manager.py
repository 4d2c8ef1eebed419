"""Paged latent-cache block manager (pure Python / numpy bookkeeping, no MindSpore).

DeepSeek's MLA caches one latent per token per layer (``kv_lora_rank + qk_rope_head_dim``
values). The engine preallocates, per layer, a pool ``[num_blocks, block_size, latent_dim]``;
this module decides which rows of that pool belong to which sequence. It never touches
the pool itself: the model runner asks for a sequence's block table and slot mapping,
writes the latents there, and reports back with ``mark_computed``.

Block ids
    ``0`` is the *null block*: never handed out, so padded batch slots can point at it.
    Blocks ``1 .. num_blocks - 1`` are allocatable.

Life of a block
    * **in use**: ``ref_count > 0``; listed in the block table of ``ref_count`` sequences.
    * **free, uncached**: ``ref_count == 0`` and no content hash. Handed out first.
    * **free, cached** (evictable): ``ref_count == 0`` but its content hash is still
      registered, so a later request with the same prefix can pick it back up. When a
      fresh block is needed and there is no uncached free block, the *least recently
      freed* cached block is evicted (its hash entry is dropped) and reused.
    Both kinds of free block count in ``num_free_blocks``.

Prefix caching
    Only FULL blocks whose latents have been written (``mark_computed``) get a hash.
    A block's hash chains the hash of the block before it with the block's token ids::

        digest_0 = sha256(root(cache_salt) + tokens[0:B] as little-endian int64)
        digest_i = sha256(digest_{i-1} + tokens[i*B:(i+1)*B] as little-endian int64)

    ``root(cache_salt)`` is a fixed digest that mixes in the optional ``cache_salt``
    (model name, LoRA id, ...), so sequences with different salts never share blocks.
    SHA-256 over bytes is the same in every process (unlike the salted built-in
    ``hash``), so digests may be logged, compared, or shared between workers.

    ``allocate`` reuses the longest run of cached full blocks matching the prompt's
    prefix. If *every* block of the prompt hits (the prompt length is a multiple of
    ``block_size`` and all of it is cached), the last block is NOT reused: it is
    allocated fresh and recomputed, so the forward pass has at least one token and
    produces the logits for the next token. A partially filled block is never shared.

    When two sequences compute the same block independently (both allocated before
    either marked it computed), only the first one to call ``mark_computed`` registers
    it; the duplicate stays unhashed and becomes an ordinary free block when released.

Typical engine use::

    if bm.can_allocate(prompt):
        num_computed = bm.allocate(seq_id, prompt)          # tokens [num_computed, len) to run
    blocks, offsets = bm.slot_mapping(seq_id, num_computed, len(prompt))
    ... runner writes latents at pool[layer][blocks, offsets] ...
    bm.mark_computed(seq_id, prompt, len(prompt))
    # decode step
    if bm.append_slots(seq_id, 1): ...                     # else: preempt someone
    bm.free(seq_id)                                         # finished / cancelled / preempted
"""
import hashlib
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

NULL_BLOCK_ID = 0

_ROOT_DOMAIN = b"deepseek-ms/prefix-cache/v1"

CacheSalt = Optional[Union[str, bytes]]


class NoFreeBlocks(RuntimeError):
    """Not enough free blocks in the pool; the manager's state was left unchanged."""


# ---------------------------------------------------------------------------
# Sizing helpers
# ---------------------------------------------------------------------------

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def cache_bytes_per_token(num_layers: int, latent_dim: int, dtype_bytes: int = 4) -> int:
    """Bytes of latent cache one token occupies across all layers."""
    return (_positive_int("num_layers", num_layers) * _positive_int("latent_dim", latent_dim)
            * _positive_int("dtype_bytes", dtype_bytes))


def num_blocks_for_budget(budget_bytes: int, block_size: int, num_layers: int, latent_dim: int,
                          dtype_bytes: int = 4) -> int:
    """How many blocks (null block included) fit in ``budget_bytes``.

    Raises ValueError when fewer than 2 fit (the null block plus one usable block).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
        raise ValueError(f"budget_bytes must be an integer, got {budget_bytes!r}")
    block_bytes = _positive_int("block_size", block_size) * cache_bytes_per_token(
        num_layers, latent_dim, dtype_bytes)
    num_blocks = int(budget_bytes) // block_bytes
    if num_blocks < 2:
        raise ValueError(
            f"latent cache budget of {int(budget_bytes)} bytes is too small: one block of "
            f"{block_size} tokens takes {block_bytes} bytes, and the minimum is 2 blocks "
            f"(the null block plus one usable block) = {2 * block_bytes} bytes")
    return num_blocks


# ---------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------

def root_digest(cache_salt: CacheSalt = None) -> bytes:
    """Parent digest of a sequence's first block; mixes in ``cache_salt``."""
    if cache_salt is None:
        salt = b"\x00"
    elif isinstance(cache_salt, str):
        salt = b"\x01" + cache_salt.encode("utf-8")
    elif isinstance(cache_salt, (bytes, bytearray)):
        salt = b"\x02" + bytes(cache_salt)
    else:
        raise TypeError(f"cache_salt must be str, bytes or None, got {type(cache_salt).__name__}")
    return hashlib.sha256(_ROOT_DOMAIN + salt).digest()


def hash_block_tokens(parent_digest: bytes, token_ids: Sequence[int]) -> bytes:
    """Digest of one full block: sha256(parent digest + token ids as little-endian int64)."""
    tokens = np.asarray(token_ids, dtype="<i8")
    return hashlib.sha256(bytes(parent_digest) + tokens.tobytes()).digest()


# ---------------------------------------------------------------------------
# Block manager
# ---------------------------------------------------------------------------

class _SeqState:
    """Per-sequence bookkeeping."""
    __slots__ = ("block_ids", "num_tokens", "root", "block_hashes", "num_hashed")

    def __init__(self, root: bytes):
        self.block_ids: List[int] = []      # the block table
        self.num_tokens = 0                 # token slots reserved (prompt + appended)
        self.root = root                    # parent digest of block 0 (carries the salt)
        self.block_hashes: List[bytes] = []  # chain digests of this seq's full blocks, known so far
        self.num_hashed = 0                 # leading blocks already offered to the hash table


class BlockManager:
    """Hands out cache blocks to sequences, with ref-counted prefix sharing.

    Args:
        num_blocks: pool size including the null block 0 (so ``num_blocks - 1`` usable).
        block_size: tokens per block.
        enable_prefix_caching: when False, no lookups and no hash registration happen.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (null block plus one usable), got {num_blocks}")
        self.block_size = _positive_int("block_size", block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)

        self._ref_cnt: List[int] = [0] * self.num_blocks
        self._block_hash: List[Optional[bytes]] = [None] * self.num_blocks
        self._hash_to_block: Dict[bytes, int] = {}
        # Free blocks without a hash, handed out first (FIFO).
        self._free_uncached: Deque[int] = deque(range(1, self.num_blocks))
        # Free blocks with a registered hash, oldest-freed first (insertion order = LRU).
        self._evictable: "OrderedDict[int, None]" = OrderedDict()
        self._seqs: Dict[object, _SeqState] = {}

        self.prefix_hit_tokens = 0     # prompt tokens served from the prefix cache
        self.prefix_query_tokens = 0   # prompt tokens looked up (all successful allocates)
        self.num_evictions = 0         # cached blocks evicted to make room

    # -- accounting ---------------------------------------------------------

    @property
    def num_allocatable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (uncached free + evictable cached)."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_allocatable_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_allocatable_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a registered content hash (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def num_evictable_blocks(self) -> int:
        """Free blocks that still hold a reusable cached prefix."""
        return len(self._evictable)

    @property
    def prefix_hit_rate(self) -> float:
        """prefix_hit_tokens / prefix_query_tokens (0.0 before any query)."""
        if self.prefix_query_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def block_hash(self, block_id: int) -> Optional[bytes]:
        """The registered digest of a block, or None."""
        return self._block_hash[block_id]

    def num_tokens(self, seq_id) -> int:
        """Token slots reserved for a sequence (prompt + appended)."""
        return self._seq(seq_id).num_tokens

    def block_table(self, seq_id) -> List[int]:
        """A copy of the sequence's block ids, in token order."""
        return list(self._seq(seq_id).block_ids)

    def slot_mapping(self, seq_id, start: int, end: int) -> Tuple[np.ndarray, np.ndarray]:
        """(block ids, offsets within block), both int32[end - start], for positions [start, end)."""
        seq = self._seq(seq_id)
        if not 0 <= start <= end <= seq.num_tokens:
            raise ValueError(f"slot range [{start}, {end}) outside the {seq.num_tokens} "
                             f"reserved slots of sequence {seq_id!r}")
        positions = np.arange(start, end, dtype=np.int64)
        table = np.asarray(seq.block_ids, dtype=np.int32)
        block_ids = table[positions // self.block_size]
        offsets = (positions % self.block_size).astype(np.int32)
        return block_ids, offsets

    # -- allocation ---------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _lookup(self, token_ids: Sequence[int], root: bytes) -> Tuple[List[int], List[bytes]]:
        """Longest run of cached full blocks matching the prefix, with their digests.

        Applies the full-hit rule: never returns every block of the prompt.
        """
        if not self.enable_prefix_caching:
            return [], []
        hits: List[int] = []
        digests: List[bytes] = []
        parent = root
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            digest = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            block_id = self._hash_to_block.get(digest)
            if block_id is None:
                break
            hits.append(block_id)
            digests.append(digest)
            parent = digest
        if hits and len(hits) * bs == len(token_ids):
            hits.pop()      # keep the last block uncomputed so the step yields logits
            digests.pop()
        return hits, digests

    def _blocks_needed(self, num_tokens: int, hits: List[int]) -> int:
        """Free blocks consumed: fresh blocks plus hit blocks revived from the evictable pool."""
        revived = sum(1 for b in hits if self._ref_cnt[b] == 0)
        return self._blocks_for(num_tokens) - len(hits) + revived

    @staticmethod
    def _check_prompt(token_ids: Sequence[int]) -> None:
        if len(token_ids) == 0:
            raise ValueError("cannot allocate a sequence with an empty prompt")

    def cached_prefix_tokens(self, token_ids: Sequence[int], cache_salt: CacheSalt = None) -> int:
        """What ``allocate`` would return as computed tokens right now; changes nothing."""
        self._check_prompt(token_ids)
        hits, _ = self._lookup(token_ids, root_digest(cache_salt))
        return len(hits) * self.block_size

    def can_allocate(self, token_ids: Sequence[int], cache_salt: CacheSalt = None) -> bool:
        """Whether ``allocate`` would succeed for this prompt now (prefix hits included)."""
        self._check_prompt(token_ids)
        hits, _ = self._lookup(token_ids, root_digest(cache_salt))
        return self._blocks_needed(len(token_ids), hits) <= self.num_free_blocks

    def allocate(self, seq_id, token_ids: Sequence[int], cache_salt: CacheSalt = None) -> int:
        """Reserve slots for a new sequence's whole prompt, reusing cached prefix blocks.

        Returns the number of leading prompt tokens whose latents are already in the
        cache (a multiple of ``block_size``, always < len(token_ids)); the runner must
        compute tokens [returned value, len(token_ids)).
        Raises NoFreeBlocks (state unchanged) when the pool cannot hold the prompt, and
        ValueError if ``seq_id`` is already allocated or the prompt is empty.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        self._check_prompt(token_ids)
        root = root_digest(cache_salt)
        hits, digests = self._lookup(token_ids, root)
        needed = self._blocks_needed(len(token_ids), hits)
        if needed > self.num_free_blocks:
            raise NoFreeBlocks(f"sequence {seq_id!r} needs {needed} free blocks for "
                               f"{len(token_ids)} prompt tokens, {self.num_free_blocks} free")

        seq = _SeqState(root)
        for block_id in hits:           # revive hits first so they cannot be evicted below
            if self._ref_cnt[block_id] == 0:
                del self._evictable[block_id]
            self._ref_cnt[block_id] += 1
        seq.block_ids = list(hits)
        seq.block_hashes = list(digests)
        seq.num_hashed = len(hits)
        for _ in range(self._blocks_for(len(token_ids)) - len(hits)):
            seq.block_ids.append(self._take_free_block())
        seq.num_tokens = len(token_ids)
        self._seqs[seq_id] = seq

        num_computed = len(hits) * self.block_size
        self.prefix_hit_tokens += num_computed
        self.prefix_query_tokens += len(token_ids)
        return num_computed

    def can_append(self, seq_id, num_new_tokens: int) -> bool:
        """Whether ``append_slots(seq_id, num_new_tokens)`` would succeed now."""
        seq = self._seq(seq_id)
        return self._append_need(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq_id, num_new_tokens: int) -> bool:
        """Reserve ``num_new_tokens`` more slots (decode / chunked prefill).

        Returns False, with the state unchanged, if the pool cannot supply the blocks
        (the scheduler should then preempt something).
        """
        seq = self._seq(seq_id)
        need = self._append_need(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_ids.append(self._take_free_block())
        seq.num_tokens += num_new_tokens
        return True

    def _append_need(self, seq: _SeqState, num_new_tokens: int) -> int:
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, (int, np.integer)) \
                or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be a non-negative integer, got {num_new_tokens!r}")
        return self._blocks_for(seq.num_tokens + int(num_new_tokens)) - len(seq.block_ids)

    def _take_free_block(self) -> int:
        """Pop a fresh block: an uncached free one, else evict the LRU cached one."""
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash[block_id]]
            self._block_hash[block_id] = None
            self.num_evictions += 1
        else:  # callers check counts first
            raise NoFreeBlocks("block pool exhausted")
        self._ref_cnt[block_id] = 1
        return block_id

    # -- prefix registration ------------------------------------------------

    def mark_computed(self, seq_id, token_ids_so_far: Sequence[int], num_computed_tokens: int) -> None:
        """Register every newly FULL, computed block of the sequence for prefix caching.

        Call after the runner wrote latents for positions [0, num_computed_tokens).
        ``token_ids_so_far`` must hold at least those tokens (prompt + generated).
        Blocks already registered are skipped; a block whose content is already cached
        in another block stays unregistered (first writer wins).
        """
        seq = self._seq(seq_id)
        if not 0 <= num_computed_tokens <= seq.num_tokens:
            raise ValueError(f"num_computed_tokens={num_computed_tokens} outside the "
                             f"{seq.num_tokens} reserved slots of sequence {seq_id!r}")
        if len(token_ids_so_far) < num_computed_tokens:
            raise ValueError(f"token_ids_so_far has {len(token_ids_so_far)} tokens, fewer than "
                             f"num_computed_tokens={num_computed_tokens}")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = num_computed_tokens // bs
        for i in range(seq.num_hashed, num_full):
            if i < len(seq.block_hashes):
                digest = seq.block_hashes[i]
            else:
                parent = seq.block_hashes[i - 1] if i else seq.root
                digest = hash_block_tokens(parent, token_ids_so_far[i * bs:(i + 1) * bs])
                seq.block_hashes.append(digest)
            block_id = seq.block_ids[i]
            if digest not in self._hash_to_block and self._block_hash[block_id] is None:
                self._hash_to_block[digest] = block_id
                self._block_hash[block_id] = digest
        seq.num_hashed = max(seq.num_hashed, num_full)

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (e.g. after reloading weights). Returns entries dropped.

        Evictable blocks become plain free blocks; blocks in use stay allocated but are
        no longer shareable, and are not re-registered by later ``mark_computed`` calls.
        """
        dropped = len(self._hash_to_block)
        for block_id in self._evictable:
            self._free_uncached.append(block_id)
        self._evictable.clear()
        for block_id in self._hash_to_block.values():
            self._block_hash[block_id] = None
        self._hash_to_block.clear()
        return dropped

    # -- release ------------------------------------------------------------

    def free(self, seq_id) -> None:
        """Release a sequence's blocks. Unknown (or already freed) seq ids are a no-op.

        Blocks are released tail first, so when they are all cached the tail of the
        sequence (least likely to be shared) is evicted before its head.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for block_id in reversed(seq.block_ids):
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                if self._block_hash[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free_uncached.append(block_id)

    # -- internals ----------------------------------------------------------

    def _seq(self, seq_id) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (works under python -O).

        O(num_blocks + total block-table length); meant for tests and debugging.
        """
        def fail(msg):
            raise AssertionError(msg)

        n, bs = self.num_blocks, self.block_size
        refs = [0] * n
        for seq_id, seq in self._seqs.items():
            if len(seq.block_ids) != self._blocks_for(seq.num_tokens):
                fail(f"seq {seq_id!r}: {len(seq.block_ids)} blocks for {seq.num_tokens} tokens")
            if len(set(seq.block_ids)) != len(seq.block_ids):
                fail(f"seq {seq_id!r}: duplicate blocks in its table")
            if seq.num_hashed * bs > seq.num_tokens or len(seq.block_hashes) > len(seq.block_ids):
                fail(f"seq {seq_id!r}: more hashed blocks than full blocks")
            for i, block_id in enumerate(seq.block_ids):
                if not 1 <= block_id < n:
                    fail(f"seq {seq_id!r}: bad block id {block_id} (null block or out of range)")
                refs[block_id] += 1
                h = self._block_hash[block_id]
                if h is not None and (i >= len(seq.block_hashes) or seq.block_hashes[i] != h):
                    fail(f"seq {seq_id!r}: block {block_id} at index {i} holds a foreign hash")

        free_list = list(self._free_uncached)
        free_uncached = set(free_list)
        evictable = set(self._evictable)
        if len(free_uncached) != len(free_list):
            fail("duplicate block in the uncached free list")
        if free_uncached & evictable:
            fail(f"blocks both uncached-free and evictable: {sorted(free_uncached & evictable)}")
        if NULL_BLOCK_ID in free_uncached or NULL_BLOCK_ID in evictable:
            fail("null block in a free list")
        if self._ref_cnt[NULL_BLOCK_ID] != 0 or self._block_hash[NULL_BLOCK_ID] is not None:
            fail("null block was allocated or hashed")

        for block_id in range(1, n):
            ref = self._ref_cnt[block_id]
            if ref != refs[block_id]:
                fail(f"block {block_id}: ref_count {ref} but {refs[block_id]} sequences use it")
            h = self._block_hash[block_id]
            if block_id in evictable:
                if ref or h is None:
                    fail(f"evictable block {block_id}: ref_count {ref}, hash {h!r}")
            elif block_id in free_uncached:
                if ref or h is not None:
                    fail(f"uncached free block {block_id}: ref_count {ref}, hash {h!r}")
            elif ref <= 0:
                fail(f"block {block_id} is neither in use nor free (ref_count {ref})")
            if h is not None and self._hash_to_block.get(h) != block_id:
                fail(f"block {block_id}: its hash is not mapped back to it")

        for h, block_id in self._hash_to_block.items():
            if not 1 <= block_id < n or self._block_hash[block_id] != h:
                fail(f"hash entry points to block {block_id}, which does not hold that hash")
        if self.num_free_blocks + self.num_used_blocks != n - 1:
            fail("block counts do not add up")
        if not 0 <= self.prefix_hit_tokens <= self.prefix_query_tokens:
            fail("bad prefix counters")
