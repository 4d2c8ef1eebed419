"""Tests for the paged latent-cache block manager (pure Python, no MindSpore).

Every manager built here is a `CheckedBlockManager`, which runs `check_invariants()`
after every public call (including calls that raise).
"""
import copy
import hashlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from deepseek_ms.engine.block_manager import (
    NULL_BLOCK_ID, BlockManager, NoFreeBlocks, cache_bytes_per_token, hash_block_tokens,
    num_blocks_for_budget, root_digest)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckedBlockManager(BlockManager):
    """BlockManager that verifies its invariants after every public operation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_invariants()


def _checked(name):
    base = getattr(BlockManager, name)

    def method(self, *args, **kwargs):
        try:
            return base(self, *args, **kwargs)
        finally:
            self.check_invariants()
    method.__name__ = name
    return method


for _name in ("allocate", "can_allocate", "append_slots", "can_append", "mark_computed",
              "free", "reset_prefix_cache", "cached_prefix_tokens", "slot_mapping", "block_table"):
    setattr(CheckedBlockManager, _name, _checked(_name))


def snapshot(bm):
    """Everything that must stay unchanged when an operation fails."""
    return copy.deepcopy((
        bm._ref_cnt, bm._block_hash, bm._hash_to_block, list(bm._free_uncached),
        list(bm._evictable),
        {k: (s.block_ids, s.num_tokens, s.block_hashes, s.num_hashed) for k, s in bm._seqs.items()},
        bm.prefix_hit_tokens, bm.prefix_query_tokens, bm.num_evictions))


def toks(start, n):
    return list(range(start, start + n))


def run_prompt(bm, seq_id, tokens, **kw):
    """Allocate and 'compute' a whole prompt; returns the cache-hit token count."""
    hit = bm.allocate(seq_id, tokens, **kw)
    bm.mark_computed(seq_id, tokens, len(tokens))
    return hit


# ---------------------------------------------------------------------------
# Sizing helpers
# ---------------------------------------------------------------------------

def test_cache_bytes_per_token():
    # DeepSeek-V2-Lite: 27 layers, kv_lora_rank 512 + rope 64 = 576, bf16
    assert cache_bytes_per_token(27, 576, 2) == 27 * 576 * 2
    assert cache_bytes_per_token(2, 10) == 80          # float32 by default
    with pytest.raises(ValueError):
        cache_bytes_per_token(0, 576)


def test_num_blocks_for_budget():
    per_block = 16 * cache_bytes_per_token(2, 10)      # 1280 bytes
    assert num_blocks_for_budget(10 * per_block, 16, 2, 10) == 10
    assert num_blocks_for_budget(10 * per_block + per_block - 1, 16, 2, 10) == 10
    assert num_blocks_for_budget(2 * per_block, 16, 2, 10) == 2
    with pytest.raises(ValueError, match="too small") as err:
        num_blocks_for_budget(2 * per_block - 1, 16, 2, 10)
    assert str(2 * per_block) in str(err.value)        # names the minimum


def test_constructor_validation():
    with pytest.raises(ValueError):
        BlockManager(1, 4)
    with pytest.raises(ValueError):
        BlockManager(8, 0)
    bm = CheckedBlockManager(2, 4)                      # one usable block is fine
    assert bm.num_free_blocks == 1 and bm.usage == 0.0


# ---------------------------------------------------------------------------
# Allocation, appends, slot mapping
# ---------------------------------------------------------------------------

def test_basic_allocate_append_free():
    bm = CheckedBlockManager(10, 4)
    assert bm.num_free_blocks == 9 and bm.num_used_blocks == 0
    assert bm.allocate("a", toks(0, 6)) == 0
    table = bm.block_table("a")
    assert len(table) == 2 and NULL_BLOCK_ID not in table
    assert bm.num_used_blocks == 2 and bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(2 / 9)
    assert bm.num_tokens("a") == 6 and "a" in bm

    assert bm.append_slots("a", 2)                      # 8 tokens: still 2 blocks
    assert bm.block_table("a") == table
    assert bm.append_slots("a", 1)                      # 9 tokens: a third block
    assert len(bm.block_table("a")) == 3 and bm.block_table("a")[:2] == table
    assert bm.append_slots("a", 0)
    assert bm.num_tokens("a") == 9

    bm.free("a")
    assert "a" not in bm
    assert bm.num_free_blocks == 9 and bm.num_used_blocks == 0 and bm.usage == 0.0
    with pytest.raises(KeyError):
        bm.block_table("a")


def test_allocate_rejects_duplicate_and_empty():
    bm = CheckedBlockManager(10, 4)
    bm.allocate(1, toks(0, 3))
    before = snapshot(bm)
    with pytest.raises(ValueError):
        bm.allocate(1, toks(0, 3))
    with pytest.raises(ValueError):
        bm.allocate(2, [])
    with pytest.raises(ValueError):
        bm.append_slots(1, -1)
    assert snapshot(bm) == before


def test_block_table_growth_across_boundaries():
    bs = 4
    bm = CheckedBlockManager(20, bs)
    bm.allocate("s", [7])
    tables = [bm.block_table("s")]
    for n in range(2, 3 * bs + 2):
        assert bm.can_append("s", 1)
        assert bm.append_slots("s", 1)
        table = bm.block_table("s")
        assert len(table) == -(-n // bs)
        assert table[:len(tables[-1])] == tables[-1]    # existing entries never move
        tables.append(table)
    assert len(set(tables[-1])) == len(tables[-1])
    # a multi-block append in one call
    assert bm.append_slots("s", 2 * bs)
    assert len(bm.block_table("s")) == -(-(3 * bs + 1 + 2 * bs) // bs)


def test_slot_mapping():
    bs = 4
    bm = CheckedBlockManager(20, bs)
    bm.allocate("x", toks(100, 10))
    bm.append_slots("x", 3)                             # 13 tokens, 4 blocks
    table = np.asarray(bm.block_table("x"))
    blocks, offsets = bm.slot_mapping("x", 0, 13)
    assert blocks.dtype == np.int32 and offsets.dtype == np.int32
    assert blocks.shape == offsets.shape == (13,)
    for p in range(13):
        assert blocks[p] == table[p // bs] and offsets[p] == p % bs
    b, o = bm.slot_mapping("x", 5, 9)
    assert b.tolist() == [table[1]] * 3 + [table[2]] and o.tolist() == [1, 2, 3, 0]
    b, o = bm.slot_mapping("x", 12, 13)                 # the single decode slot
    assert b.tolist() == [table[3]] and o.tolist() == [0]
    b, o = bm.slot_mapping("x", 7, 7)
    assert b.shape == o.shape == (0,) and b.dtype == np.int32
    # slots are unique across sequences
    bm.allocate("y", toks(0, 7))
    by, oy = bm.slot_mapping("y", 0, 7)
    flat = set(zip(blocks.tolist(), offsets.tolist())) | set(zip(by.tolist(), oy.tolist()))
    assert len(flat) == 20
    with pytest.raises(ValueError):
        bm.slot_mapping("x", 0, 14)
    with pytest.raises(ValueError):
        bm.slot_mapping("x", 3, 2)


# ---------------------------------------------------------------------------
# Prefix caching
# ---------------------------------------------------------------------------

def test_prefix_hit_for_shared_system_prompt():
    bs = 4
    bm = CheckedBlockManager(32, bs)
    system = toks(1000, 2 * bs)                         # two full blocks
    a = system + [1, 2, 3]
    assert run_prompt(bm, "a", a) == 0
    assert bm.num_cached_blocks == 2                    # partial third block not cached
    shared = bm.block_table("a")[:2]

    b = system + [7, 8, 9, 10, 11]
    assert bm.allocate("b", b) == 2 * bs                # while "a" is still running
    assert bm.block_table("b")[:2] == shared
    assert bm.block_table("b")[2:] != bm.block_table("a")[2:]
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    assert bm.prefix_hit_tokens == 2 * bs
    assert bm.prefix_query_tokens == len(a) + len(b)
    assert bm.prefix_hit_rate == pytest.approx(2 * bs / (len(a) + len(b)))
    used = bm.num_used_blocks
    assert used == 3 + 2                                 # shared blocks counted once

    bm.free("a")
    assert [bm.ref_count(x) for x in shared] == [1, 1]  # still held by "b"
    assert bm.num_used_blocks == 4
    assert bm.allocate("c", system + [5]) == 2 * bs
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    bm.free("b")
    bm.free("c")
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    assert bm.num_evictable_blocks == 2
    # cached blocks survive in the free pool and are picked up again
    assert bm.allocate("d", system + [6]) == 2 * bs
    assert bm.block_table("d")[:2] == shared


def test_chunked_prefill_registers_only_computed_full_blocks():
    bs = 4
    bm = CheckedBlockManager(32, bs)
    prompt = toks(0, 11)
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt, 3)
    assert bm.num_cached_blocks == 0
    bm.mark_computed("a", prompt, 6)
    assert bm.num_cached_blocks == 1
    assert bm.allocate("b", prompt) == bs               # only the computed block is a hit
    bm.mark_computed("a", prompt, 11)
    assert bm.num_cached_blocks == 2
    bm.mark_computed("a", prompt, 11)                   # idempotent
    assert bm.num_cached_blocks == 2
    assert bm.allocate("c", prompt) == 2 * bs


def test_decode_blocks_are_registered_too():
    bs = 4
    bm = CheckedBlockManager(32, bs)
    seq = toks(0, 6)
    run_prompt(bm, "a", seq)
    for t in (50, 51):                                  # generated tokens fill block 1
        assert bm.append_slots("a", 1)
        seq.append(t)
        bm.mark_computed("a", seq, len(seq))
    assert bm.num_cached_blocks == 2
    # a preempted-and-resumed request (prompt + output) hits both blocks
    assert bm.allocate("resumed", seq + [52]) == 2 * bs


def test_full_prompt_hit_keeps_last_block_uncomputed():
    bs = 4
    bm = CheckedBlockManager(32, bs)
    prompt = toks(0, 3 * bs)
    run_prompt(bm, "a", prompt)
    a_table = bm.block_table("a")
    assert bm.num_cached_blocks == 3

    assert bm.allocate("b", prompt) == 2 * bs           # not 3 * bs
    b_table = bm.block_table("b")
    assert b_table[:2] == a_table[:2] and b_table[2] != a_table[2]
    assert bm.ref_count(a_table[2]) == 1 and bm.ref_count(b_table[2]) == 1
    # recomputing the duplicate block does not steal the hash: the first writer keeps it
    bm.mark_computed("b", prompt, len(prompt))
    assert bm.block_hash(a_table[2]) is not None and bm.block_hash(b_table[2]) is None
    assert bm.num_cached_blocks == 3

    # same when every block is only in the evictable pool
    bm.free("a")
    bm.free("b")
    assert bm.num_evictable_blocks == 3 and bm.num_used_blocks == 0
    assert bm.allocate("c", prompt) == 2 * bs
    assert bm.block_table("c")[:2] == a_table[:2]
    assert bm.block_table("c")[2] != a_table[2]
    # a one-block prompt that is fully cached is recomputed from scratch
    assert bm.allocate("d", prompt[:bs]) == 0


def test_partial_last_block_never_shared():
    bs = 4
    bm = CheckedBlockManager(32, bs)
    prompt = toks(0, bs + 2)
    run_prompt(bm, "a", prompt)
    assert bm.num_cached_blocks == 1
    assert bm.allocate("b", prompt) == bs
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]
    # once "a" fills its second block, that block becomes shareable
    seq = prompt + [90, 91]
    assert bm.append_slots("a", 2)
    bm.mark_computed("a", seq, len(seq))
    assert bm.num_cached_blocks == 2
    assert bm.allocate("c", seq + [92]) == 2 * bs
    # a different continuation of the same partial block does not hit it
    assert bm.allocate("e", prompt + [80, 81, 82]) == bs


def test_cache_salt_isolates_prefixes():
    bs = 4
    bm = CheckedBlockManager(64, bs)
    prompt = toks(0, 2 * bs + 1)
    run_prompt(bm, "base", prompt)
    assert bm.allocate("lora1", prompt, cache_salt="lora-1") == 0
    bm.mark_computed("lora1", prompt, len(prompt))
    assert bm.allocate("lora1-again", prompt, cache_salt="lora-1") == 2 * bs
    assert bm.block_table("lora1-again")[:2] == bm.block_table("lora1")[:2]
    assert bm.allocate("base-again", prompt) == 2 * bs
    assert bm.block_table("base-again")[:2] == bm.block_table("base")[:2]
    assert bm.allocate("empty-salt", prompt, cache_salt="") == 0
    assert bm.allocate("bytes-salt", prompt, cache_salt=b"lora-1") == 0
    assert bm.can_allocate(prompt, cache_salt="lora-1")
    with pytest.raises(TypeError):
        bm.allocate("bad", prompt, cache_salt=3)
    assert len({root_digest(None), root_digest(""), root_digest("a"), root_digest(b"a")}) == 4


def test_prefix_caching_disabled():
    bs = 4
    bm = CheckedBlockManager(32, bs, enable_prefix_caching=False)
    prompt = toks(0, 3 * bs)
    assert run_prompt(bm, "a", prompt) == 0
    assert bm.num_cached_blocks == 0
    assert bm.allocate("b", prompt) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 31 and bm.num_evictable_blocks == 0
    assert bm.prefix_hit_tokens == 0 and bm.prefix_query_tokens == 2 * len(prompt)


def test_mark_computed_validation():
    bm = CheckedBlockManager(16, 4)
    prompt = toks(0, 6)
    bm.allocate("a", prompt)
    with pytest.raises(ValueError):
        bm.mark_computed("a", prompt, 7)                # beyond reserved slots
    with pytest.raises(ValueError):
        bm.mark_computed("a", prompt[:3], 4)            # not enough tokens given
    with pytest.raises(KeyError):
        bm.mark_computed("nope", prompt, 4)


def test_reset_prefix_cache():
    bs = 4
    bm = CheckedBlockManager(16, bs)
    run_prompt(bm, "a", toks(0, 2 * bs))
    run_prompt(bm, "b", toks(100, 2 * bs))
    bm.free("b")
    assert bm.num_cached_blocks == 4 and bm.num_evictable_blocks == 2
    assert bm.reset_prefix_cache() == 4
    assert bm.num_cached_blocks == 0 and bm.num_evictable_blocks == 0
    assert bm.num_free_blocks == 15 - 2
    assert bm.allocate("c", toks(0, 2 * bs + 1)) == 0
    bm.free("a")
    assert bm.num_free_blocks == 15 - 3


# ---------------------------------------------------------------------------
# Eviction
# ---------------------------------------------------------------------------

def test_eviction_is_lru_by_free_time():
    bs = 2
    bm = CheckedBlockManager(8, bs)                     # 7 usable blocks
    pa, pb, pc, pd = ([ord(k)] * bs for k in "abcd")
    for sid, p in zip("abcd", (pa, pb, pc, pd)):
        run_prompt(bm, sid, p)                          # one full, cached block each
        bm.free(sid)
    # free pool: 4 cached blocks freed in order a, b, c, d + 3 never-hashed blocks
    assert bm.num_free_blocks == 7 and bm.num_evictable_blocks == 4 and bm.num_evictions == 0

    def cached():
        return {k for k, p in zip("abcd", (pa, pb, pc, pd)) if bm.cached_prefix_tokens(p + [0])}

    assert cached() == set("abcd")
    assert bm.cached_prefix_tokens(pa) == 0             # full-hit rule applies to lookups too

    bm.allocate("x", toks(100, 4 * bs))                 # 3 uncached blocks first, then evicts a
    assert bm.num_evictions == 1 and cached() == set("bcd")
    bm.free("x")                                        # never computed: back as plain free blocks
    assert bm.num_evictable_blocks == 3

    assert bm.allocate("b2", pb + [0]) == bs            # reviving b ...
    bm.free("b2")                                       # ... makes it the most recently freed
    bm.allocate("y", toks(200, 5 * bs))                 # 4 uncached + evicts c (not b)
    assert bm.num_evictions == 2 and cached() == {"b", "d"}
    bm.free("y")
    bm.allocate("z", toks(300, 6 * bs))                 # 5 uncached + evicts d
    assert bm.num_evictions == 3 and cached() == {"b"}
    bm.allocate("w", toks(400, bs))                     # the last free block: b goes
    assert bm.num_evictions == 4 and cached() == set() and bm.num_free_blocks == 0
    assert bm.num_cached_blocks == 0


def test_free_releases_tail_first():
    bs = 2
    bm = CheckedBlockManager(5, bs)                     # 4 usable blocks
    prompt = toks(10, 4 * bs)
    run_prompt(bm, "a", prompt)
    bm.free("a")
    assert bm.num_evictable_blocks == 4
    bm.allocate("x", [0])                               # evicts the last block of "a"
    bm.allocate("y", [0])                               # and the one before it
    assert bm.num_evictions == 2
    assert bm.cached_prefix_tokens(prompt) == 2 * bs    # the head of "a" is still cached
    bm.free("x")
    bm.free("y")
    assert bm.allocate("again", prompt) == 2 * bs


def test_hits_on_evictable_blocks_are_counted_by_can_allocate():
    bs = 2
    bm = CheckedBlockManager(5, bs)                     # 4 usable blocks
    run_prompt(bm, "cached", [5, 5])
    bm.free("cached")                                   # 1 evictable block
    bm.allocate("busy", toks(0, 2 * bs))                # 2 blocks in use -> 2 free (1 evictable)
    prompt = [5, 5] + toks(20, 3)                       # hit (revive) + 2 fresh = 3 > 2 free
    assert not bm.can_allocate(prompt)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocks):
        bm.allocate("new", prompt)
    assert snapshot(bm) == before
    assert bm.can_allocate([5, 5, 1])                   # revive + 1 fresh = 2: fits
    assert bm.allocate("new", [5, 5, 1]) == bs


# ---------------------------------------------------------------------------
# Exhaustion and frees
# ---------------------------------------------------------------------------

def test_exhaustion_leaves_state_unchanged():
    bs = 4
    bm = CheckedBlockManager(5, bs)                     # 4 usable blocks
    bm.allocate("a", toks(0, 3 * bs))
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(toks(100, bs + 1))
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocks):
        bm.allocate("b", toks(100, bs + 1))
    assert snapshot(bm) == before and "b" not in bm

    assert not bm.can_append("a", bs + 1)
    assert not bm.append_slots("a", bs + 1)
    assert snapshot(bm) == before
    assert bm.can_append("a", bs)
    assert bm.append_slots("a", bs)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    assert not bm.can_allocate([1])
    assert bm.append_slots("a", 0)                      # no block needed
    bm.free("a")
    assert bm.num_free_blocks == 4


def test_free_unknown_and_double_free():
    bs = 4
    bm = CheckedBlockManager(16, bs)
    bm.free("never-allocated")
    system = toks(0, 2 * bs)
    run_prompt(bm, "a", system + [1])
    assert bm.allocate("b", system + [2]) == 2 * bs
    shared = bm.block_table("b")[:2]
    bm.free("a")
    bm.free("a")                                        # no-op
    assert [bm.ref_count(x) for x in shared] == [1, 1]
    bm.free("b")
    bm.free("b")
    assert bm.num_free_blocks == 15 and bm.num_used_blocks == 0
    assert all(bm.ref_count(x) == 0 for x in range(16))


# ---------------------------------------------------------------------------
# Hash stability
# ---------------------------------------------------------------------------

_DIGEST_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from deepseek_ms.engine.block_manager import BlockManager, hash_block_tokens, root_digest
d0 = hash_block_tokens(root_digest("model-x"), [1, 2, 3, 100000])
d1 = hash_block_tokens(d0, [5, 6, 7, 8])
bm = BlockManager(8, 4)
bm.allocate("s", list(range(9)))
bm.mark_computed("s", list(range(9)), 9)
print(d0.hex(), d1.hex(), ",".join(sorted(h.hex() for h in bm._hash_to_block)))
"""


