"""Tensor-parallel serving: `deepseek-ms serve --config yaml/serve_tiny_tp2.yaml` runs the engine
server under msrun on two CPU ranks in lockstep. Against single-process serving of the same
model (models/deepseek-ms-tiny, started through the same launcher), greedy OpenAI API requests
-- chat, completions, a stream, a concurrent batch, and a stream started after the ranks sat
idle longer than a CPU collective waits and finished while the service stops -- return
identical text; the engine reports two ranks, two msrun workers exist, the idle follower rank
sleeps rather than spinning in its Broadcast, and the stop ends every process."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving_helpers import REPO_ROOT, free_port, stop, tail, wait_until  # noqa: E402

TP2_CONFIG = os.path.join(REPO_ROOT, "yaml", "serve_tiny_tp2.yaml")
SINGLE_CONFIG = os.path.join(REPO_ROOT, "yaml", "serve_default.yaml")
IDLE_SECONDS = 40  # a follower rank blocked in Broadcast fails after ~30 s without the keep-alive
IDLE_CPU_SHARE = 0.25  # of one core, for the idle follower (it spins a whole core if it waits in Broadcast)
REQUESTS = [  # (endpoint, body); every one greedy
    ("chat", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}),
    ("completions", {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True}),
    ("chat", {"messages": [{"role": "user", "content": "Tell me a story about a cat."}], "max_tokens": 20,
              "ignore_eos": True, "stream": True}),
]
BATCH = ["The sky is", "Two plus two", "My name is"]  # sent concurrently: batched decode steps


class Server:
    """`deepseek-ms serve` as users run it, in its own session and working directory."""

    def __init__(self, tmp, config, *overrides):
        self.port = free_port()
        self.log = tmp / "serve.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_ms.cli", "serve", "--config", config, "--no-ms-serving",
                 f"serve.openai.port={self.port}", "serve.engine.max_num_seqs=4", *overrides],
                cwd=str(tmp), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                                    timeout=300)
        self.address = None

    def wait_ready(self):
        wait_until(lambda: b"Ctrl+C stops everything" in self.log.read_bytes(), self.proc, timeout=600,
                   what="deepseek-ms serve", log_path=self.log)
        self.address = next(line.split()[-1] for line in self.log.read_text(errors="replace").splitlines()
                            if line.startswith("engine server  unix:"))

    def health(self):
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=60).json()

    def text(self, endpoint, body):
        body = dict(body, model="deepseek-ms-tiny", temperature=0.0)
        extra = {k: body.pop(k) for k in ("ignore_eos",) if k in body}
        create = self.client.chat.completions.create if endpoint == "chat" else self.client.completions.create
        out = create(**body, extra_body=extra)
        if body.get("stream"):
            return "".join((c.choices[0].delta.content or "") for c in out if c.choices)
        return out.choices[0].message.content if endpoint == "chat" else out.choices[0].text

    def answers(self):
        texts = [self.text(endpoint, body) for endpoint, body in REQUESTS]
        with concurrent.futures.ThreadPoolExecutor(len(BATCH)) as pool:
            texts += list(pool.map(lambda p: self.text("completions", {"prompt": p, "max_tokens": 12,
                                                                       "ignore_eos": True}), BATCH))
        return texts

    def processes(self):
        """pid -> environment of every process whose command line names this server's engine socket."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.address.encode() not in f.read():
                        continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    found[int(pid)] = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            except OSError:  # exited meanwhile
                continue
        return found


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _stop_all(*servers):
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)  # what Ctrl+C does: the launcher drains and stops its children
    return [stop(s.proc, timeout=180) for s in servers]


def test_tp2_serving_matches_single_process(tmp_path):
    (tmp_path / "tp2").mkdir()
    (tmp_path / "single").mkdir()
    # both start at once (msrun start-up overlaps the single engine's); no compile cache on either
    tp2 = Server(tmp_path / "tp2", TP2_CONFIG)
    single = Server(tmp_path / "single", SINGLE_CONFIG, "serve.engine.compile_cache_dir=")
    try:
        tp2.wait_ready()
        single.wait_ready()
        assert tp2.health()["engine"]["world_size"] == 2 and single.health()["engine"]["world_size"] == 1
        workers = {pid: env for pid, env in tp2.processes().items() if env.get(b"MS_ROLE") == b"MS_WORKER"}
        assert sorted(env[b"RANK_ID"] for env in workers.values()) == [b"0", b"1"]
        assert tp2.health()["engine"]["pid"] in workers  # rank 0 serves the socket
        follower = next(pid for pid, env in workers.items() if env[b"RANK_ID"] == b"1")

        tp2_texts = tp2.answers()
        idle_since, follower_cpu = time.monotonic(), _cpu_seconds(follower)
        single_texts = single.answers()  # meanwhile the TP ranks sit idle
        assert tp2_texts == single_texts
        assert all(tp2_texts[1:]), tp2_texts  # ignore_eos: real text to compare
        time.sleep(max(0.0, IDLE_SECONDS - (time.monotonic() - idle_since)))
        idle_share = (_cpu_seconds(follower) - follower_cpu) / (time.monotonic() - idle_since)
        assert idle_share < IDLE_CPU_SHARE, f"the idle follower rank used {idle_share:.0%} of a core"

        # after the idle spell, a stream that is still running when the service is told to stop
        body = dict(REQUESTS[1][1], model="deepseek-ms-tiny", temperature=0.0)
        extra = {"ignore_eos": body.pop("ignore_eos")}
        stream = iter(tp2.client.completions.create(**body, stream=True, extra_body=extra))
        first = next(c for c in stream if c.choices and c.choices[0].text)
        tp2.proc.send_signal(signal.SIGTERM)
        assert first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices) == single_texts[1]
    except BaseException:
        print(tail(tp2.log, 8000), tail(single.log, 4000))
        raise
    finally:
        codes = _stop_all(tp2, single)
    assert codes == [0, 0], tail(tp2.log, 8000)
    assert "engine-server: rank 1: released" in tp2.log.read_text(errors="replace")
    assert tp2.processes() == {} and single.processes() == {}  # msrun, its scheduler, both ranks, the API


def test_bad_parallel_configs_are_named(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "deepseek_ms.cli", "serve", "--config", TP2_CONFIG,
                           "--no-ms-serving", "parallel_config.model_parallel=3"], cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "'parallel_config.model_parallel' (3) must divide num_attention_heads (4)" in proc.stderr

    from deepseek_ms.config import ConfigError
    from deepseek_ms.serving import launcher
    with pytest.raises(ConfigError, match="data_parallel and pipeline_stage must be 1"):
        launcher.load_settings(TP2_CONFIG, None, {"parallel_config.data_parallel": 2})
    service = launcher.Service(launcher.load_settings(TP2_CONFIG, None, {}))
    try:
        monkeypatch.setattr(launcher.shutil, "which", lambda *a, **k: None)
        with pytest.raises(RuntimeError, match="needs MindSpore's msrun"):
            service._spawn_msrun([])
    finally:
        service.stop()
