"""OpenAI-compatible HTTP API (aiohttp), a client of the engine server.

    python -m deepseek_ms.serving.openai_api --model DIR --engine-address unix:/tmp/engine.sock --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with
`stream: true` ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text).

This process owns the text side: chat templating, tokenization, incremental detokenization,
stop strings and the reasoning split; only token ids go to the engine. A stop string ends
the request here, which closes its engine stream and so cancels it there.

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for bad input
(malformed JSON, missing or mistyped fields, out-of-range values, unknown model, a prompt
that does not fit the context), 401 for a wrong API key, 404/405 for unknown routes and
methods, 503 when the engine is down, overloaded or this server is shutting down.
SIGTERM/SIGINT: new requests get 503, requests in flight (streams included) finish, then exit.
"""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from aiohttp import web

from ..detokenizer import IncrementalDetokenizer, StopStringMatcher
from ..engine.sampling import SamplingParams
from .engine_client import (AsyncEngineClient, EngineError, EngineOverloadedError, EngineRequestError,
                            EngineTimeoutError, EngineUnavailableError)
from .metrics import ApiMetrics

logger = logging.getLogger(__name__)

REASONING_START, REASONING_END = "<think>", "</think>"
# JSON has no infinities; a fully masked token's logprob is reported as this (vLLM does the same)
MIN_LOGPROB = -9999.0
DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
_ROLES = ("system", "developer", "user", "assistant", "tool")
# passed to SamplingParams as they are (OpenAI fields, plus vLLM's common extensions)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty", "presence_penalty",
                    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "n")
# known OpenAI fields that would change the result but are not implemented: refuse, don't ignore
_UNSUPPORTED = {"best_of": lambda v: v not in (None, 1), "echo": lambda v: v not in (None, False),
                "suffix": lambda v: v is not None, "logit_bias": lambda v: bool(v),
                "tools": lambda v: bool(v), "functions": lambda v: bool(v),
                "response_format": lambda v: v not in (None, {"type": "text"})}


@dataclass
class ApiConfig:
    engine_address: str
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    request_timeout: float = 600.0   # seconds one request may take on the engine
    drain_timeout: float = 600.0     # seconds SIGTERM waits for requests in flight


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code=code)


def _unavailable(message: str, code: str = "service_unavailable") -> ApiError:
    return ApiError(503, message, type_="service_unavailable", code=code)


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, EngineRequestError):
        return _bad(str(e))
    if isinstance(e, EngineOverloadedError):
        return _unavailable(str(e), "overloaded")
    if isinstance(e, EngineTimeoutError):
        return ApiError(504, str(e), type_="timeout", code="timeout")
    if isinstance(e, EngineUnavailableError):
        return _unavailable(f"the engine is unavailable: {e}", "engine_unavailable")
    return ApiError(500, str(e), type_="server_error", code="engine_error")  # an engine step failed


class ReasoningSplitter:
    """Splits generated text into (reasoning, content) at the first "</think>", for prompts whose
    generation prompt opened a reasoning block. Text that might be the start of the marker is
    held back until the next piece decides it."""

    def __init__(self, in_reasoning: bool):
        self.in_reasoning = in_reasoning
        self._held = ""

    def feed(self, text: str) -> Tuple[str, str]:
        if not self.in_reasoning:
            return "", text
        text = self._held + text
        end = text.find(REASONING_END)
        if end >= 0:
            self.in_reasoning, self._held = False, ""
            return text[:end], text[end + len(REASONING_END):]
        keep = next((n for n in range(min(len(REASONING_END) - 1, len(text)), 0, -1)
                     if text.endswith(REASONING_END[:n])), 0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], ""

    def flush(self) -> Tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", held)


class TextStream:
    """Token ids -> text pieces for one request: detokenization, stop strings and logprobs."""

    def __init__(self, tokenizer, prompt_ids: List[int], stop: List[str]):
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
        self.stops = StopStringMatcher(stop)
        self.num_tokens = 0
        self.stopped = False

    def feed(self, token_ids: List[int]) -> str:
        self.num_tokens += len(token_ids)
        text, hit = self.stops.feed(self.detok.add(token_ids))
        self.stopped = hit is not None
        return text

    def finish(self) -> str:
        if self.stopped:
            return ""
        text, hit = self.stops.feed(self.detok.flush())
        return text if hit is not None else text + self.stops.flush()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


