"""MindSpore Serving front end (servable/deepseek, deepseek_ms.serving.ms_serving) against a real
engine server: REST and the shipped gRPC client, both methods, greedy outputs equal to the
engine's own; malformed instances fail alone and leave every worker alive; engine down and
back; `deepseek-ms client`; SIGTERM drains the request in flight and stops master and workers.

One engine server and one Serving launcher (3 workers) per module; the tests share them in
file order, and the last one shuts the launcher down."""
import base64
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pytest

from helpers import fixture_dir
from serving_helpers import REPO_ROOT, engine_ready, free_port, spawn, start_engine, stop, tail, text_model, wait_until

from deepseek_ms.serving import ms_service_pb2 as pb
from deepseek_ms.serving.engine_client import EngineClient
from deepseek_ms.serving.grpc_client import ServingClient, ServingError, _fill_tensor
from deepseek_ms.serving.ms_serving import DRAINING_FILE, INFLIGHT_DIR, inflight_count

WORKERS = 3
GREEDY = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return text_model(tmp_path_factory.mktemp("serving_ms_model"), template="plain")


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    """Engine server + Serving launcher; yields a dict of addresses, processes and helpers."""
    from deepseek_ms.tokenizer import load_tokenizer

    sock_dir = tempfile.mkdtemp(prefix="dsms-")  # short: unix socket paths are limited to 107 bytes
    logs = tmp_path_factory.mktemp("serving_ms_logs")
    s = {"model": model, "engine_address": f"unix:{sock_dir}/engine.sock", "run_dir": os.path.join(sock_dir, "run"),
         "grpc": f"127.0.0.1:{free_port()}", "rest_port": free_port(), "engine_log": str(logs / "engine.log"),
         "serving_log": str(logs / "serving.log"), "tokenizer": load_tokenizer(model)}
    s["start_engine"] = lambda: start_engine(model, s["engine_address"], s["engine_log"], "--max-num-seqs", "4")
    s["engine"] = s["start_engine"]()
    s["serving"] = None
    try:
        wait_until(lambda: engine_ready(s["engine_address"]), s["engine"], what="engine server",
                   log_path=s["engine_log"])
        s["serving"] = spawn("deepseek_ms.serving.ms_serving",
                             ["--engine-address", s["engine_address"], "--model", model, "--grpc", s["grpc"],
                              "--rest", f"127.0.0.1:{s['rest_port']}", "--workers", WORKERS, "--timeout", 300,
                              "--run-dir", s["run_dir"]], s["serving_log"])
        wait_until(lambda: "MindSpore Serving ready" in tail(s["serving_log"], 100000), s["serving"],
                   what="MindSpore Serving", log_path=s["serving_log"])
        yield s
    finally:
        if s["serving"] is not None:
            stop(s["serving"])
        stop(s["engine"])
        shutil.rmtree(sock_dir, ignore_errors=True)


def rest(stack, method, instances):
    body = json.dumps({"instances": instances}).encode()
    url = f"http://127.0.0.1:{stack['rest_port']}/model/deepseek:{method}"
    with urllib.request.urlopen(url, body, timeout=300) as r:
        return json.loads(r.read())


