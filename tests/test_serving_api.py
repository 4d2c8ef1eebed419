"""The OpenAI-compatible API and the engine server as real processes on loopback, driven by the
official `openai` client and raw HTTP: results, streaming, reasoning, concurrency, bad input,
disconnects, overload, engine restarts, metrics, SIGTERM, and the `deepseek-ms serve` launcher."""
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving_helpers import (REPO_ROOT, engine_ready, free_port, http_status, spawn, start_api,  # noqa: E402
                             start_engine, stop, tail, text_model, wait_until)

MODEL = "tiny"
MAX_NUM_SEQS, MAX_QUEUE = 16, 64


class Stack:
    """Engine server + OpenAI API processes; the engine can be stopped and restarted."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.model_dir = text_model(tmp / "models", "reasoning")
        self.address = f"unix:{tmp / 'engine.sock'}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.engine_log, self.api_log = tmp / "engine.log", tmp / "api.log"
        self.engine = self.api = None

    def start_engine(self):
        self.engine = start_engine(self.model_dir, self.address, self.engine_log, "--max-num-seqs", MAX_NUM_SEQS,
                                   "--max-queue", MAX_QUEUE)
        wait_until(lambda: engine_ready(self.address), self.engine, what="engine server", log_path=self.engine_log)

    def start(self):
        self.start_engine()
        self.api = start_api(self.model_dir, self.address, self.port, self.api_log)
        wait_until(lambda: http_status(self.base + "/health") == 200, self.api, what="OpenAI API",
                   log_path=self.api_log)

    def engine_health(self):
        from deepseek_ms.serving.engine_client import EngineClient
        # generous: the engine thread's lock can be held for a whole compiling step
        return EngineClient(self.address).health(timeout=120)

    def wait_engine_idle(self, timeout=300.0):
        deadline = time.monotonic() + timeout
        h = None
        while time.monotonic() < deadline:
            h = self.engine_health()
            s = h["stats"]
            if h["stats_age"] < 1.0 and h["num_active"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
                return h
            time.sleep(0.1)
        raise AssertionError(f"engine still busy: {h}")

    def close(self):
        for proc in (self.api, self.engine):
            if proc is not None:
                stop(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("serving"))
    try:
        s.start()
        yield s
    except BaseException:
        print(tail(s.engine_log), tail(s.api_log))
        raise
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0.0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# ------------------------------------------------------------------------------ openai client

def test_models_and_chat_with_reasoning(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = chat(client, "Hello there")
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == 6 or choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the template opened <think>: a random model never closes it, so everything is reasoning
    reasoning = choice.message.model_extra["reasoning_content"]
    assert reasoning and choice.message.content == ""

    chunks = list(chat(client, "Hello there", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == reasoning
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_stop_logprobs_seed(client):
    full = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0.0,
                                     logprobs=3)
    text = full.choices[0].text
    lp = full.choices[0].logprobs
    assert len(lp.token_logprobs) == full.usage.completion_tokens == len(lp.tokens)
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0.0, stream=True))
    assert streamed == text

    cut = next(i for i in range(len(text) // 2, len(text)) if text[i].strip())
    stop = text[cut:cut + 2]
    stopped = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0.0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop)]

    a, b = (client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text

    r = chat(client, "Hi", logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_reasoning_splitter_at_every_split():
    from deepseek_ms.serving.openai_api import ReasoningSplitter

    text = "step one</thin k></think>answer</think>!"
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            s = ReasoningSplitter(in_reasoning=True)
            parts = [s.feed(text[:cut]), s.feed(text[cut:cut2]), s.feed(text[cut2:]), s.flush()]
            assert "".join(p[0] for p in parts) == "step one</thin k>"
            assert "".join(p[1] for p in parts) == "answer</think>!"
    assert ReasoningSplitter(in_reasoning=False).feed("a</think>b") == ("", "a</think>b")


def test_engine_client_contract(stack, tmp_path):
    from deepseek_ms.serving.engine_client import (AsyncEngineClient, EngineClient, EngineRequestError,
                                                   EngineUnavailableError, parse_address)

    c = EngineClient(stack.address)
    out = c.generate([1, 278, 286], {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True})
    deltas = list(c.stream([1, 278, 286], {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
                                            "logprobs": 2}))
    assert out["token_ids"] == [t for d in deltas for t in d["new_token_ids"]] and len(out["token_ids"]) == 4
    assert (out["finish_reason"], out["prompt_tokens"], out["completion_tokens"]) == ("length", 3, 4)
    assert deltas[-1]["finished"] and all(len(d["logprobs"][0][2]) == 2 for d in deltas)
    for params, field in [({"max_tokens": 0}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
                          ({"bogus": 1}, "bogus"), ({"max_tokens": 1000}, "context length"),
                          ({"stop_token_ids": [10 ** 6], "min_tokens": 1}, "stop_token_ids")]:
        with pytest.raises(EngineRequestError, match=field):
            c.generate([1, 2], params)
    with pytest.raises(EngineRequestError, match="vocabulary"):
        c.generate([1, 10 ** 6], {})

    async def cancel_after_first_token():
        aclient = AsyncEngineClient(stack.address)
        deltas = []
        async for delta in aclient.stream([1, 278], {"max_tokens": 100, "ignore_eos": True}, request_id="c1"):
            deltas.append(delta)
            if len(deltas) == 1:
                await aclient.cancel("c1")
        return deltas

    deltas = asyncio.run(cancel_after_first_token())
    assert deltas[-1]["finish_reason"] == "abort" and len(deltas) < 100

    # raw protocol: bad messages get an error reply each, and the connection keeps working
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(stack.address[len("unix:"):])
        sock.sendall(b'not json\n{"op": "fly", "id": 1}\n{"op": "generate", "id": [1]}\n'
                     b'{"op": "generate", "id": "g", "prompt_token_ids": "abc"}\n{"op": "health", "id": "h"}\n')
        reader = sock.makefile("rb")
        replies = [json.loads(reader.readline()) for _ in range(5)]
    assert [r["type"] for r in replies] == ["error"] * 4 + ["health"]
    assert [r.get("code") for r in replies[:4]] == ["invalid_request"] * 4
    assert "prompt_token_ids" in replies[3]["message"]
    with pytest.raises(EngineUnavailableError):
        EngineClient(f"unix:{tmp_path / 'nothing.sock'}").health()
    with pytest.raises(ValueError, match="expected"):
        parse_address("http://localhost:1")
    assert stack.wait_engine_idle()["stats"]["cache_blocks_free"] == stack.engine_health()["stats"]["cache_blocks_total"]


# ------------------------------------------------------------------------------ load

def test_64_concurrent_streams_equal_sequential(stack, client):
    prompts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(1 + i % 9)) for i in range(64)]
    aclient = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(prompt):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0,
                                                  stream=True)
        pieces, reason = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(pieces), reason

    async def main():
        try:
            return await asyncio.gather(*[one(p) for p in prompts])
        finally:
            await aclient.close()

    concurrent = asyncio.run(main())
    for prompt, got in zip(prompts, concurrent):
        ref = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0).choices[0]
        assert got == (ref.text, ref.finish_reason), prompt


def test_overload_is_503_and_recovers(stack, client):
    n = MAX_NUM_SEQS + MAX_QUEUE + 10
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 100, "temperature": 0.0, "ignore_eos": True,
            "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=stack.base, timeout=300,
                                     limits=httpx.Limits(max_connections=n)) as http:
            started = asyncio.Event()

            async def one():
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        return r.status_code, json.loads(await r.aread())
                    await started.wait()   # hold the slot until every request has been answered
                    return 200, None

            tasks = [asyncio.ensure_future(one()) for _ in range(n)]
            refused = []
            for fut in asyncio.as_completed(tasks):
                status, error = await fut
                refused.append((status, error))
                if len(refused) == n - (MAX_NUM_SEQS + MAX_QUEUE):
                    break
            started.set()
            for t in tasks:
                t.cancel()  # the accepted streams disconnect
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused

    refused = asyncio.run(main())
    assert all(status == 503 and error["error"]["code"] == "overloaded" for status, error in refused), refused
    stats = stack.wait_engine_idle()["stats"]
    assert stats["cache_blocks_free"] == stats["cache_blocks_total"]
    assert chat(client, "Hello there").choices[0].finish_reason in ("length", "stop")


def _malformed_cases(rng):
    """(method, path, raw body bytes, expected statuses). Every case is invalid by construction."""
    chat_ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    comp_ok = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    junk = [None, True, -1, 0, 1.5, "x", "", [], {}, [1, "a"], {"a": 1}, float("nan"), 10 ** 12, -10 ** 9]
    bad_common = {
        "model": [1, ["tiny"], "nope", "TINY", {"id": "tiny"}, True],
        "max_tokens": [-5, 0, 10 ** 9, 257, "4", 1.5, True, [4], float("inf")],
        "temperature": [-0.5, 2.5, "hot", [1], float("nan"), True, {}],
        "top_p": [-0.1, 1.5, "x", float("nan"), [0.5], False],
        "seed": [-1, "abc", 1.5, [1], {}],
        "n": [2, 0, -1, "1", 1.5],
        "stop": [5, [1, 2], [""], {"a": 1}, [None]],
        "frequency_penalty": [5, -3, "x"],
        "presence_penalty": [2.5, -2.5, [0]],
        "stream": ["yes", 1, [True]],
        "stream_options": ["x", 3, {"include_usage": "y"}],
        "stop_token_ids": [[99999], [-1], "x", [1.5]],
        "best_of": [3, 5], "echo": [True], "suffix": ["s"], "logit_bias": [{"1": 5}],
        "response_format": [{"type": "json_object"}], "tools": [[{"type": "function"}]],
    }
    bad_chat = dict(bad_common, **{
        "messages": [None, "hi", [], [1], [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image"}]}],
                     [{"role": "user", "content": {"a": 1}}], [{"role": "user", "content": "word " * 400}]],
        "logprobs": ["yes", 3, [True]],
        "top_logprobs": [21, -1, "2", 1.5],
    })
    bad_comp = dict(bad_common, **{
        "prompt": [None, 5, [], [[1, 2], [3]], [1, -5], [99999], ["a", "b"], "", "w " * 600, [True], {"p": 1}],
        "logprobs": [21, -1, "x", 1.5, True],
    })
    cases = []
    raw_bodies = [b"", b"{", b"null", b"[]", b"123", b'"str"', b"\xff\xfe", b'{"model": tiny}', b"{'a': 1}",
                  b'{"model": "tiny", "messages": [}']
    for body in raw_bodies:
        for path in ("/v1/chat/completions", "/v1/completions"):
            cases.append(("POST", path, body, {400}))
    for method, path in [("GET", "/v1/chat/completions"), ("GET", "/v1/completions"), ("POST", "/v1/models"),
                         ("DELETE", "/v1/models")]:
        cases.append((method, path, b"", {405}))
    for path in ("/v1/nothing", "/v2/chat/completions", "/", "/v1/chat/completions/x"):
        cases.append(("POST", path, json.dumps(chat_ok).encode(), {404}))
    while len(cases) < 240:
        is_chat = rng.random() < 0.5
        base, bad = (chat_ok, bad_chat) if is_chat else (comp_ok, bad_comp)
        body = dict(base)
        for key in rng.sample(sorted(bad), rng.choice([1, 1, 2])):
            body[key] = rng.choice(bad[key])
        if rng.random() < 0.15:
            body.pop(rng.choice(["model", "messages" if is_chat else "prompt"]))
        if rng.random() < 0.1:
            body["extra_junk"] = rng.choice(junk)  # ignored: unknown fields are allowed
        if body.get("top_logprobs") is not None and body.get("logprobs") is True and 0 <= body["top_logprobs"] <= 20:
            continue
        try:
            raw = json.dumps(body).encode()
        except ValueError:
            continue
        cases.append(("POST", "/v1/chat/completions" if is_chat else "/v1/completions", raw, {400}))
    return cases


def test_malformed_requests_are_4xx_and_server_keeps_serving(stack, client):
    before = chat(client, "Hello there")
    cases = _malformed_cases(random.Random(1234))
    assert len(cases) >= 200
    failures = []
    with httpx.Client(base_url=stack.base, timeout=120) as http:
        for method, path, raw, expected in cases:
            r = http.request(method, path, content=raw, headers={"Content-Type": "application/json"})
            if r.status_code not in expected:
                failures.append((method, path, raw[:200], r.status_code, r.text[:300]))
                continue
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"], r.text
            assert {"type", "param", "code"} <= set(error), r.text
    assert not failures, failures[:10]
    after = chat(client, "Hello there")
    assert after.choices[0].message.model_extra == before.choices[0].message.model_extra
    stack.wait_engine_idle()


def test_api_key(stack, tmp_path):
    port = free_port()
    api = start_api(stack.model_dir, stack.address, port, tmp_path / "api.log", "--api-key", "s3cret")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base + "/health") == 200, api, what="API with key", log_path=tmp_path / "api.log")
        with httpx.Client(base_url=base, timeout=60) as http:
            assert http.get("/v1/models").status_code == 401
            bad = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == MODEL
    finally:
        assert stop(api) == 0


def test_metrics_parse_and_move(stack, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        text = httpx.get(stack.base + "/metrics").text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return values

    key = ("deepseek_ms_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    m0 = scrape()
    r = chat(client, "Count me", max_tokens=5)
    m1 = scrape()
    assert m1[key] == m0.get(key, 0) + 1
    assert m1[("deepseek_ms_generation_tokens_total", ())] == \
        m0[("deepseek_ms_generation_tokens_total", ())] + r.usage.completion_tokens
    assert m1[("deepseek_ms_prompt_tokens_total", ())] == \
        m0[("deepseek_ms_prompt_tokens_total", ())] + r.usage.prompt_tokens
    assert m1[("deepseek_ms_time_to_first_token_seconds_count", ())] == \
        m0[("deepseek_ms_time_to_first_token_seconds_count", ())] + 1
    assert m1[("deepseek_ms_engine_up", ())] == 1
    for name in ("deepseek_ms_num_requests_running", "deepseek_ms_num_requests_waiting",
                 "deepseek_ms_cache_usage_ratio", "deepseek_ms_time_per_output_token_seconds_count"):
        assert (name, ()) in m1


# ------------------------------------------------------------------------------ faults

def test_client_disconnect_mid_stream_frees_blocks(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    generated = stack.wait_engine_idle()["stats"]["num_generated_tokens"]
    with httpx.Client(base_url=stack.base, timeout=300) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break
    h = stack.wait_engine_idle()
    assert h["stats"]["cache_blocks_free"] == h["stats"]["cache_blocks_total"]
    assert h["stats"]["num_generated_tokens"] - generated < 200  # aborted, not run to max_tokens


def test_engine_down_is_503_and_recovers(stack, client):
    assert stop(stack.engine) == 0
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, "anyone there?")
    assert e.value.status_code == 503 and "engine" in e.value.message
    assert http_status(stack.base + "/health") == 503
    stack.start_engine()
    assert chat(client, "anyone there?").choices[0].finish_reason in ("length", "stop")
    assert http_status(stack.base + "/health") == 200


def test_sigterm_finishes_the_stream_refuses_new_and_exits(stack):
    # long enough to still be streaming when the new request arrives 0.5 s after SIGTERM
    # (30 tokens took under 0.5 s once decode got fast), short enough to stay in one
    # compiled block-table width (prompt + tokens < 256)
    tokens = 240
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=stack.base, timeout=300) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            stack.api.send_signal(signal.SIGTERM)
            stack.engine.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = http.post("/v1/completions", json=dict(body, stream=False))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in [first] + rest[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == tokens
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert stack.api.wait(60) == 0 and stack.engine.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack.base + "/health")


def test_a_stalled_teardown_still_ends_the_process_with_every_stack_logged():
    # a non-daemon thread that never ends would hold interpreter exit forever
    script = ("import threading, time\n"
              "from deepseek_ms.serving.openai_api import exit_if_teardown_stalls\n"
              "def stuck_in_teardown():\n"
              "    time.sleep(3600)\n"
              "threading.Thread(target=stuck_in_teardown).start()\n"
              "exit_if_teardown_stalls(0.5)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert done.returncode == 0 and time.monotonic() - started < 30
    assert "has not exited 0.5 s after the server stopped" in done.stderr
    assert "in stuck_in_teardown" in done.stderr  # the stack that held the exit


# ------------------------------------------------------------------------------ launcher and config

def test_serve_config_loads_here_and_in_mindformers(tmp_path):
    from deepseek_ms.cli import DEFAULT_MODEL, SERVE_CONFIG
    from deepseek_ms.config import ConfigError
    from deepseek_ms.serving.launcher import load_settings

    s = load_settings(SERVE_CONFIG, None, {"serve.openai.port": 9001, "serve.engine.max_num_seqs": 4})
    assert s.model == os.path.abspath(DEFAULT_MODEL)
    assert (s.openai_port, s.engine["max_num_seqs"], s.engine["block_size"], s.host) == (9001, 4, 16, "127.0.0.1")
    with pytest.raises(ConfigError, match="serve.openai.prot"):
        load_settings(SERVE_CONFIG, None, {"serve.openai.prot": 1})
    with pytest.raises(ConfigError, match="max_num_seqs"):
        load_settings(SERVE_CONFIG, None, {"serve.engine.max_num_seqs": 0})
    with pytest.raises(ConfigError, match="model.model_config.kernels"):
        load_settings(SERVE_CONFIG, None, {"model.model_config.kernels": "fast"})

    pytest.importorskip("mindformers")
    script = ("import json, sys\nfrom mindformers.tools.register import MindFormerConfig\n"
              "def plain(x):\n"
              "    return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else x\n"
              "print('@@MF@@' + json.dumps(plain(MindFormerConfig(sys.argv[1]))))\n")
    proc = subprocess.run([sys.executable, "-c", script, SERVE_CONFIG], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@MF@@")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    mf = json.loads(lines[-1][len("@@MF@@"):])
    import yaml
    with open(SERVE_CONFIG) as f:
        ours = yaml.safe_load(f)
    assert mf["serve"] == ours["serve"] and mf["model"]["model_config"]["block_size"] == 16


def test_deepseek_ms_serve_starts_prints_and_stops(tmp_path):
    model_dir = text_model(tmp_path / "models", "plain")
    port = free_port()
    log = tmp_path / "serve.log"
    proc = spawn("deepseek_ms.cli", ["serve", "--model", model_dir, "--no-ms-serving", f"serve.openai.port={port}",
                                     "serve.engine.max_num_seqs=4", "serve.served_model_name=demo"], log)
    try:
        wait_until(lambda: b"Ctrl+C stops everything" in log.read_bytes(), proc, timeout=300,
                   what="deepseek-ms serve", log_path=log)
        out = log.read_text()
        assert f"http://127.0.0.1:{port}/v1" in out and "curl " in out
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/health").json()["engine"]["max_num_seqs"] == 4
            assert http.get("/v1/models").json()["data"][0]["id"] == "demo"
        address = next(line.split()[-1] for line in out.splitlines() if line.startswith("engine server  unix:"))
    finally:
        code = stop(proc, timeout=120)
    assert code == 0, tail(log)
    assert not os.path.exists(address[len("unix:"):])
    assert "engine server stopped" in log.read_text()


def test_kernel_choice_reaches_the_engine_server():
    """model.model_config.kernels in the serve YAML (or a dotted override) becomes the engine
    server's --kernels, which its parser accepts."""
    from deepseek_ms.cli import SERVE_CONFIG
    from deepseek_ms.serving import engine_server
    from deepseek_ms.serving.launcher import Service, load_settings

    for overrides, want in (({}, "auto"), ({"model.model_config.kernels": "mindspore"}, "mindspore")):
        service = Service(load_settings(SERVE_CONFIG, None, overrides))
        args = service.engine_args()
        assert args[args.index("--kernels") + 1] == want
        assert engine_server.build_parser().parse_args(args).kernels == want