# ---------------------------------------------------------------------------------------------
# request parsing
# ---------------------------------------------------------------------------------------------

def _check_type(body: Dict[str, Any], key: str, types, what: str, required: bool = False):
    value = body.get(key)
    if value is None:
        if required:
            raise _bad(f"'{key}' is required", key, "missing_field")
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise _bad(f"'{key}' must be {what}, got {json.dumps(value)[:80]}", key, "invalid_type")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _sampling(body: Dict[str, Any]) -> Dict[str, Any]:
    for key, refused in _UNSUPPORTED.items():
        if refused(body.get(key)):
            raise _bad(f"'{key}' is not supported by this server", key, "unsupported")
    params = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = stop
    try:
        # type and range checks (the message starts with the field's name); max_tokens is set
        # later, and min_tokens <= max_tokens is checked by the engine server
        SamplingParams(max_tokens=2 ** 62, **params)
    except (ValueError, TypeError) as e:
        message = str(e)
        field = message.split(" ", 1)[0].split("[", 1)[0]
        raise _bad(message, field if field in params else None) from None
    params.pop("stop", None)       # stop strings are matched here, on the text
    return params


def _stop_list(body: Dict[str, Any]) -> List[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


def _max_tokens(body: Dict[str, Any], keys: Tuple[str, ...]) -> Optional[int]:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(f"'{key}' must be an integer, got {json.dumps(value)[:80]}", key, "invalid_type")
        if value < 1:
            raise _bad(f"'{key}' must be at least 1, got {value}", key, "invalid_value")
        return value
    return None


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{i}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}", where)
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where} must be a string or a list of text parts", where, "invalid_type")