def expected(stack, prompt_ids, params=GREEDY):
    """What the engine itself produces for these ids, as the servable should report it."""
    out = EngineClient(stack["engine_address"]).generate(prompt_ids, params)
    return {"text": stack["tokenizer"].decode(out["token_ids"], skip_special_tokens=True),
            "finish_reason": out["finish_reason"], "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(out["token_ids"])}


def chat_ids(stack, messages):
    return list(stack["tokenizer"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def worker_pids(stack):
    return sorted(int(p) for p in os.listdir(os.path.join(stack["run_dir"], INFLIGHT_DIR)) if p.isdigit())


def assert_workers_alive(stack, pids):
    """The same worker processes as at start (Serving restarts a dead worker under a new pid)."""
    assert worker_pids(stack) == pids
    for pid in pids:
        os.kill(pid, 0)


def test_rest_generate_and_chat_match_engine(stack):
    prompts = ["Hello world", "The quick brown fox"]
    out = rest(stack, "generate", [dict(prompt=p, **GREEDY) for p in prompts])
    assert "instances" in out, out
    assert out["instances"] == [expected(stack, stack["tokenizer"].encode(p)) for p in prompts]
    assert out["instances"][0]["completion_tokens"] > 0

    out = rest(stack, "chat", [dict(messages=json.dumps(MESSAGES), **GREEDY)])
    assert out["instances"] == [expected(stack, chat_ids(stack, MESSAGES))]
    assert len(worker_pids(stack)) == WORKERS


def test_grpc_client_generate_and_chat_match_engine(stack):
    with ServingClient(stack["grpc"]) as client:
        assert client.generate("Hello world", **GREEDY) == expected(stack, stack["tokenizer"].encode("Hello world"))
        assert client.chat(MESSAGES, **GREEDY) == expected(stack, chat_ids(stack, MESSAGES))
        sampled = client.generate("Hello world", max_tokens=4, temperature=0.8, top_p=0.9)
        assert sampled["completion_tokens"] <= 4 and sampled["finish_reason"] in ("stop", "length")


def _malformed(rng):
    """(method, instance, words the error must contain) for one seeded-random malformed instance."""
    good = dict(GREEDY, prompt="Hello world")
    too_long = "w1x7 " * 300
    cases = [
        ("max_tokens", -rng.randint(0, 10 ** 6), "max_tokens must be >= 1"),
        ("max_tokens", rng.choice([2.5, 0.5, 1e9 + 0.5]), "max_tokens must be an integer"),
        ("max_tokens", str(rng.randint(1, 9)), "max_tokens must be a number"),
        ("max_tokens", [rng.randint(1, 9), rng.randint(1, 9)], "max_tokens must be a single number"),
        ("max_tokens", rng.choice([True, False]), "max_tokens must be a number"),
        ("temperature", -rng.uniform(0.01, 100), "temperature"),
        ("temperature", "hot", "temperature must be a number"),
        ("top_p", rng.choice([0, 0.0, 1.5, -1]), "top_p"),
        ("top_p", [0.5, 0.5], "top_p must be a single number"),
        ("prompt", rng.randint(-5, 5), "prompt must be a string"),
        ("prompt", {"b64": base64.b64encode(rng.randbytes(8)).decode(), "type": "bytes"}, "prompt must be a string"),
        ("prompt", too_long[:rng.randint(1300, 1500)], "context length"),
    ]
    chat_cases = [
        "{" + "".join(rng.choice("[]{}:,\"ab") for _ in range(rng.randint(0, 12))),
        "[]", "{}", "[1]", json.dumps([{"role": rng.randint(0, 9), "content": "x"}]),
        json.dumps([{"role": "user"}]), json.dumps([{"role": "user", "content": ["x"]}]), json.dumps("just text"),
    ]
    if rng.random() < 0.3:
        text = rng.choice(chat_cases)
        return "chat", dict(GREEDY, messages=text), "messages"
    key, value, words = rng.choice(cases)
    return "generate", dict(good, **{key: value}), words


def grpc_error(client, method, instance) -> str:
    try:
        result = client.predict(method, [instance])[0]
    except ServingError as e:  # the only instance failed: Serving reports it for the whole request
        return str(e)
    assert isinstance(result, ServingError), result
    return str(result)


def test_malformed_instances_fail_alone_and_workers_survive(stack):
    pids = worker_pids(stack)
    good = dict(GREEDY, prompt="Hello world")
    reference = expected(stack, stack["tokenizer"].encode("Hello world"))
    bad = [dict(good, max_tokens=-3), dict(good, max_tokens="7"), dict(good, prompt=12),
           dict(good, prompt="w1x7 " * 300)]
    out = rest(stack, "generate", [good] + bad + [good])["instances"]
    assert out[0] == out[-1] == reference
    assert [("error_msg" in o) for o in out] == [False, True, True, True, True, False]
    assert "max_tokens must be >= 1, got -3" in out[1]["error_msg"]
    assert "max_tokens must be a number, got the string '7'" in out[2]["error_msg"]
    assert "prompt must be a string" in out[3]["error_msg"]
    assert "context length" in out[4]["error_msg"]
    out = rest(stack, "chat", [dict(GREEDY, messages="[{oops"), dict(GREEDY, messages=json.dumps(MESSAGES))])
    assert "messages is not valid JSON" in out["instances"][0]["error_msg"]
    assert out["instances"][1] == expected(stack, chat_ids(stack, MESSAGES))

    rng = random.Random(1234)
    with ServingClient(stack["grpc"]) as client:
        for i in range(200):
            method, instance, words = _malformed(rng)
            if i % 2:  # half over gRPC, where a JSON list is an array and b64 is bytes
                instance = {k: np.array(v) if isinstance(v, list) else base64.b64decode(v["b64"])
                            if isinstance(v, dict) else v for k, v in instance.items()}
                assert words in grpc_error(client, method, instance), instance
            else:
                reply = rest(stack, method, [instance])
                assert words in reply["error_msg"], (instance, reply)
        # strings that are not UTF-8 fail inside Serving before any stage runs
        request = pb.PredictRequest()
        request.servable_spec.name, request.servable_spec.method_name = "deepseek", "generate"
        item = request.instances.add()
        item.items["prompt"].dtype = pb.MS_STRING
        item.items["prompt"].shape.dims.append(1)
        item.items["prompt"].bytes_val.append(b"\xff\xfe bad")
        for key, value in GREEDY.items():
            _fill_tensor(item.items[key], key, value)
        reply = client._predict(request, timeout=60)
        assert b"valid UTF-8" in reply.error_msg[0].error_msg
        not_utf8 = dict(good, prompt={"b64": base64.b64encode(b"\xc3\x28").decode(), "type": "str"})
        out = rest(stack, "generate", [not_utf8, good, not_utf8])["instances"]
        assert "valid UTF-8" in out[0]["error_msg"] and "valid UTF-8" in out[2]["error_msg"]
        assert out[1] == reference

        assert client.generate("Hello world", **GREEDY) == reference
    assert rest(stack, "generate", [good])["instances"] == [reference]
    assert_workers_alive(stack, pids)
    assert inflight_count(stack["run_dir"]) == 0


def test_cli_client(stack, capsys):
    from deepseek_ms.cli import main

    ref = expected(stack, stack["tokenizer"].encode("Hello world"))
    args = ["client", "--address", stack["grpc"]]
    assert main(args + ["generate", "--prompt", "Hello world", "--max-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ref
    assert main(args + ["chat", "--messages", json.dumps(MESSAGES), "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected(stack, chat_ids(stack, MESSAGES))["text"] + "\n"
    assert main(args + ["generate", "--prompt", "Hello world", "--max-tokens", "-2"]) == 1


def test_engine_down_then_back(stack):
    pids = worker_pids(stack)
    ref = expected(stack, stack["tokenizer"].encode("Hello world"))
    assert stop(stack["engine"]) == 0
    with ServingClient(stack["grpc"]) as client:
        for _ in range(WORKERS + 1):  # every worker meets the dead engine
            with pytest.raises(ServingError, match="engine unavailable: cannot reach the engine"):
                client.generate("Hello world", **GREEDY)
        stack["engine"] = stack["start_engine"]()
        wait_until(lambda: engine_ready(stack["engine_address"]), stack["engine"], what="engine server",
                   log_path=stack["engine_log"])
        for _ in range(WORKERS + 1):
            assert client.generate("Hello world", **GREEDY) == ref
    assert_workers_alive(stack, pids)


def test_launcher_refuses_model_without_tokenizer(caplog):
    from deepseek_ms.serving.ms_serving import main

    cwd = os.getcwd()
    assert main(["--engine-address", "unix:/nonexistent/engine.sock", "--model", str(fixture_dir("deepseek_v3_tiny")),
                 "--workers", "1"]) == 2
    assert "tokenizer" in caplog.text and os.getcwd() == cwd


def test_sigterm_drains_request_in_flight_then_stops(stack):
    pids = worker_pids(stack)
    params = {"max_tokens": 48, "temperature": 0.0, "top_p": 1.0}
    ref = expected(stack, stack["tokenizer"].encode("The quick brown fox"), params)
    result = {}
    with ServingClient(stack["grpc"]) as client:
        def long_request():
            result["out"] = client.generate("The quick brown fox", **params)

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 60
        while inflight_count(stack["run_dir"]) == 0 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inflight_count(stack["run_dir"]) == 1, "the request never reached a worker"
        stack["serving"].send_signal(signal.SIGTERM)
        while not os.path.exists(os.path.join(stack["run_dir"], DRAINING_FILE)) and stack["serving"].poll() is None:
            time.sleep(0.01)
        with pytest.raises(ServingError, match="shutting down|not available|UNAVAILABLE"):
            client.generate("Hello world", **GREEDY)
        thread.join(120)
    assert result["out"] == ref
    assert stack["serving"].wait(60) == 0
    for pid in pids:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"worker {pid} still running after the launcher exited")


@pytest.fixture
def servable_module(model, tmp_path, monkeypatch):
    """servable_config.py loaded in this process (no Serving around it), its settings pointing at a
    fake engine on a unix socket that either refuses as overloaded or never answers."""
    import importlib.util
    import socket

    from deepseek_ms.serving.ms_serving import ServingSettings

    sock_dir = tempfile.mkdtemp(prefix="dsms-")
    address = os.path.join(sock_dir, "fake.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen()
    mode = {"reply": None}
    held = []

    def fake_engine():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            message = json.loads(conn.makefile("rb").readline())
            if mode["reply"] is not None:
                conn.sendall(json.dumps(dict(mode["reply"], id=message["id"])).encode() + b"\n")

    threading.Thread(target=fake_engine, daemon=True).start()
    os.makedirs(tmp_path / "run" / INFLIGHT_DIR)
    ServingSettings(f"unix:{address}", model, request_timeout=0.5).write(str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path / "run")
    spec = importlib.util.spec_from_file_location(
        "servable_config_under_test", os.path.join(REPO_ROOT, "servable", "deepseek", "servable_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module, mode
    listener.close()
    for conn in held:
        conn.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_stage_errors_are_instance_errors(servable_module):
    module, mode = servable_module
    ids, params = module.preprocess_generate("Hello world", 4, 0.0, 1.0)
    assert ids.dtype == np.int64 and json.loads(params) == {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    assert module.INFLIGHT.count == 1

    mode["reply"] = {"type": "error", "code": "overloaded", "message": "the engine is overloaded"}
    with pytest.raises(RuntimeError, match="engine overloaded, retry later: the engine is overloaded"):
        module.call_engine(ids, params)
    assert module.INFLIGHT.count == 0  # a failed request leaves the drain's count

    module.preprocess_generate("Hello world", 4, 0.0, 1.0)
    mode["reply"] = None  # the engine accepts and never answers
    with pytest.raises(RuntimeError, match=r"timed out: engine request timed out after 0.5 s"):
        module.call_engine(ids, params)
    assert module.INFLIGHT.count == 0

    # what Serving cannot carry back (it would end the worker) is made safe
    assert module._stage(lambda: ("a\ud800b", 1))() == ("a?b", 1)
    with pytest.raises(RuntimeError) as e:
        module._stage(lambda: module._fail("bad \udc80 input"))()
    str(e.value).encode("utf-8")


def test_generated_stubs_match_installed_serving():
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        from gen_serving_grpc import bundled_pb2_path, serialized_descriptor
    finally:
        sys.path.pop(0)
    from deepseek_ms.serving import ms_service_pb2

    assert ms_service_pb2.DESCRIPTOR.serialized_pb == serialized_descriptor(bundled_pb2_path())
