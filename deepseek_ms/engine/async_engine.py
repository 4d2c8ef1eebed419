"""Async streaming facade: the engine steps in one background thread, callers await
per-request streams of `RequestOutput` deltas. Leaving a stream early (a client that
disconnects) cancels the request and frees its cache blocks."""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Dict, Optional, Sequence, Tuple, Union

from .llm_engine import LLMEngine
from .request import RequestOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while running a step that included this request."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()        # the engine is not thread-safe: one caller at a time
        self._wake = threading.Event()
        self._streams: Dict[str, Tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deepseek-ms-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: Union[str, Sequence[int]], params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        if self._stopping:
            raise RuntimeError("engine is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            request_id = self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = (loop, queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def stats(self):
        with self._lock:
            return self.engine.stats()

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

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            with self._lock:
                try:
                    outputs = self.engine.step()
                except Exception as e:  # keep serving: fail only the requests in flight
                    logger.exception("engine step failed")
                    for request_id in list(self._streams):
                        self.engine.abort(request_id)
                        self._deliver(request_id, EngineStepError(f"engine step failed: {e}"))
                    self.engine.step()  # drain the abort outputs
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)
