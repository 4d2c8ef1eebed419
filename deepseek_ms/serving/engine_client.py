"""Clients of the engine server (wire protocol: see engine_server.py).

    client = EngineClient("unix:/tmp/deepseek-ms-engine.sock")
    out = client.generate([0, 17, 234], {"max_tokens": 16, "temperature": 0.0})
    # {"token_ids": [...], "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 16}
    for delta in client.stream(ids, params):   # {"new_token_ids", "finished", "finish_reason", "logprobs"}
        ...

Every request runs on its own connection, so a client holds no state between calls: after
an engine restart the next call simply connects again, and closing the connection (a
stream abandoned early, a timeout) is what cancels the request on the engine side.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
import uuid
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple

# One JSON message per line; a prompt of 100k ids is about 700 kB.
MAX_MESSAGE_BYTES = 64 * 2 ** 20


class EngineError(RuntimeError):
    """Base class of the errors the engine clients raise."""


class EngineUnavailableError(EngineError):
    """Cannot connect, the connection broke, or the engine is shutting down."""


class EngineOverloadedError(EngineError):
    """The engine's queue of waiting requests is full; retry later."""


class EngineRequestError(EngineError, ValueError):
    """The engine refused this request (bad prompt or sampling parameters); the message names the problem."""


class EngineTimeoutError(EngineError, TimeoutError):
    """The request did not finish in time; it has been cancelled on the engine."""


_ERRORS = {"invalid_request": EngineRequestError, "overloaded": EngineOverloadedError,
           "shutting_down": EngineUnavailableError}


def parse_address(address: str) -> Tuple[str, Any]:
    """"unix:/path.sock" -> ("unix", "/path.sock"); "tcp:HOST:PORT" -> ("tcp", (HOST, PORT))."""
    if not isinstance(address, str):
        raise ValueError(f"engine address must be a string, got {address!r}")
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", (host, int(port))
    raise ValueError(f"engine address {address!r}: expected 'unix:/path/to.sock' or 'tcp:HOST:PORT'")


