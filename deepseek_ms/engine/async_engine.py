"""Async streaming facade: the engine steps in one background thread, callers await
per-request streams of `RequestOutput` deltas. Leaving a stream early (a client that
disconnects) cancels the request and frees its cache blocks.

Only the engine thread touches the engine. Callers post additions and cancellations to an
inbox that the thread drains between steps, so no event loop ever waits for a step (which
can take seconds while a new shape compiles); `stats()` returns the snapshot taken after
the latest step.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from typing import AsyncIterator, Deque, Dict, Optional, Sequence, Tuple, Union

from .llm_engine import LLMEngine
from .request import RequestOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while running a step that included this request."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: Deque[tuple] = collections.deque()  # appends and pops are atomic
        self._wake = threading.Event()
        self._streams: Dict[str, Tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="deepseek-ms-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: Union[str, Sequence[int]], params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. An invalid request raises ValueError here."""
        if self._stopping:
            raise RuntimeError("engine is shutting down")
        request_id = str(request_id) if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._inbox.append(("add", request_id, prompt, params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self):
        return dict(self._stats)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        if getattr(item, "finished", True):
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def _drain_inbox(self) -> None:
        while self._inbox:
            op, request_id, *args = self._inbox.popleft()
            if op == "abort":
                self.engine.abort(request_id)
                continue
            if request_id not in self._streams:  # cancelled before it was added
                continue
            try:
                self.engine.add_request(request_id, *args)
            except ValueError as e:
                self._deliver(request_id, e)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                self.engine.runner.keep_alive()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail only the requests in flight
                logger.exception("engine step failed")
                for request_id in list(self._streams):
                    self.engine.abort(request_id)
                    self._deliver(request_id, EngineStepError(f"engine step failed: {e}"))
                self.engine.step()  # drain the abort outputs
                continue
            finally:
                self._stats = self.engine.stats()
            for out in outputs:
                self._deliver(out.request_id, out)
