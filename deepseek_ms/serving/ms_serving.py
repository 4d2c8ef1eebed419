"""MindSpore Serving front end: starts the `deepseek` servable (servable/deepseek/) with gRPC and
REST servers in front of a running engine server.

    python -m deepseek_ms.serving.ms_serving --engine-address unix:/tmp/engine.sock --model DIR \\
        --grpc 127.0.0.1:5500 --rest 127.0.0.1:1500 --workers 16

    curl -X POST http://127.0.0.1:1500/model/deepseek:generate \\
        -d '{"instances": [{"prompt": "Hello", "max_tokens": 16, "temperature": 0.0, "top_p": 1.0}]}'

Processes. This process becomes Serving's master; Serving starts ``--workers`` worker
processes, each running the servable's stages for one request at a time and forwarding the
generation to the engine server, where all requests share one batch. So ``--workers`` is
the number of Serving requests in flight; the default is the engine's max_num_seqs (<= 64).
The servable is the repo's ``servable/`` folder (not part of the installed package): a
checkout or editable install finds it; otherwise pass ``--servable-dir``.

How the workers get their settings. Serving starts workers with the master's working
directory and environment and no arguments of ours, so this launcher
  1. makes a run directory (``--run-dir``, default a fresh temporary one) and changes into
     it: Serving's worker logs (``serving_logs/``) and unix sockets (``unix_socket_files/``)
     are relative to the working directory, so each server gets its own;
  2. writes ``deepseek_serving.json`` there (`ServingSettings`: engine address, absolute
     model folder, per-request timeout); servable_config.py reads it from its working
     directory at import and refuses to start without it;
  3. puts the directory holding this ``deepseek_ms`` package first on the workers'
     PYTHONPATH, so they run the same code as the launcher.

Shutdown. Serving installs C-level SIGINT/SIGTERM handlers that stop at once and fail the
requests in flight; this launcher replaces them, once everything is up, with a drain:
``draining`` is created in the run directory (the servable then refuses new requests with
"shutting down"), the launcher waits until no live worker holds a request (each worker keeps
its count in ``inflight/<pid>``) or ``--drain-timeout`` passes, then stops Serving (master and
workers) and exits 0. Serving stops its workers with SIGINT, so they keep Serving's handler;
a Ctrl+C typed in a terminal reaches the whole process group and stops the workers at once,
so a supervisor that wants the drain starts this launcher in its own session
(``start_new_session=True``) and forwards the signal. The run directory is removed on a clean
exit unless it was given with ``--run-dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import List, Optional

logger = logging.getLogger(__name__)

SERVABLE_NAME = "deepseek"
SETTINGS_FILE = "deepseek_serving.json"
DRAINING_FILE = "draining"
INFLIGHT_DIR = "inflight"
MAX_WORKERS = 64  # Serving's limit on num_parallel_workers
# the folder holding the deepseek_ms package: the repo root of a checkout or editable install
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SERVABLE_DIR = os.path.join(PACKAGE_ROOT, "servable")


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """What the servable's workers need; written by the launcher into the run directory."""
    engine_address: str
    model_dir: str
    request_timeout: float = 600.0

    def write(self, run_dir: str) -> str:
        path = os.path.join(run_dir, SETTINGS_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)
        return path

    @classmethod
    def read(cls, run_dir: str) -> "ServingSettings":
        path = os.path.join(run_dir, SETTINGS_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} not found: the deepseek servable must be started by "
                               f"`python -m deepseek_ms.serving.ms_serving`, which writes it")
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def inflight_count(run_dir: str) -> int:
    """Requests the live workers hold, from the per-worker counters ``inflight/<pid>``."""
    total = 0
    folder = os.path.join(run_dir, INFLIGHT_DIR)
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if not name.isdigit() or not _alive(int(name)):
            continue
        try:
            with open(os.path.join(folder, name), encoding="ascii") as f:
                total += int(f.read())
        except (OSError, ValueError):  # being replaced right now: count it as busy
            total += 1
    return total


def _host_port(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _workers(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"--workers must be in 1..{MAX_WORKERS}, got {n}")
    return n


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_ms.serving.ms_serving",
                                description="MindSpore Serving (gRPC + REST) in front of the deepseek-ms engine server")
    p.add_argument("--engine-address", required=True, help="engine server: unix:/path.sock or tcp:HOST:PORT")
    p.add_argument("--model", required=True, help="model folder with the tokenizer files (and chat template)")
    p.add_argument("--grpc", type=_host_port, default="127.0.0.1:5500", help="gRPC address HOST:PORT")
    p.add_argument("--rest", type=_host_port, default="127.0.0.1:1500", help="REST address HOST:PORT")
    p.add_argument("--workers", type=_workers, default=None,
                   help=f"Serving worker processes = requests in flight (default: the engine's max_num_seqs, "
                        f"at most {MAX_WORKERS})")
    p.add_argument("--timeout", type=_positive, default=600.0, help="seconds one request may take in the engine")
    p.add_argument("--drain-timeout", type=_positive, default=60.0,
                   help="on SIGTERM/SIGINT, seconds to wait for requests in flight")
    p.add_argument("--run-dir", default=None, help="working directory for settings, worker logs and sockets "
                                                   "(default: a new temporary directory, removed on exit)")
    p.add_argument("--servable-dir", default=DEFAULT_SERVABLE_DIR, help="folder holding the deepseek servable")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _default_workers(engine_address: str) -> int:
    from .engine_client import EngineClient, EngineError
    try:
        health = EngineClient(engine_address).health()
    except EngineError as e:
        raise RuntimeError(f"--workers not given and the engine's max_num_seqs is unknown: {e}") from None
    if not isinstance(health.get("max_num_seqs"), int):
        raise RuntimeError("--workers not given and the engine's health reply has no max_num_seqs")
    return max(1, min(MAX_WORKERS, health["max_num_seqs"]))


