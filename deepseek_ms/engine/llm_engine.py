"""The synchronous engine: add_request / step / abort (vLLM's LLMEngine shape).

One `step()` = schedule (scheduler) -> run the chunks and the decode batch (model runner)
-> sample (sampler) -> detokenize, check stops, emit `RequestOutput`s, free what finished.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..api import CausalLM
from .block_manager import BlockManager, cache_bytes_per_token, num_blocks_for_budget
from .model_runner import DecodeItem, DraftItem, ModelRunner, PrefillItem
from .request import FinishReason, Request, RequestOutput, RequestStatus
from .sampling import Sampler, SamplingParams, SequenceSamplingState
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 16                 # concurrent sequences (decode batch slots)
    # per-step token budget (prefill chunks + decodes). Larger budgets batch more prompts per
    # step, so each weight is read once for more rows (the 16 x 128-token benchmark: 9.7 s at
    # 2048, 11.7-13.9 s at 512); the price is that running streams wait for the step, up to
    # a whole budget of prefill. 2048 is also where vLLM's and SGLang's defaults start.
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None    # default: the model's max_seq_len
    cache_memory_bytes: int = 256 * 2 ** 20
    num_blocks: Optional[int] = None       # overrides cache_memory_bytes when set
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # MTP speculative decoding: 1 = the model's MTP module drafts one token per step and the
    # next step verifies it (needs MTP weights); 0 = off
    num_speculative_tokens: int = 0
    # keep compiled graphs on disk so that a restart skips compilation (see ModelRunner)
    compile_cache_dir: Optional[str] = None

    def validate(self) -> None:
        for key in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cache_memory_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"engine config '{key}' must be a positive integer, got {value!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 2):
            raise ValueError(f"engine config 'num_blocks' must be an integer >= 2, got {self.num_blocks!r}")
        if self.num_speculative_tokens not in (0, 1):
            raise ValueError("engine config 'num_speculative_tokens' must be 0 (off) or 1 (one MTP draft token), "
                             f"got {self.num_speculative_tokens!r}")


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer=None, config: Optional[EngineConfig] = None):
        config = config or EngineConfig()
        config.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        cfg = model.config
        self.max_model_len = min(config.max_model_len or model.max_seq_len, model.max_seq_len)
        num_blocks = config.num_blocks or num_blocks_for_budget(
            config.cache_memory_bytes, config.block_size, cfg.num_hidden_layers, cfg.latent_dim)
        self.speculative = config.num_speculative_tokens > 0
        if self.speculative and cfg.num_nextn_predict_layers < 1:
            raise ValueError("num_speculative_tokens=1 needs a checkpoint with MTP weights "
                             "(config num_nextn_predict_layers is 0)")
        if self.speculative:  # the MTP block's latents take one more layer's worth of cache
            num_blocks = config.num_blocks or num_blocks_for_budget(
                config.cache_memory_bytes, config.block_size, cfg.num_hidden_layers + 1, cfg.latent_dim)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill, config.num_speculative_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.max_model_len, config.max_num_seqs,
                                  self.speculative, config.compile_cache_dir)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.sampler = Sampler()
        self.eos_token_id = self._eos_token_id()
        self._ids = itertools.count()
        self._pending: List[RequestOutput] = []
        self.num_steps = 0
        self.num_generated_tokens = 0
        logger.info("engine: %d cache blocks x %d tokens (%.1f MiB, %d bytes/token), max_model_len %d",
                    num_blocks, config.block_size, self.runner.cache_bytes / 2 ** 20, self.cache_bytes_per_token,
                    self.max_model_len)

    def _eos_token_id(self) -> Optional[int]:
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            return int(self.tokenizer.eos_token_id)
        eos = self.model.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return None if eos is None else int(eos)

    # ---- accounting ----
    @property
    def cache_bytes_per_token(self) -> int:
        cfg = self.model.config
        return cache_bytes_per_token(cfg.num_hidden_layers + int(self.speculative), cfg.latent_dim)

    def stats(self) -> Dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "cache_blocks_total": bm.num_allocatable_blocks,
            "cache_blocks_free": bm.num_free_blocks,
            "cache_usage": bm.usage,
            "prefix_cache_hit_rate": bm.prefix_hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
        }

    # ---- requests ----
    def add_request(self, request_id: Optional[str], prompt: Union[str, Sequence[int]],
                    params: Optional[SamplingParams] = None, arrival_time: Optional[float] = None) -> str:
        params = params or SamplingParams()
        request_id = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load one")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context length "
                             f"{self.max_model_len} (at least one token must be generated)")
        blocks_needed = -(-(len(prompt_ids) + 1) // self.config.block_size)
        if blocks_needed > self.block_manager.num_allocatable_blocks:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens needs {blocks_needed} cache blocks; "
                             f"the pool has {self.block_manager.num_allocatable_blocks}")
        state = SequenceSamplingState(params, prompt_ids, None if params.ignore_eos else self.eos_token_id)
        detok = stops = None
        if self.tokenizer is not None:
            from ..detokenizer import IncrementalDetokenizer, StopStringMatcher
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
            stops = StopStringMatcher(params.stop) if params.stop else None
        elif params.stop:
            raise ValueError("stop strings need a tokenizer")
        request = Request(request_id, prompt_ids, params, state, detok, stops, arrival_time)
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its blocks return to the pool at once; its final output (finish
        reason "abort") is reported by the next step()."""
        request = self.scheduler.requests.get(str(request_id))
        if request is None:
            return False
        request.finish_reason = FinishReason.ABORT
        self.scheduler.finish(request)
        request.metrics.finished_time = time.monotonic()
        self._pending.append(self._output(request, [], "", []))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    # ---- the step ----
    def step(self) -> List[RequestOutput]:
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        self.num_steps += 1
        to_sample: List[Request] = []
        rows: List[np.ndarray] = []
        drafts: List[Tuple[Request, int, int, np.ndarray, bool]] = []  # (request, start, n, hidden, wants draft)
        chunks = [PrefillItem(c.token_ids, c.start, self.block_manager.block_table(c.request.request_id))
                  for c in plan.prefills]
        computed = self.runner.prefill(chunks) if chunks else []
        for chunk, (logits, hidden) in zip(plan.prefills, computed):
            request = chunk.request
            self._computed(request, len(chunk.token_ids))
            if chunk.completes_prompt:
                to_sample.append(request)
                rows.append(logits)
            if self.speculative:
                drafts.append((request, chunk.start, len(chunk.token_ids), hidden, chunk.completes_prompt))
        verify = None
        if plan.decodes:
            # when speculating, every decode carries a draft; a request without one (just
            # preempted) verifies a stand-in, which is exact, merely unlikely to be accepted
            items = [DecodeItem([r.all_token_ids[-1]] + ([r.draft_token if r.draft_token is not None
                                                          else r.all_token_ids[-1]] if self.speculative else []),
                                r.num_tokens - 1, self.block_manager.block_table(r.request_id))
                     for r in plan.decodes]
            logits, hidden = self.runner.decode(items)
            for i, request in enumerate(plan.decodes):
                self._computed(request, 1)
                to_sample.append(request)
                rows.append(logits[i, 0])
            verify = (items, logits, hidden)
        outputs += self._sample(to_sample, rows)
        if verify is not None and self.speculative:
            outputs += self._accept_drafts(plan.decodes, *verify, drafts)
        if drafts:
            self._propose(drafts)
        return outputs

    def _computed(self, request: Request, n: int) -> None:
        request.num_computed_tokens += n
        self.block_manager.mark_computed(request.request_id, request.all_token_ids, request.num_computed_tokens)

    def _sample(self, requests: List[Request], rows: List[np.ndarray]) -> List[RequestOutput]:
        if not requests:
            return []
        sampled = self.sampler.sample(np.stack(rows), [r.sampling_state for r in requests])
        now = time.monotonic()
        return [self._append_token(r, int(sampled.token_ids[i]), sampled, i, now) for i, r in enumerate(requests)]

    def _accept_drafts(self, decodes: List[Request], items: List[DecodeItem], logits: np.ndarray, hidden: np.ndarray,
                       drafts: list) -> List[RequestOutput]:
        """A draft is accepted when the token sampled at its position equals it; the verify
        step's second row then holds the distribution of the token after it, sampled in a
        second pass so that each request's generator draws in the same order as without
        speculation (same seed, same output)."""
        accepted, rows = [], []
        for i, request in enumerate(decodes):
            self.num_draft_tokens += 1
            hit = not request.is_finished and request.output_token_ids[-1] == items[i].token_ids[1]
            if hit:
                self.num_accepted_tokens += 1
                self._computed(request, 1)
                accepted.append(request)
                rows.append(logits[i, 1])
            if not request.is_finished:
                drafts.append((request, items[i].position, 1 + hit, hidden[i, :1 + hit], True))
        return self._sample(accepted, rows)

    def _propose(self, drafts: List[Tuple[Request, int, int, np.ndarray, bool]]) -> None:
        """Run the MTP drafter over the positions computed this step (position p pairs the
        hidden state at p with the token at p + 1) and keep each live request's next draft."""
        prompt_jobs = [d for d in drafts if d[2] > 2]
        decode_jobs = [d for d in drafts if d[2] <= 2]
        for group in [[job] for job in prompt_jobs] + ([decode_jobs] if decode_jobs else []):
            live = [(r, start, n, h, want) for r, start, n, h, want in group if not r.is_finished]
            if not live:
                continue
            items = [DraftItem(r.all_token_ids[start + 1:start + n + 1], h, start,
                               self.block_manager.block_table(r.request_id)) for r, start, n, h, _ in live]
            proposals = self.runner.draft(items).argmax(-1)
            for (request, _, _, _, want), token in zip(live, proposals):
                if want:
                    request.draft_token = int(token)

    def _append_token(self, request: Request, token: int, sampled, row: int, now: float) -> RequestOutput:
        params = request.sampling
        request.output_token_ids.append(token)
        request.sampling_state.append(token)
        self.num_generated_tokens += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        logprobs = []
        if params.logprobs is not None:
            entry = (token, float(sampled.logprobs[row]), list(sampled.top_logprobs[row]))
            logprobs.append(entry)
            request.output_logprobs.append(entry)

        delta = ""
        stop_hit = None
        if request.detokenizer is not None:
            delta = request.detokenizer.add(token)
            if request.stop_matcher is not None:
                delta, stop_hit = request.stop_matcher.feed(delta)

        n_out = len(request.output_token_ids)
        reason = None
        if stop_hit is not None:
            reason, request.stop_reason = FinishReason.STOP, stop_hit
        elif n_out >= params.min_tokens and not params.ignore_eos and token == self.eos_token_id:
            reason, request.stop_reason = FinishReason.STOP, token
        elif n_out >= params.min_tokens and token in params.stop_token_ids:
            reason, request.stop_reason = FinishReason.STOP, token
        elif n_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if stop_hit is None and request.stop_matcher is not None:
                delta += request.stop_matcher.flush()
            request.finish_reason = reason
            request.metrics.finished_time = now
            self.scheduler.finish(request)
        request.output_text += delta
        return self._output(request, [token], delta, logprobs)

    @staticmethod
    def _output(request: Request, new_tokens: List[int], delta: str, logprobs) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids), new_token_ids=new_tokens, text=request.output_text,
            delta_text=delta, finished=request.status == RequestStatus.FINISHED,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            stop_reason=request.stop_reason, logprobs=logprobs, metrics=request.metrics)