def encode(message: Dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _raise_for(message: Dict[str, Any]) -> None:
    if message.get("type") == "error":
        cls = _ERRORS.get(message.get("code"), EngineError)
        raise cls(message.get("message") or "engine error")


def _generate_message(request_id: str, prompt_ids, params: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {"op": "generate", "id": request_id, "prompt_token_ids": list(prompt_ids), "params": dict(params or {})}


def _delta(message: Dict[str, Any]) -> Dict[str, Any]:
    return {"new_token_ids": message["new_token_ids"], "finished": message["finished"],
            "finish_reason": message.get("finish_reason"), "logprobs": message.get("logprobs"),
            "prompt_tokens": message.get("prompt_tokens")}


def _collect(deltas, prompt_len: int) -> Dict[str, Any]:
    token_ids: List[int] = []
    reason = None
    for delta in deltas:
        token_ids += delta["new_token_ids"]
        reason = delta["finish_reason"]
    return {"token_ids": token_ids, "finish_reason": reason, "prompt_tokens": prompt_len,
            "completion_tokens": len(token_ids)}


class _Client:
    """What both clients share: the parsed address and process-unique request ids."""

    def __init__(self, address: str):
        self.address = address
        self._family, self._target = parse_address(address)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _reply(self, line: bytes) -> Dict[str, Any]:
        """One line from the engine -> its message; an error message raises its EngineError."""
        if not line:
            raise EngineUnavailableError(f"the engine at {self.address} closed the connection")
        reply = json.loads(line)
        _raise_for(reply)
        return reply


class EngineClient(_Client):
    """Blocking client; one call at a time per instance (each call opens its own connection)."""

    def _connect(self, timeout: float) -> socket.socket:
        family = socket.AF_UNIX if self._family == "unix" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(max(timeout, 1e-3))
        try:
            sock.connect(self._target)
        except OSError as e:
            sock.close()
            raise EngineUnavailableError(f"cannot reach the engine at {self.address}: {e}") from None
        return sock

    def _exchange(self, message: Dict[str, Any], timeout: float) -> Iterator[Dict[str, Any]]:
        """Send one message; yield the replies for it until the caller stops or the stream ends."""
        deadline = time.monotonic() + timeout
        sock = self._connect(timeout)
        try:
            sock.sendall(encode(message))
            reader = sock.makefile("rb")
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineTimeoutError(f"engine request timed out after {timeout:g} s")
                sock.settimeout(remaining)
                try:
                    line = reader.readline(MAX_MESSAGE_BYTES)
                except socket.timeout:
                    raise EngineTimeoutError(f"engine request timed out after {timeout:g} s") from None
                except OSError as e:
                    raise EngineUnavailableError(f"lost the connection to the engine at {self.address}: {e}") from None
                yield self._reply(line)
        finally:
            sock.close()

    def stream(self, prompt_ids, params: Optional[Dict[str, Any]] = None,
               timeout: float = 600.0) -> Iterator[Dict[str, Any]]:
        request_id = self.new_request_id()
        replies = self._exchange(_generate_message(request_id, prompt_ids, params), timeout)
        try:
            for reply in replies:
                delta = _delta(reply)
                yield delta
                if delta["finished"]:
                    return
        finally:
            replies.close()  # closes the connection: an unfinished request is cancelled

    def generate(self, prompt_ids, params: Optional[Dict[str, Any]] = None,
                 timeout: float = 600.0) -> Dict[str, Any]:
        prompt_ids = list(prompt_ids)
        return _collect(self.stream(prompt_ids, params, timeout), len(prompt_ids))

    def health(self, timeout: float = 5.0) -> Dict[str, Any]:
        replies = self._exchange({"op": "health", "id": "health"}, timeout)
        try:
            reply = next(replies)
        finally:
            replies.close()
        return {k: v for k, v in reply.items() if k not in ("id", "type")}


class AsyncEngineClient(_Client):
    """asyncio client for the HTTP front end; any number of concurrent calls."""

    def __init__(self, address: str):
        super().__init__(address)
        self._writers: Dict[str, asyncio.StreamWriter] = {}

    async def _connect(self, timeout: float):
        try:
            if self._family == "unix":
                opening = asyncio.open_unix_connection(self._target, limit=MAX_MESSAGE_BYTES)
            else:
                opening = asyncio.open_connection(*self._target, limit=MAX_MESSAGE_BYTES)
            return await asyncio.wait_for(opening, timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise EngineUnavailableError(f"cannot reach the engine at {self.address}: "
                                         f"{e or type(e).__name__}") from None

    async def _readline(self, reader: asyncio.StreamReader, timeout: Optional[float]) -> Dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise EngineTimeoutError(f"engine request timed out after {timeout:g} s") from None
        except (OSError, ValueError) as e:
            raise EngineUnavailableError(f"lost the connection to the engine at {self.address}: {e}") from None
        return self._reply(line)

    async def stream(self, prompt_ids, params: Optional[Dict[str, Any]] = None, timeout: float = 600.0,
                     request_id: Optional[str] = None) -> AsyncIterator[Dict[str, Any]]:
        """Deltas of one request. Leaving the loop early (or `cancel(request_id)`) cancels it."""
        request_id = request_id or self.new_request_id()
        deadline = time.monotonic() + timeout
        reader, writer = await self._connect(timeout)
        self._writers[request_id] = writer
        try:
            writer.write(encode(_generate_message(request_id, prompt_ids, params)))
            while True:
                delta = _delta(await self._readline(reader, deadline - time.monotonic()))
                yield delta
                if delta["finished"]:
                    return
        finally:
            self._writers.pop(request_id, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def generate(self, prompt_ids, params: Optional[Dict[str, Any]] = None,
                       timeout: float = 600.0) -> Dict[str, Any]:
        prompt_ids = list(prompt_ids)
        deltas = [d async for d in self.stream(prompt_ids, params, timeout)]
        return _collect(deltas, len(prompt_ids))

    async def health(self, timeout: float = 5.0) -> Dict[str, Any]:
        reader, writer = await self._connect(timeout)
        try:
            writer.write(encode({"op": "health", "id": "health"}))
            reply = await self._readline(reader, timeout)
        finally:
            writer.close()
        return {k: v for k, v in reply.items() if k not in ("id", "type")}

    async def cancel(self, request_id: str) -> None:
        """Cancel a running `stream` of this client; its iterator then ends with EngineUnavailableError
        or a final delta with finish_reason "abort"."""
        writer = self._writers.get(request_id)
        if writer is not None and not writer.is_closing():
            writer.write(encode({"op": "cancel", "id": request_id}))
