"""The on-disk compile cache across restarts: a second process replays the first one's
shapes from the cache and gives the same outputs; shapes first seen in a later run are
appended and do not disturb the cached ones."""
import json
import os
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def _run(cache_dir, lengths):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    proc = subprocess.run([sys.executable, str(TESTS / "compile_cache_probe.py"), str(cache_dir), lengths],
                          capture_output=True, text=True, env=env, timeout=900, cwd=str(cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cache_files(cache_dir):
    return sorted(p.name for p in pathlib.Path(cache_dir).rglob("compile_cache_*.mindir"))


def _manifest(cache_dir):
    (manifest,) = pathlib.Path(cache_dir).rglob("shapes.jsonl")
    return manifest.read_text().splitlines()


def test_restart_reuses_compiled_graphs(tmp_path):
    first = _run(tmp_path, "5,20")
    shapes = _manifest(tmp_path)
    assert first["warmup_graphs"] == 0 and len(shapes) == first["graphs"] > 0
    assert len(_cache_files(tmp_path)) == len(shapes)  # one cache entry per compiled shape

    # restart with a new prompt length too: the known shapes replay from the cache (no new
    # entries for them), the new ones are appended after them
    second = _run(tmp_path, "5,20,40")
    assert second["warmup_graphs"] == len(shapes)
    assert {k: second["outputs"][k] for k in first["outputs"]} == first["outputs"]
    grown = _manifest(tmp_path)
    assert grown[:len(shapes)] == shapes and len(grown) > len(shapes)
    assert len(_cache_files(tmp_path)) == len(grown)

    # requests in another order (other batch shapes may appear): the cached ones replay,
    # outputs are unchanged, and the manifest and the cache stay in step
    third = _run(tmp_path, "40,20,5")
    assert third["warmup_graphs"] == len(grown)
    assert third["outputs"] == second["outputs"]
    final = _manifest(tmp_path)
    assert final[:len(grown)] == grown and len(_cache_files(tmp_path)) == len(final)


def test_engine_server_entry_point_uses_the_cache(tmp_path):
    """`python -m deepseek_ms.serving.engine_server` is the entry script MindSpore hashes into
    the cache key; a request through it must compile, answer and leave cache entries."""
    from deepseek_ms.serving.engine_client import EngineClient
    from helpers import fixture_dir
    from serving_helpers import engine_ready, start_engine, stop, wait_until

    address = f"unix:{tmp_path / 'engine.sock'}"
    log = tmp_path / "engine.log"
    proc = start_engine(str(fixture_dir("deepseek_v3_tiny")), address, log, "--compile-cache-dir", tmp_path / "graphs",
                        "--max-num-seqs", 2)
    try:
        wait_until(lambda: engine_ready(address), proc, what="engine server", log_path=log)
        out = EngineClient(address).generate([5, 6, 7, 8], {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True})
        assert len(out["token_ids"]) == 3
    finally:
        assert stop(proc) == 0
    assert _cache_files(tmp_path / "graphs") and len(_manifest(tmp_path / "graphs")) == len(_cache_files(tmp_path / "graphs"))
