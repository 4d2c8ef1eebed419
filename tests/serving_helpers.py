"""Start the serving processes for tests: a text-capable tiny model folder, the engine server
and the OpenAI API as real child processes on loopback / a unix socket."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from helpers import fixture_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_model(cache_dir, template="reasoning") -> str:
    """The deepseek_v3_tiny fixture with a generated tokenizer and a chat template ("reasoning":
    R1-style, the generation prompt opens <think>; "plain")."""
    from deepseek_ms.serving.text_model import ensure_text_model
    return ensure_text_model(str(fixture_dir("deepseek_v3_tiny")), template, cache_dir=str(cache_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(module: str, args, log_path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", module] + [str(a) for a in args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def start_engine(model_dir, address, log_path, *extra) -> subprocess.Popen:
    return spawn("deepseek_ms.serving.engine_server",
                 ["--model", model_dir, "--address", address, "--served-model-name", "tiny", *extra], log_path)


def start_api(model_dir, address, port, log_path, *extra) -> subprocess.Popen:
    return spawn("deepseek_ms.serving.openai_api",
                 ["--model", model_dir, "--engine-address", address, "--port", port, "--served-model-name", "tiny",
                  *extra], log_path)


def wait_until(check, proc=None, timeout=180.0, what="server", log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout} s:\n{tail(log_path)}")


def engine_ready(address) -> bool:
    from deepseek_ms.serving.engine_client import EngineClient
    return EngineClient(address).health(timeout=2.0)["ok"]


def http_status(url, timeout=5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def tail(path, n=4000) -> str:
    if path is None or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def stop(proc: subprocess.Popen, timeout=60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