def _digests_in_subprocess(hashseed):
    env = dict(os.environ, PYTHONHASHSEED=str(hashseed))
    out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT.format(root=REPO_ROOT)],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_hash_is_stable_across_processes():
    results = {_digests_in_subprocess(seed) for seed in (0, 1, 4242)}
    assert len(results) == 1
    d0 = hash_block_tokens(root_digest("model-x"), [1, 2, 3, 100000])
    assert results.pop().split()[0] == d0.hex()


def test_hash_definition():
    root = root_digest("model-x")
    tokens = [1, 2, 3, 100000]
    expected = hashlib.sha256(root + np.array(tokens, dtype="<i8").tobytes()).digest()
    assert hash_block_tokens(root, tokens) == expected
    assert hash_block_tokens(root, tuple(tokens)) == expected
    assert hash_block_tokens(root, np.array(tokens, dtype=np.int32)) == expected
    assert hash_block_tokens(root, [1, 2, 3, 100001]) != expected
    assert hash_block_tokens(root_digest(None), tokens) != expected


# ---------------------------------------------------------------------------
# Soak
# ---------------------------------------------------------------------------

def test_soak_random_requests():
    """1,000 requests: random prompts built from a few shared prefixes, chunked prefill,
    decode appends, cancellations and preemptions at random times.

    A fake runner writes a 'latent' per slot that depends on the whole prefix (like a real
    KV cache would), so every prefix hit is checked against the data actually stored.
    """
    rng = random.Random(1234)
    bs, num_blocks, num_requests = 4, 40, 1000
    bm = CheckedBlockManager(num_blocks, bs)
    pool = np.empty((num_blocks, bs), dtype=object)     # fake latent cache
    prefixes = [[rng.randrange(50) for _ in range(n)] for n in (4, 8, 6, 13)]
    salts = [None, None, None, "lora-a"]

    active = {}   # seq_id -> dict(tokens, computed, prompt_len, max_new, salt)
    stats = dict(submitted=0, hits=0, no_free=0, append_fail=0, preempt=0, cancel=0, finished=0)
    pending = None

    def latent(salt, tokens, pos):
        return (salt, tuple(tokens[:pos + 1]))

    def write(sid, start, end):
        st = active[sid]
        blocks, offsets = bm.slot_mapping(sid, start, end)
        for pos, b, o in zip(range(start, end), blocks.tolist(), offsets.tolist()):
            assert b != NULL_BLOCK_ID
            assert bm.ref_count(b) == 1, "writing into a shared block"
            assert bm.block_hash(b) is None, "writing into a cached block"
            pool[b, o] = latent(st["salt"], st["tokens"], pos)
        st["computed"] = end
        bm.mark_computed(sid, st["tokens"], end)

    def release(sid, kind):
        bm.free(sid)
        del active[sid]
        stats[kind] += 1
        if rng.random() < 0.1:
            bm.free(sid)                                # stray double free

    def new_request():
        prefix = rng.choice(prefixes + [[]])
        suffix = [rng.randrange(50) for _ in range(rng.randrange(0 if prefix else 1, 10))]
        return dict(tokens=prefix + suffix, salt=rng.choice(salts), max_new=rng.randrange(0, 12))

    next_id = 0
    while stats["submitted"] < num_requests or active:
        r = rng.random()
        if stats["submitted"] < num_requests and (r < 0.3 or not active):
            if pending is None:
                pending = new_request()
            tokens = pending["tokens"]
            if not bm.can_allocate(tokens, cache_salt=pending["salt"]):
                before = snapshot(bm)
                with pytest.raises(NoFreeBlocks):
                    bm.allocate(next_id, tokens, cache_salt=pending["salt"])
                assert snapshot(bm) == before
                stats["no_free"] += 1
                release(rng.choice(sorted(active)), "preempt")
                continue
            sid, next_id = next_id, next_id + 1
            hit = bm.allocate(sid, tokens, cache_salt=pending["salt"])
            assert hit % bs == 0 and 0 <= hit < len(tokens)
            active[sid] = dict(tokens=list(tokens), computed=hit, prompt_len=len(tokens),
                               max_new=pending["max_new"], salt=pending["salt"])
            blocks, offsets = bm.slot_mapping(sid, 0, hit)
            for pos, b, o in zip(range(hit), blocks.tolist(), offsets.tolist()):
                assert pool[b, o] == latent(pending["salt"], tokens, pos), "stale prefix hit"
            stats["hits"] += hit > 0
            stats["submitted"] += 1
            pending = None
        elif r < 0.35:
            release(rng.choice(sorted(active)), "cancel")
        else:
            sid = rng.choice(sorted(active))
            st = active[sid]
            if st["computed"] < st["prompt_len"]:       # (chunked) prefill
                end = min(st["prompt_len"], st["computed"] + rng.randrange(1, 9))
                write(sid, st["computed"], end)
            elif len(st["tokens"]) - st["prompt_len"] >= st["max_new"]:
                release(sid, "finished")
            else:                                       # decode 1..3 tokens
                n = rng.choice((1, 1, 1, 2, 3))
                if not bm.can_append(sid, n):
                    before = snapshot(bm)
                    assert not bm.append_slots(sid, n)
                    assert snapshot(bm) == before
                    stats["append_fail"] += 1
                    release(sid, "preempt")
                    continue
                assert bm.append_slots(sid, n)
                st["tokens"].extend(rng.randrange(50) for _ in range(n))
                write(sid, st["computed"], len(st["tokens"]))

    assert bm.num_seqs == 0
    assert bm.num_free_blocks == num_blocks - 1
    assert bm.num_used_blocks == 0 and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))
    # the run really exercised sharing, eviction and exhaustion
    assert stats["hits"] > 100 and bm.prefix_hit_tokens > 0
    assert bm.num_evictions > 0 and bm.num_cached_blocks > 0
    assert stats["no_free"] > 0 and stats["append_fail"] > 0
    assert stats["cancel"] > 0 and stats["finished"] > 0