def _check_model(model_dir: str) -> None:
    """Fail here, with the reason, rather than in every worker."""
    from ..tokenizer import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    if not tokenizer.chat_template:
        logger.warning("%s has no chat template: the 'chat' method will refuse every request", model_dir)


class _Shutdown:
    """Python handlers for SIGTERM/SIGINT, replacing Serving's C-level ones."""

    def __init__(self):
        self.requested = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        logger.info("%s received: draining", signal.Signals(signum).name)
        self.requested.set()


def serve(args) -> int:
    from mindspore_serving import server
    from mindspore_serving._mindspore_serving import ExitSignalHandle_

    from .engine_client import parse_address

    parse_address(args.engine_address)
    model_dir = os.path.abspath(args.model)
    _check_model(model_dir)
    workers = args.workers or _default_workers(args.engine_address)
    servable_dir = os.path.abspath(args.servable_dir)
    if not os.path.isfile(os.path.join(servable_dir, SERVABLE_NAME, "servable_config.py")):
        raise FileNotFoundError(f"{servable_dir} holds no {SERVABLE_NAME}/servable_config.py")

    own_run_dir = args.run_dir is None
    run_dir = tempfile.mkdtemp(prefix="deepseek-serving-") if own_run_dir else os.path.abspath(args.run_dir)
    shutil.rmtree(os.path.join(run_dir, INFLIGHT_DIR), ignore_errors=True)  # a reused --run-dir
    os.makedirs(os.path.join(run_dir, INFLIGHT_DIR))
    if os.path.exists(os.path.join(run_dir, DRAINING_FILE)):
        os.remove(os.path.join(run_dir, DRAINING_FILE))
    ServingSettings(args.engine_address, model_dir, args.timeout).write(run_dir)
    os.chdir(run_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)

    shutdown = _Shutdown()
    clean = False
    try:
        logger.info("starting %d Serving workers (run directory %s)", workers, run_dir)
        try:
            server.start_servables(server.ServableStartConfig(servable_dir, SERVABLE_NAME,
                                                              num_parallel_workers=workers, version_number=1))
            server.start_grpc_server(args.grpc)
            server.start_restful_server(args.rest)
        except RuntimeError:
            if not ExitSignalHandle_.has_stopped():
                raise
        shutdown.install()
        if ExitSignalHandle_.has_stopped():  # SIGTERM/SIGINT while starting: Serving's handler stopped it
            logger.info("signal received while starting; nothing was served")
        else:
            logger.info("MindSpore Serving ready: servable %r (methods generate, chat), gRPC %s, REST %s, "
                        "engine %s, %d workers", SERVABLE_NAME, args.grpc, args.rest, args.engine_address, workers)
            while not shutdown.requested.wait(0.5):
                if ExitSignalHandle_.has_stopped():  # Serving stopped by itself (e.g. every worker died)
                    logger.error("MindSpore Serving stopped unexpectedly")
                    return 1
            _drain(run_dir, args.drain_timeout)
        clean = True
    finally:
        server.stop()
        if not clean:
            logger.error("worker logs: %s", os.path.join(run_dir, "serving_logs"))
    logger.info("MindSpore Serving stopped")
    if own_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _drain(run_dir: str, timeout: float) -> None:
    """Refuse new requests, then wait for the ones in flight. Two idle readings in a row: a worker
    that passed the draining check just before the file appeared publishes its count within
    microseconds, well inside one poll interval."""
    with open(os.path.join(run_dir, DRAINING_FILE), "w"):
        pass
    deadline = time.monotonic() + timeout
    idle_readings, last_logged = 0, None
    while time.monotonic() < deadline:
        left = inflight_count(run_dir)
        idle_readings = idle_readings + 1 if left == 0 else 0
        if idle_readings == 2:
            return
        if left and left != last_logged:
            logger.info("waiting for %d request(s) in flight", left)
            last_logged = left
        time.sleep(0.1)
    logger.warning("drain timeout (%.0f s): stopping with %d request(s) in flight", timeout, inflight_count(run_dir))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s ms-serving: %(message)s")
    try:
        return serve(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
