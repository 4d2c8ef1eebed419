"""The engine server: one process that owns the model and the continuous-batching engine
and serves token ids over a local socket. Every front end (the OpenAI API, the MindSpore
Serving workers) is a client of it, so all requests share one batch.

    python -m deepseek_ms.serving.engine_server --model DIR --address unix:/tmp/engine.sock

Wire protocol: a unix socket ("unix:/path") or a loopback TCP port ("tcp:127.0.0.1:PORT");
each message is one JSON object on one line (UTF-8, "\\n"-terminated). `id` is chosen by
the client and names the request within its connection.

client -> server
    {"op": "generate", "id": ID, "prompt_token_ids": [int, ...], "params": {SamplingParams fields}}
    {"op": "cancel", "id": ID}
    {"op": "health", "id": ID}
server -> client
    {"type": "delta", "id": ID, "new_token_ids": [int, ...], "finished": bool,
     "finish_reason": null | "stop" | "length" | "abort", "prompt_tokens": int,
     "logprobs": null | [[token_id, logprob, [[top_id, logprob], ...]], ...]}   (one per step)
    {"type": "health", "id": ID, "ok": bool, "shutting_down": bool, "model": str,
     "max_model_len": int, "vocab_size": int, "eos_token_id": int | null, "max_num_seqs": int, "max_queue": int,
     "num_active": int, "world_size": int, "pid": int,
     "stats": {LLMEngine.stats()}, "stats_age": seconds}   (stats may be a snapshot
     taken before the current step when that step is long, e.g. compiling)
    {"type": "error", "id": ID, "code": "invalid_request" | "overloaded" | "shutting_down" | "internal",
     "message": str}                                                          (ends that request)

Logprobs may be -Infinity (a masked token); Python's json reads and writes that. Closing a
connection cancels its unfinished requests and frees their cache blocks. A request is
refused as "overloaded" when max_num_seqs + max_queue requests are already in flight.
SIGTERM / SIGINT: new requests are refused with "shutting_down", requests in flight
finish, then the process exits.

Tensor parallel: with `--parallel-config '{model_parallel: 2}'` under msrun (entry script
scripts/engine_server.py; msrun runs a script file, not `-m`), every rank loads its shard and
builds the same engine; rank 0 serves the socket and broadcasts each runner call, the other
ranks replay them (deepseek_ms/parallel/lockstep.py) and exit when rank 0 exits. Signal
rank 0 (health reports its "pid" and the "world_size"), never msrun: msrun answers SIGINT by
killing every worker and SIGTERM by dying alone.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import yaml

# absolute imports: this module is the entry script (python -m), whose imports MindSpore's
# compile cache resolves without a package (relative ones make every compile fail)
from deepseek_ms.cli import add_kernels_arg
from deepseek_ms.engine.async_engine import AsyncLLMEngine
from deepseek_ms.engine.llm_engine import EngineConfig
from deepseek_ms.engine.sampling import SamplingParams
from deepseek_ms.serving.engine_client import MAX_MESSAGE_BYTES, encode, parse_address

logger = logging.getLogger(__name__)

STATS_WAIT = 1.0  # seconds a health request waits for fresh engine stats
_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def _error(request_id, code: str, message: str) -> Dict[str, Any]:
    return {"type": "error", "id": request_id, "code": code, "message": message}


def _logprobs(entries) -> Optional[List[list]]:
    if not entries:
        return None
    return [[token, logprob, [list(pair) for pair in top]] for token, logprob, top in entries]


class EngineServer:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_queue: int = 128):
        self.engine = engine
        self.model_name = model_name
        self.max_queue = max_queue
        self.capacity = engine.engine.config.max_num_seqs + max_queue
        self.num_active = 0
        self.shutting_down = False
        self._server: Optional[asyncio.AbstractServer] = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._connections = 0
        self._socket_path: Optional[str] = None
        self._last_stats = engine.stats()
        self._stats_time = time.monotonic()
        self._stats_future: Optional[asyncio.Future] = None

    # ---- lifecycle ----
    async def start(self, address: str) -> None:
        family, target = parse_address(address)
        self._socket_path = target if family == "unix" else None
        if family == "unix":
            if os.path.exists(target):
                if await _is_listening(target):
                    raise RuntimeError(f"another engine server is already listening on {address}")
                os.unlink(target)  # stale socket file of a process that died
            self._server = await asyncio.start_unix_server(self._serve, target, limit=MAX_MESSAGE_BYTES)
            os.chmod(target, 0o600)
        else:
            self._server = await asyncio.start_server(self._serve, *target, limit=MAX_MESSAGE_BYTES)
        logger.info("engine server listening on %s (model %s)", address, self.model_name)

    def begin_shutdown(self) -> None:
        if not self.shutting_down:
            logger.info("shutting down: refusing new requests, finishing %d in flight", self.num_active)
            self.shutting_down = True

    async def wait_drained_and_close(self) -> None:
        await self._idle.wait()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)
        self.engine.shutdown()
        logger.info("engine server stopped")

    # ---- connections ----
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        conn = self._connections
        tasks: Dict[str, asyncio.Task] = {}
        lock = asyncio.Lock()

        async def send(message: Dict[str, Any]) -> None:
            async with lock:  # one drain() at a time (Python 3.9 asserts on concurrent drains)
                writer.write(encode(message))
                await writer.drain()

        try:
            while True:
                try:
                    line = await reader.readline()
                except (ConnectionError, ValueError):  # reset, or a line over the size limit
                    break
                if not line:
                    break
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("a message must be a JSON object")
                except ValueError as e:
                    await send(_error(None, "invalid_request", f"malformed message: {e}"))
                    continue
                request_id = message.get("id")
                op = message.get("op")
                if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
                    await send(_error(None, "invalid_request", f"'id' must be a string or an integer, "
                                                               f"got {request_id!r}"))
                elif op == "generate":
                    if request_id in tasks:
                        await send(_error(request_id, "invalid_request",
                                          f"request id {request_id!r} is already running"))
                        continue
                    task = asyncio.ensure_future(self._generate(conn, message, send, writer))
                    tasks[request_id] = task
                    task.add_done_callback(lambda _t, rid=request_id: tasks.pop(rid, None))
                elif op == "cancel":
                    task = tasks.get(request_id)
                    if task is not None:
                        task.cancel()
                elif op == "health":
                    await send(await self._health(request_id))
                else:
                    await send(_error(request_id, "invalid_request", f"unknown op {op!r}"))
        finally:
            # The client is gone: abandoning its streams aborts the requests and frees their blocks.
            for task in list(tasks.values()):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            writer.close()

    async def _stats(self):
        """(engine stats, their age in seconds). stats() waits for the engine lock, which a step
        holds throughout (a step that compiles a new shape takes seconds): wait briefly in a worker
        thread, and answer with the last snapshot if the step is still running."""
        if self._stats_future is None or self._stats_future.done():
            self._stats_future = asyncio.get_running_loop().run_in_executor(None, self.engine.stats)
        try:
            self._last_stats = await asyncio.wait_for(asyncio.shield(self._stats_future), STATS_WAIT)
            self._stats_time = time.monotonic()
        except asyncio.TimeoutError:
            pass
        return self._last_stats, time.monotonic() - self._stats_time

    async def _health(self, request_id) -> Dict[str, Any]:
        core = self.engine.engine
        stats, age = await self._stats()
        return {"type": "health", "id": request_id, "ok": not self.shutting_down,
                "shutting_down": self.shutting_down, "model": self.model_name,
                "max_model_len": core.max_model_len, "vocab_size": core.model.config.vocab_size,
                "eos_token_id": core.eos_token_id, "max_num_seqs": core.config.max_num_seqs,
                "max_queue": self.max_queue, "num_active": self.num_active,
                "world_size": core.model.layout.world_size, "pid": os.getpid(), "stats": stats, "stats_age": age}

    def _check(self, message: Dict[str, Any]):
        """(prompt ids, SamplingParams) of a generate message, or ValueError naming the problem."""
        ids = message.get("prompt_token_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        params = message.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError("params must be a JSON object of SamplingParams fields")
        unknown = sorted(set(params) - _PARAM_FIELDS)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}")
        sampling = SamplingParams(**params)
        vocab = self.engine.engine.model.config.vocab_size
        # checked here: the sampler would only find them mid-step, failing every request in the batch
        bad = [t for t in sampling.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids contains {bad[0]}, outside the vocabulary [0, {vocab})")
        limit = self.engine.engine.max_model_len
        if len(ids) + sampling.max_tokens > limit:
            raise ValueError(f"the context length is {limit} tokens, but the prompt has {len(ids)} and "
                             f"max_tokens is {sampling.max_tokens}")
        return ids, sampling

    async def _generate(self, conn: int, message: Dict[str, Any], send, writer: asyncio.StreamWriter) -> None:
        request_id = message.get("id")
        if self.shutting_down:
            await send(_error(request_id, "shutting_down", "the engine server is shutting down"))
            return
        if self.num_active >= self.capacity:
            await send(_error(request_id, "overloaded",
                                            f"the engine is overloaded ({self.num_active} requests in flight, "
                                            f"max_num_seqs + max_queue = {self.capacity}); retry later"))
            return
        try:
            ids, sampling = self._check(message)
        except (ValueError, TypeError) as e:
            await send(_error(request_id, "invalid_request", str(e)))
            return
        self.num_active += 1
        self._idle.clear()
        try:
            async for out in self.engine.generate(ids, sampling, request_id=f"{conn}:{request_id}"):
                await send({
                    "type": "delta", "id": request_id, "new_token_ids": out.new_token_ids,
                    "finished": out.finished, "finish_reason": out.finish_reason,
                    "prompt_tokens": len(ids), "logprobs": _logprobs(out.logprobs)})
        except ValueError as e:  # refused by add_request (e.g. a token id outside the vocabulary)
            with contextlib.suppress(ConnectionError):
                await send(_error(request_id, "invalid_request", str(e)))
        except asyncio.CancelledError:
            # a "cancel" message, or the connection closed; the stream's exit has aborted the request
            if not writer.is_closing():
                writer.write(encode({"type": "delta", "id": request_id, "new_token_ids": [], "finished": True,
                                     "finish_reason": "abort", "prompt_tokens": len(ids), "logprobs": None}))
            raise
        except ConnectionError:
            logger.info("client of request %s went away; cancelled", request_id)
        except Exception as e:  # an engine step failed: this request fails, the server goes on
            logger.exception("request %s failed", request_id)
            with contextlib.suppress(ConnectionError):
                await send(_error(request_id, "internal", f"engine failure: {e}"))
        finally:
            self.num_active -= 1
            if self.num_active == 0:
                self._idle.set()


async def _is_listening(path: str) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    return True


def _value(text: str):
    return yaml.safe_load(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_ms.serving.engine_server",
                                description="deepseek-ms engine server (token ids over a local socket)")
    p.add_argument("--model", required=True, help="HF folder, converted folder or predict YAML")
    p.add_argument("--address", required=True, help="unix:/path/to.sock or tcp:127.0.0.1:PORT")
    p.add_argument("--served-model-name", default=None, help="name reported by health (default: folder name)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests allowed to wait beyond max_num_seqs before 'overloaded'")
    add_kernels_arg(p)
    p.add_argument("--parallel-config", type=_value, default=None,
                   help="mindformers parallel_config as YAML/JSON, e.g. '{model_parallel: 2}' (run under msrun)")
    engine = p.add_argument_group("engine (EngineConfig fields)")
    for f in dataclasses.fields(EngineConfig):
        engine.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_value, default=f.default)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


async def _serve(args, llm) -> int:
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = EngineServer(AsyncLLMEngine(llm.engine), name, args.max_queue)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.begin_shutdown)
    try:
        await server.start(args.address)
        while not server.shutting_down:
            await asyncio.sleep(0.1)
        await server.wait_drained_and_close()
    finally:
        server.engine.shutdown()  # no engine step may broadcast after this
    return 0


def _run(args) -> int:
    from deepseek_ms.llm import LLM
    from deepseek_ms.parallel.lockstep import lockstep, release

    config = engine_config_from_args(args)
    config.validate()
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.parallel_config is not None and not isinstance(args.parallel_config, dict):
        raise ValueError(f"--parallel-config must be a mapping such as '{{model_parallel: 2}}', "
                         f"got {args.parallel_config!r}")
    parse_address(args.address)
    llm = LLM(args.model, progress=False, parallel_config=args.parallel_config, kernels=args.kernels,
              **dataclasses.asdict(config))
    if not lockstep(llm.engine):  # a follower rank: it replayed rank 0's steps until rank 0 exited
        return 0
    try:
        return asyncio.run(_serve(args, llm))
    finally:
        release(llm.engine)  # lets the followers' lockstep() return, so they exit too


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s engine-server: %(message)s")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
