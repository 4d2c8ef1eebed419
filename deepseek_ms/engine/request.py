"""A request's life in the engine, and what the engine reports back about it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token id or a stop string
    LENGTH = "length"      # max_tokens or the model's context length
    ABORT = "abort"        # cancelled by the caller


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0


class Request:
    """Token-level state. `num_computed_tokens` counts tokens whose latents are in the cache;
    everything after them (a prompt remainder, or the last sampled token) is still to run."""

    def __init__(self, request_id: str, prompt_token_ids: List[int], sampling, sampling_state,
                 detokenizer=None, stop_matcher=None, arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: List[int] = []
        self.sampling = sampling
        self.sampling_state = sampling_state
        self.detokenizer = detokenizer
        self.stop_matcher = stop_matcher
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.draft_token: Optional[int] = None  # the MTP drafter's guess at the next token
        self.finish_reason: Optional[FinishReason] = None
        self.stop_reason = None  # the stop string or token id that ended it
        self.output_text = ""
        self.output_logprobs: List[Tuple[int, float, list]] = []
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())

    @property
    def all_token_ids(self) -> List[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one engine step produced for one request. `new_token_ids` / `delta_text` are the
    increment since the previous output; `token_ids` / `text` are everything so far."""
    request_id: str
    prompt_token_ids: List[int]
    token_ids: List[int]
    new_token_ids: List[int]
    text: str
    delta_text: str
    finished: bool
    finish_reason: Optional[str] = None
    stop_reason: object = None
    logprobs: List[Tuple[int, float, list]] = field(default_factory=list)  # (token, logprob, top-n) per new token
    metrics: Optional[RequestMetrics] = None
