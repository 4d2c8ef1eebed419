"""`deepseek-ms serve`: the engine server, the OpenAI API and MindSpore Serving as one service.

Settings come from the `serve:` section of a mindformers-style YAML (yaml/serve_default.yaml)
plus dotted CLI overrides (`serve.openai.port=8001`); the engine's block_size, num_blocks and
context length (seq_length) come from `model.model_config`, as in mindformers. Each part is
a child process in its own session, so a Ctrl+C reaches only this launcher, which then stops
them in order: first the front ends (they refuse new requests and finish the ones in flight),
then the engine server (which finishes whatever is left), each with SIGTERM.

With `use_parallel: True` and a `parallel_config` of several ranks, the engine server runs
under msrun (scripts/engine_server.py on every local rank, in lockstep; msrun's logs go to
the run directory, and its worker output to this console). It is stopped through rank 0,
which drains and then releases the other ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..config import ConfigError, ParallelConfig
from ..engine.llm_engine import EngineConfig
from ..yaml_config import load_yaml_config, read_yaml_dict
from .engine_client import EngineClient, EngineError, parse_address
from .text_model import ensure_text_model

logger = logging.getLogger(__name__)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MS_SERVING_MODULE = "deepseek_ms.serving.ms_serving"
ENGINE_SCRIPT = os.path.join(PACKAGE_ROOT, "scripts", "engine_server.py")  # msrun runs script files only


@dataclass
class ServeSettings:
    model: str                                   # folder served (with tokenizer files)
    host: str = "127.0.0.1"
    served_model_name: Optional[str] = None
    startup_timeout: float = 900.0
    drain_timeout: float = 600.0
    engine_address: Optional[str] = None         # None: a unix socket in a fresh temp dir
    max_queue: int = 128
    engine: Dict[str, Any] = field(default_factory=dict)   # EngineConfig fields
    openai_port: int = 8000
    api_key: Optional[str] = None
    request_timeout: float = 600.0
    ms_serving: bool = True
    grpc_port: int = 5500
    rest_port: int = 1500
    workers: Optional[int] = None                # None: the engine's max_num_seqs
    parallel: Optional[Dict[str, int]] = None    # parallel_config when use_parallel asks for several ranks
    kernels: Optional[str] = None                # model.model_config.kernels; None: the default (auto)


_SECTIONS = {
    None: {"host": "host", "served_model_name": "served_model_name", "startup_timeout": "startup_timeout",
           "drain_timeout": "drain_timeout"},
    "engine": {"address": "engine_address", "max_queue": "max_queue"},
    "openai": {"port": "openai_port", "api_key": "api_key", "request_timeout": "request_timeout"},
    "ms_serving": {"enabled": "ms_serving", "grpc_port": "grpc_port", "rest_port": "rest_port",
                   "workers": "workers"},
}
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_RUNTIME_TO_ENGINE = {"block_size": "block_size", "num_blocks": "num_blocks", "seq_length": "max_model_len"}


def load_settings(config_path: str, model: Optional[str], overrides: Mapping[str, Any]) -> ServeSettings:
    """Settings from the YAML, the CLI overrides and `model` (default: the YAML's pretrained_model_dir,
    else deepseek_ms.cli.DEFAULT_MODEL). Raises ConfigError naming the bad key."""
    from ..cli import DEFAULT_MODEL

    overrides = dict(overrides)
    if model is None and not read_yaml_dict(config_path).get("pretrained_model_dir") \
            and "pretrained_model_dir" not in overrides:
        model = DEFAULT_MODEL
    if model is not None:
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(f"model folder {model} has no config.json (expected an HF or converted model folder)")
        overrides["pretrained_model_dir"] = os.path.abspath(model)
    rc = load_yaml_config(config_path, overrides)
    src = rc.config_path
    values: Dict[str, Any] = {"model": rc.pretrained_model_dir, "kernels": rc.runtime.get("kernels")}
    engine: Dict[str, Any] = {_RUNTIME_TO_ENGINE[k]: v for k, v in rc.runtime.items() if k in _RUNTIME_TO_ENGINE}
    for section, keys in _SECTIONS.items():
        data = rc.serve if section is None else rc.serve.get(section) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{src}: 'serve.{section}' must be a mapping")
        for key, value in data.items():
            where = f"serve.{section + '.' if section else ''}{key}"
            if section is None and key in _SECTIONS:
                continue
            if key in keys:
                values[keys[key]] = None if value == "" else value
            elif section == "engine" and key in _ENGINE_FIELDS:
                engine[key] = value
            else:
                raise ConfigError(f"{src}: unknown key '{where}'")
    if rc.use_parallel and rc.parallel.world_size > 1:
        values["parallel"] = dataclasses.asdict(rc.parallel)
    settings = ServeSettings(engine=engine, **values)
    _check(settings, src)
    return settings


def _check(s: ServeSettings, src: str) -> None:
    try:
        EngineConfig(**s.engine).validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{src}: serve.engine: {e}") from None
    for name in ("openai_port", "grpc_port", "rest_port"):
        port = getattr(s, name)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"{src}: {name} must be a TCP port (1-65535), got {port!r}")
    for name in ("startup_timeout", "drain_timeout", "request_timeout"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{src}: {name} must be a positive number of seconds, got {value!r}")
    if not isinstance(s.max_queue, int) or isinstance(s.max_queue, bool) or s.max_queue < 0:
        raise ConfigError(f"{src}: serve.engine.max_queue must be an integer >= 0, got {s.max_queue!r}")
    if s.workers is not None and (not isinstance(s.workers, int) or not 1 <= s.workers <= 64):
        raise ConfigError(f"{src}: serve.ms_serving.workers must be in 1..64, got {s.workers!r}")
    if not isinstance(s.ms_serving, bool):
        raise ConfigError(f"{src}: serve.ms_serving.enabled must be true or false, got {s.ms_serving!r}")
    if s.parallel and (s.parallel["data_parallel"] > 1 or s.parallel["pipeline_stage"] > 1):
        raise ConfigError(f"{src}: parallel_config: serving runs one engine over tensor/expert-parallel ranks; "
                          f"data_parallel and pipeline_stage must be 1, got {s.parallel['data_parallel']} and "
                          f"{s.parallel['pipeline_stage']}")
    if s.engine_address is not None:
        try:
            parse_address(s.engine_address)
        except ValueError as e:
            raise ConfigError(f"{src}: serve.engine.address: {e}") from None


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


class Service:
    """The running processes. `start()` returns once all answer; `stop()` drains and ends them."""

    def __init__(self, settings: ServeSettings):
        self.s = settings
        self.children: Dict[str, subprocess.Popen] = {}
        self.model_dir = ensure_text_model(settings.model)
        self.model_name = settings.served_model_name or os.path.basename(os.path.normpath(settings.model))
        self._tmp = tempfile.mkdtemp(prefix="deepseek-ms-")  # the run directory
        self.engine_address = settings.engine_address or f"unix:{os.path.join(self._tmp, 'engine.sock')}"
        self.msrun_log_dir = os.path.join(self._tmp, "msrun_log") if settings.parallel else None
        self.engine_pid: Optional[int] = None    # rank 0 under msrun: the process to signal
        self.engine_world_size = 1

    def _spawn(self, name: str, module: str, args: List[str]) -> None:
        self._popen(name, [sys.executable, "-m", module] + args)

    def _popen(self, name: str, cmd: List[str], path: Optional[str] = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        if path is not None:
            env["PATH"] = path
        logger.info("starting %s: %s", name, " ".join(cmd))
        self.children[name] = subprocess.Popen(cmd, env=env, start_new_session=True)

    def _spawn_msrun(self, args: List[str]) -> None:
        """The engine server on every rank of the parallel layout, all local."""
        # msrun starts each rank as `python` from PATH: this interpreter's bin goes first
        path = os.pathsep.join(p for p in (os.path.dirname(sys.executable), os.environ.get("PATH")) if p)
        msrun = shutil.which("msrun", path=path)
        if msrun is None:
            raise RuntimeError(f"tensor-parallel serving needs MindSpore's msrun, which is neither in "
                               f"{os.path.dirname(sys.executable)} nor on PATH")
        if not os.path.isfile(ENGINE_SCRIPT):
            raise RuntimeError(f"tensor-parallel serving runs {ENGINE_SCRIPT} under msrun, and it is missing "
                               f"(install the package from its repository checkout: make setup)")
        ranks = ParallelConfig(**self.s.parallel).world_size
        cmd = [msrun, f"--worker_num={ranks}", f"--local_worker_num={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", f"--log_dir={self.msrun_log_dir}", "--join=True",
               f"--cluster_time_out={int(self.s.startup_timeout)}", ENGINE_SCRIPT, *args,
               "--parallel-config", json.dumps(self.s.parallel)]
        self._popen("engine server", cmd, path)

    def _wait(self, name: str, ready, deadline: float, cancel: threading.Event) -> None:
        proc = self.children[name]
        while time.monotonic() < deadline:
            if cancel.is_set():
                raise RuntimeError(f"stopped while waiting for {name}")
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting (see its log above)")
            if ready():
                logger.info("%s is ready", name)
                return
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not become ready within {self.s.startup_timeout:g} s")

    def engine_args(self) -> List[str]:
        """The engine server's command-line arguments for these settings."""
        s = self.s
        args = ["--model", self.model_dir, "--address", self.engine_address, "--served-model-name",
                self.model_name, "--max-queue", str(s.max_queue)]
        for key, value in s.engine.items():
            args += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
        if s.kernels:
            args += ["--kernels", s.kernels]
        return args

    def start(self, cancel: threading.Event) -> None:
        s = self.s
        deadline = time.monotonic() + s.startup_timeout
        ports = [s.openai_port] + ([s.grpc_port, s.rest_port] if s.ms_serving else [])
        busy = [p for p in ports if not _port_free(s.host, p)]
        if busy:  # checked first: a port held by another process would look like a ready front end
            raise RuntimeError(f"port(s) {', '.join(map(str, busy))} on {s.host} are already in use; "
                               f"choose others (e.g. serve.openai.port=8001)")
        engine_args = self.engine_args()
        if s.parallel:
            self._spawn_msrun(engine_args)
        else:
            self._spawn("engine server", "deepseek_ms.serving.engine_server", engine_args)
        client = EngineClient(self.engine_address)
        self._wait("engine server", lambda: _engine_ok(client), deadline, cancel)
        health = client.health(timeout=30.0)
        self.engine_world_size = health["world_size"]
        if s.parallel:
            self.engine_pid = health["pid"]
            logger.info("engine server runs on %d ranks (rank 0 is pid %d)", self.engine_world_size,
                        self.engine_pid)

        api_args = ["--model", self.model_dir, "--engine-address", self.engine_address, "--served-model-name",
                    self.model_name, "--host", s.host, "--port", str(s.openai_port),
                    "--request-timeout", str(s.request_timeout), "--drain-timeout", str(s.drain_timeout)]
        if s.api_key:
            api_args += ["--api-key", s.api_key]
        self._spawn("OpenAI API", "deepseek_ms.serving.openai_api", api_args)

        if s.ms_serving and importlib.util.find_spec(MS_SERVING_MODULE) is None:
            logger.warning("MindSpore Serving front end (%s) is not available; serving the OpenAI API only",
                           MS_SERVING_MODULE)
        elif s.ms_serving:
            ms_args = ["--engine-address", self.engine_address, "--model", self.model_dir,
                       "--grpc", f"{s.host}:{s.grpc_port}", "--rest", f"{s.host}:{s.rest_port}",
                       "--timeout", str(s.request_timeout), "--drain-timeout", str(s.drain_timeout)]
            if s.workers:
                ms_args += ["--workers", str(s.workers)]
            self._spawn("MindSpore Serving", MS_SERVING_MODULE, ms_args)

        host = _url_host(s.host)
        self._wait("OpenAI API", lambda: _http_ok(f"http://{host}:{s.openai_port}/health"), deadline, cancel)
        if "MindSpore Serving" in self.children:
            self._wait("MindSpore Serving", lambda: _port_open(host, s.grpc_port) and _port_open(host, s.rest_port),
                       deadline, cancel)

    def endpoints(self) -> str:
        s, host = self.s, _url_host(self.s.host)
        auth = f" -H 'Authorization: Bearer {s.api_key}'" if s.api_key else ""
        lines = [f"deepseek-ms is serving {self.model_name!r} ({self.model_dir})", "",
                 f"OpenAI API   http://{host}:{s.openai_port}/v1   (/health, /metrics)",
                 f"  curl http://{host}:{s.openai_port}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                 f"-d '{{\"model\": \"{self.model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
                 f"\"max_tokens\": 32}}'"]
        if "MindSpore Serving" in self.children:
            lines += [f"MindSpore Serving REST  http://{host}:{s.rest_port}/model/deepseek:generate",
                      f"  curl -X POST http://{host}:{s.rest_port}/model/deepseek:generate -d '{{\"instances\": "
                      f"[{{\"prompt\": \"Hello\", \"max_tokens\": 32, \"temperature\": 0.0, \"top_p\": 1.0}}]}}'",
                      f"MindSpore Serving gRPC  {host}:{s.grpc_port}",
                      f"  deepseek-ms client --address {host}:{s.grpc_port} generate --prompt Hello --max-tokens 32"]
        lines += [f"engine server  {self.engine_address}"]
        if self.msrun_log_dir:
            lines += [f"engine ranks   {self.engine_world_size} under msrun (logs: {self.msrun_log_dir})"]
        lines += ["", "Ctrl+C stops everything (requests in flight finish first)."]
        return "\n".join(lines)

    def failed_child(self) -> Optional[str]:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self) -> int:
        """Front ends first, then the engine; returns the worst exit code."""
        worst = 0
        front = [n for n in self.children if n != "engine server"]
        for group in (front, ["engine server"]):
            procs = [(n, self.children[n]) for n in group if n in self.children]
            for name, proc in procs:
                if proc.poll() is None:
                    logger.info("stopping %s", name)
                    self._terminate(name, proc)
            for name, proc in procs:
                try:
                    proc.wait(self.s.drain_timeout + 30)
                except subprocess.TimeoutExpired:
                    logger.error("%s did not stop in time; killing it", name)
                    self._kill(name, proc)
                worst = max(worst, abs(proc.returncode or 0))
        if worst and self.msrun_log_dir and os.path.isdir(self.msrun_log_dir):
            logger.error("msrun logs kept in %s", self.msrun_log_dir)
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return worst

    def _under_msrun(self, name: str) -> bool:
        return name == "engine server" and self.msrun_log_dir is not None

    def _terminate(self, name: str, proc: subprocess.Popen) -> None:
        if not self._under_msrun(name):
            proc.send_signal(signal.SIGTERM)
        elif self.engine_pid is not None:
            # rank 0 drains, then releases the other ranks; msrun exits once they all have
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.engine_pid, signal.SIGTERM)
        else:  # not serving yet: msrun answers SIGINT by killing its workers (SIGTERM would orphan them)
            proc.send_signal(signal.SIGINT)

    def _kill(self, name: str, proc: subprocess.Popen) -> None:
        if self._under_msrun(name):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
                return
        proc.kill()
        proc.wait()


def _engine_ok(client: EngineClient) -> bool:
    try:
        return bool(client.health(timeout=2.0).get("ok"))
    except EngineError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=1.0):
            return True
    except OSError:
        return False


def run(settings: ServeSettings) -> int:
    """Start everything, print the endpoints, serve until SIGINT/SIGTERM (or a child dies)."""
    stop = threading.Event()
    received = []

    def handle(signum, _frame):
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    service = Service(settings)
    try:
        try:
            service.start(stop)
        except RuntimeError as e:
            logger.error("%s", e)
            service.stop()
            return 1
        if not stop.is_set():
            print(service.endpoints(), flush=True)
        failure = None
        while not stop.wait(0.5):
            failure = service.failed_child()
            if failure:
                logger.error("%s; stopping the service", failure)
                break
        if received:
            logger.info("%s received: stopping (requests in flight finish first)",
                        signal.Signals(received[0]).name)
        code = service.stop()
        return 1 if failure else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
