"""Continuous batching: which requests run this step, and with how many tokens.

Every step has a token budget (`max_num_batched_tokens`). Running requests go first, in
arrival order: a decode costs one token, an unfinished prompt gets the next chunk that
fits. Then waiting requests are admitted first-come-first-served while the budget, the
concurrency cap and the block pool allow. A prompt that fits in a step's budget is cut only
when it is the step's first: otherwise it waits for the next step whole, because its
remainder would run there anyway (with no earlier first token) as one more model call, which
costs about a decode step whatever its length. Longer prompts start in whatever budget is
left. Without chunked prefill a prompt runs whole (alone if it is larger than the budget).

When the pool cannot hold a running request's next token, the most recently arrived
running request is preempted: its blocks are freed and it goes back to the head of the
queue, to be recomputed later (prefix caching usually makes that cheap). Nothing crashes
and nothing accepted is lost.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List

from .block_manager import BlockManager
from .request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class PrefillChunk:
    request: Request
    start: int                 # first token position of the chunk
    token_ids: List[int]

    @property
    def completes_prompt(self) -> bool:
        return self.start + len(self.token_ids) == self.request.num_tokens


@dataclass
class SchedulerOutput:
    prefills: List[PrefillChunk] = field(default_factory=list)
    decodes: List[Request] = field(default_factory=list)
    preempted: List[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, num_lookahead_tokens: int = 0):
        self.blocks = block_manager
        # speculative decoding verifies a draft token after each decode token: it needs a
        # cache slot and a place in the token budget too
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []
        self.requests: Dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management ----
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and return its blocks at once."""
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.request_id)
        self.requests.pop(request.request_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- the step plan ----
    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.draft_token = None
        victim.status = RequestStatus.WAITING
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        logger.debug("preempted %s (recompute later)", victim.request_id)

    def _chunk(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if self.enable_chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()

        for request in list(self.running):
            if request not in self.running:  # preempted while making room for an earlier one
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining == 1:  # decode: the last sampled token (and any draft) needs a cache slot
                cost = 1 + self.num_lookahead_tokens
                if budget < cost:
                    continue
                need = request.num_tokens + self.num_lookahead_tokens - self.blocks.num_tokens(request.request_id)
                while not self.blocks.can_append(request.request_id, need):
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is request:
                        break
                if request not in self.running:
                    continue
                self.blocks.append_slots(request.request_id, need)
                out.decodes.append(request)
                budget -= cost
            else:  # a prompt (or recomputation) still being prefilled in chunks
                n = self._chunk(request, budget)
                if n <= 0:
                    continue
                start = request.num_computed_tokens
                out.prefills.append(PrefillChunk(request, start, request.all_token_ids[start:start + n]))
                budget -= n

        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            tokens = request.all_token_ids
            if not self.blocks.can_allocate(tokens):
                break  # FCFS: later requests do not overtake one that does not fit yet
            if not self.enable_chunked_prefill and len(tokens) > budget and not out.is_empty:
                break  # it will run whole in a later step
            if self.enable_chunked_prefill and budget < len(tokens) <= self.max_num_batched_tokens \
                    and out.prefills:
                break  # it runs whole next step rather than split (see the module docstring)
            self.waiting.popleft()
            computed = self.blocks.allocate(request.request_id, tokens)
            request.num_computed_tokens = computed
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                request.metrics.num_cached_prompt_tokens = computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            n = self._chunk(request, budget) if (self.enable_chunked_prefill or not out.is_empty) \
                else len(tokens) - computed
            if n > 0:
                out.prefills.append(PrefillChunk(request, computed, tokens[computed:computed + n]))
                budget -= n
        return out