def test_check_invariants_detects_corruption():
    def fresh():
        bm = BlockManager(8, 2)
        run_prompt(bm, "a", [1, 2, 3])
        bm.allocate("b", [1, 2, 9])                     # shares block 0 of "a"
        run_prompt(bm, "c", [4, 4])
        bm.free("c")                                    # one evictable block
        bm.check_invariants()
        return bm

    shared = fresh().block_table("a")[0]
    corruptions = [
        lambda bm: bm._ref_cnt.__setitem__(shared, 1),              # lost a reference
        lambda bm: bm._free_uncached.append(bm._free_uncached[0]),  # duplicate free block
        lambda bm: bm._free_uncached.append(shared),                # in use and free
        lambda bm: bm._free_uncached.append(NULL_BLOCK_ID),         # null block handed out
        lambda bm: bm._seqs["a"].block_ids.__setitem__(1, NULL_BLOCK_ID),
        lambda bm: bm._hash_to_block.__setitem__(b"x" * 32, shared),  # stale hash entry
        lambda bm: bm._block_hash.__setitem__(bm.block_table("b")[1], b"y" * 32),
        lambda bm: bm._free_uncached.popleft(),                     # leaked block
    ]
    for corrupt in corruptions:
        bm = fresh()
        corrupt(bm)
        with pytest.raises(AssertionError):
            bm.check_invariants()