def _messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    messages = _check_type(body, "messages", list, "a list of messages", required=True)
    if not messages:
        raise _bad("'messages' must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}, got {json.dumps(role)[:40]}",
                       f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": role, "content": _content_text(content, f"{where}.content")})
    return out


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------

class OpenAIServer:
    def __init__(self, config: ApiConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.client = AsyncEngineClient(config.engine_address)
        self.metrics = ApiMetrics()
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._max_model_len: Optional[int] = None
        self.app = web.Application(middlewares=[self._errors, self._gate], client_max_size=8 * 2 ** 20)
        self.app.add_routes([
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_endpoint),
        ])

    # ---- middlewares ----
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ApiError as e:
            status = e.status
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:  # unknown route, wrong method, body too large, ...
            status = e.status
            return web.json_response(ApiError(e.status, e.reason, type_="invalid_request_error").body(),
                                     status=e.status, headers={k: v for k, v in e.headers.items()
                                                               if k.lower() == "allow"})
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return web.json_response(ApiError(500, "internal server error", type_="server_error").body(),
                                     status=500)
        finally:
            route = request.match_info.route.resource
            endpoint = route.canonical if route is not None else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    @web.middleware
    async def _gate(self, request: web.Request, handler):
        if not request.path.startswith("/v1/"):
            return await handler(request)
        if self.config.api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (expected 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
        if self.draining:
            raise _unavailable("the server is shutting down", "shutting_down")
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    # ---- simple endpoints ----
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "deepseek-ms"}]})

    async def health(self, request: web.Request) -> web.Response:
        try:
            engine = await self.client.health(timeout=5.0)
        except Exception as e:
            return web.json_response({"status": "engine_unavailable", "message": str(e)}, status=503)
        ok = engine.get("ok", False) and not self.draining
        return web.json_response({"status": "ok" if ok else "shutting_down", "engine": engine},
                                 status=200 if ok else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        try:
            engine = await self.client.health(timeout=2.0)
        except Exception:
            engine = None
        self.metrics.set_engine(engine)
        self.metrics.in_flight.set(self.in_flight)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    # ---- generation ----
    async def _body(self, request: web.Request) -> Dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", code="invalid_json")
        model = _check_type(body, "model", str, "a string", required=True)
        if model != self.config.model_name:
            raise _bad(f"model {model!r} does not exist; this server serves {self.config.model_name!r}",
                       "model", "model_not_found")
        _check_type(body, "stream", bool, "a boolean")
        options = _check_type(body, "stream_options", dict, "an object")
        if options is not None and not isinstance(options.get("include_usage", False), bool):
            raise _bad("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
        return body

    async def _context_length(self) -> int:
        if self._max_model_len is None:
            try:
                info = await self.client.health(timeout=5.0)
            except Exception as e:
                raise _engine_error(e) from None
            self._max_model_len = int(info["max_model_len"])
        return self._max_model_len

    async def _budget(self, prompt_ids: List[int], max_tokens: Optional[int], default: Optional[int]) -> int:
        limit = await self._context_length()
        room = limit - len(prompt_ids)
        if room < 1:
            raise _bad(f"the prompt has {len(prompt_ids)} tokens but the model's context length is {limit}; "
                       f"shorten it", "messages", "context_length_exceeded")
        if max_tokens is None:
            return room if default is None else min(default, room)
        if max_tokens > room:
            raise _bad(f"this model's context length is {limit} tokens; the prompt has {len(prompt_ids)} and "
                       f"max_tokens asks for {max_tokens} more (at most {room})", "max_tokens",
                       "context_length_exceeded")
        return max_tokens

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        params = _sampling(body)
        logprobs = _check_type(body, "logprobs", int, "an integer")
        if logprobs is not None:
            params["logprobs"] = logprobs
            _sampling_check(params)
        prompt_ids = self._prompt_ids(body)
        params["max_tokens"] = await self._budget(prompt_ids, _max_tokens(body, ("max_tokens",)),
                                                  DEFAULT_COMPLETION_MAX_TOKENS)
        gen = _Generation(self, "cmpl", "text_completion", body, prompt_ids, params, reasoning=False,
                          chat=False, logprobs=logprobs is not None)
        return await gen.respond(request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = _messages(body)
        params = _sampling(body)
        want_logprobs = _check_type(body, "logprobs", bool, "a boolean") or False
        top = _check_type(body, "top_logprobs", int, "an integer")
        if top is not None and not want_logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if want_logprobs:
            params["logprobs"] = top or 0
            _sampling_check(params)
        kwargs = _check_type(body, "chat_template_kwargs", dict, "an object") or {}
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                        **kwargs)
        except Exception as e:  # the template itself may refuse a conversation (raise_exception)
            raise _bad(f"the chat template could not render these messages: {e}", "messages") from None
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        params["max_tokens"] = await self._budget(
            prompt_ids, _max_tokens(body, ("max_completion_tokens", "max_tokens")), None)
        reasoning = prompt.rstrip().endswith(REASONING_START)
        gen = _Generation(self, "chatcmpl", "chat.completion", body, prompt_ids, params, reasoning=reasoning,
                          chat=True, logprobs=want_logprobs)
        return await gen.respond(request)

    def _prompt_ids(self, body: Dict[str, Any]) -> List[int]:
        prompt = body.get("prompt")
        if prompt is None:
            raise _bad("'prompt' is required", "prompt", "missing_field")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("'prompt' must not be empty", "prompt", "invalid_value")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise _bad(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise _bad("one prompt per request is supported, got a batch of "
                       f"{len(prompt)}", "prompt", "unsupported")
        raise _bad("'prompt' must be a non-empty string or a non-empty list of token ids", "prompt", "invalid_type")

    # ---- lifecycle ----
    async def drain(self) -> None:
        self.draining = True
        logger.info("shutting down: refusing new requests, finishing %d in flight", self.in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
        except asyncio.TimeoutError:
            logger.warning("%d requests still running after %.0f s; stopping anyway", self.in_flight,
                           self.config.drain_timeout)


def _sampling_check(params: Dict[str, Any]) -> None:
    try:
        SamplingParams(**dict(params, max_tokens=2 ** 62))
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "logprobs" if "logprobs" in str(e) else None) from None


class _Generation:
    """One request's engine stream turned into an OpenAI response (JSON or SSE)."""

    def __init__(self, server: OpenAIServer, id_prefix: str, object_: str, body: Dict[str, Any],
                 prompt_ids: List[int], params: Dict[str, Any], reasoning: bool, chat: bool, logprobs: bool):
        self.server = server
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.object = object_
        self.created = int(time.time())
        self.model = server.config.model_name
        self.prompt_ids = prompt_ids
        self.params = params
        self.chat = chat
        self.want_logprobs = logprobs
        self.stream = bool(body.get("stream"))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.text = TextStream(server.tokenizer, prompt_ids, _stop_list(body))
        self.splitter = ReasoningSplitter(reasoning)
        self.reasoning = reasoning
        self.finish_reason: Optional[str] = None
        self._text_offset = 0   # completions logprobs: where the next token's text starts

    async def _deltas(self) -> AsyncIterator[Tuple[str, str, list]]:
        """(reasoning, content, logprob entries) pieces until the request ends."""
        metrics = self.server.metrics
        start = time.monotonic()
        first = last = None
        stream = self.server.client.stream(self.prompt_ids, self.params, self.server.config.request_timeout)
        try:
            async for delta in stream:
                now = time.monotonic()
                if delta["new_token_ids"]:
                    if first is None:
                        first = now
                        metrics.ttft.observe(now - start)
                    elif last is not None:
                        metrics.tpot.observe((now - last) / len(delta["new_token_ids"]))
                    last = now
                piece = self.text.feed(delta["new_token_ids"])
                entries = delta.get("logprobs") or []
                if self.text.stopped:
                    self.finish_reason = "stop"
                elif delta["finished"]:
                    self.finish_reason = "stop" if delta["finish_reason"] == "stop" else "length"
                    piece += self.text.finish()
                yield self.splitter.feed(piece) + (entries,)
                if self.finish_reason is not None:
                    break
        except EngineError as e:
            raise _engine_error(e) from None
        finally:
            await stream.aclose()   # a stop string or a client that left: cancels the engine request
            metrics.prompt_tokens.inc(len(self.prompt_ids))
            metrics.generation_tokens.inc(self.text.num_tokens)
            metrics.e2e.observe(time.monotonic() - start)
        yield self.splitter.flush() + ([],)

    async def respond(self, request: web.Request) -> web.StreamResponse:
        if self.stream:
            return await self._respond_stream(request)
        reasoning, content, entries = [], [], []
        async for r, c, lp in self._deltas():
            reasoning.append(r)
            content.append(c)
            entries += lp
        if self.chat:
            message = {"role": "assistant", "content": "".join(content)}
            if self.reasoning:
                message["reasoning_content"] = "".join(reasoning)
            choice = {"index": 0, "message": message, "logprobs": self._chat_logprobs(entries),
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": "".join(content), "logprobs": self._completion_logprobs(entries),
                      "finish_reason": self.finish_reason}
        return web.json_response({"id": self.id, "object": self.object, "created": self.created,
                                  "model": self.model, "choices": [choice], "usage": self._usage()})

    async def _respond_stream(self, request: web.Request) -> web.StreamResponse:
        deltas = self._deltas()
        try:
            # the first piece comes before the 200: an engine that refuses the request gives a proper error
            first = await deltas.__anext__()
        except BaseException:
            await deltas.aclose()
            raise
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            if self.chat:
                await self._send(response, {"role": "assistant", "content": ""}, None, [])
            piece = first
            while True:
                reasoning, content, entries = piece
                if reasoning or content or entries:
                    await self._send(response, self._delta_body(reasoning, content), None, entries)
                try:
                    piece = await deltas.__anext__()
                except StopAsyncIteration:
                    break
            await self._send(response, {} if self.chat else "", self.finish_reason, [])
            if self.include_usage:
                await self._event(response, {"id": self.id, "object": self._chunk_object, "created": self.created,
                                             "model": self.model, "choices": [], "usage": self._usage()})
        except ApiError as e:  # the engine failed mid-stream: tell the client in-band
            await self._event(response, e.body())
        finally:
            await deltas.aclose()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _delta_body(self, reasoning: str, content: str):
        if not self.chat:
            return content
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return delta

    async def _send(self, response, delta, finish_reason, entries) -> None:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(entries),
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": self._completion_logprobs(entries),
                      "finish_reason": finish_reason}
        await self._event(response, {"id": self.id, "object": self._chunk_object, "created": self.created,
                                     "model": self.model, "choices": [choice]})

    @staticmethod
    async def _event(response: web.StreamResponse, payload: Dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    def _usage(self) -> Dict[str, int]:
        n = self.text.num_tokens
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
                "total_tokens": len(self.prompt_ids) + n}

    def _token(self, token_id: int) -> Dict[str, Any]:
        text = self.text.token_text(token_id)
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    def _chat_logprobs(self, entries) -> Optional[Dict[str, Any]]:
        if not self.want_logprobs:
            return None
        return {"content": [dict(self._token(tok), logprob=_finite(lp),
                                 top_logprobs=[dict(self._token(t), logprob=_finite(p)) for t, p in top])
                            for tok, lp, top in entries]}

    def _completion_logprobs(self, entries) -> Optional[Dict[str, Any]]:
        if not self.want_logprobs:
            return None
        tokens = [self.text.token_text(tok) for tok, _, _ in entries]
        tops = []
        for _, _, top in entries:
            # keyed by text: tokens that decode alike (byte pieces) keep the likeliest's value
            by_text: Dict[str, float] = {}
            for t, p in top:
                by_text.setdefault(self.text.token_text(t), _finite(p))
            tops.append(by_text)
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [_finite(lp) for _, lp, _ in entries],
                "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------------------------------------
# process entry point
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_ms.serving.openai_api",
                                description="deepseek-ms OpenAI-compatible API (a client of the engine server)")
    p.add_argument("--model", required=True, help="model folder with the tokenizer files")
    p.add_argument("--engine-address", required=True, help="unix:/path/to.sock or tcp:127.0.0.1:PORT")
    p.add_argument("--served-model-name", default=None, help="the 'model' clients send (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/*")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


# Once the server has stopped the process must end, because the launcher waits for it before it
# stops the engine. Once in CI it did not: the drain finished, "OpenAI API stopped" was logged,
# and the process was still alive 180 s later. The cause is unknown (asyncio's or the
# interpreter's teardown); this bounds the stall and records every thread's stack for the cause.
EXIT_STALL_SECONDS = 20.0


def exit_if_teardown_stalls(seconds: float) -> threading.Timer:
    def stalled():
        logger.error("the process has not exited %g s after the server stopped; every thread's stack "
                     "follows, then a hard exit", seconds)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(0)  # every request was drained: the stall is in teardown

    timer = threading.Timer(seconds, stalled)
    timer.daemon = True
    timer.start()
    return timer


async def serve(config: ApiConfig, tokenizer) -> None:
    server = OpenAIServer(config, tokenizer)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels the engine request
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    logger.info("OpenAI API on http://%s:%d/v1 (model %r, engine %s)", config.host, config.port,
                config.model_name, config.engine_address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.drain()
    await runner.cleanup()
    logger.info("OpenAI API stopped")
    exit_if_teardown_stalls(EXIT_STALL_SECONDS)


def main(argv: Optional[List[str]] = None) -> int:
    from ..tokenizer import load_tokenizer

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s openai-api: %(message)s")
    try:
        tokenizer = load_tokenizer(args.model)
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
        config = ApiConfig(engine_address=args.engine_address, model_name=name, host=args.host, port=args.port,
                           api_key=args.api_key, request_timeout=args.request_timeout,
                           drain_timeout=args.drain_timeout)
        asyncio.run(serve(config, tokenizer))
    except (ValueError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
