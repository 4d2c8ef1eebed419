"""The continuous-batching engine on the HF-parity fixture model: batch invariance,
chunked prefill, prefix caching, preemption, cancellation, seeds and accounting."""
import numpy as np
import pytest

from deepseek_ms.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_ms.engine.sampling import SamplingParams
from helpers import fixture_dir, load_fixture_model, random_prompts, run_requests

NAME = "deepseek_v3_tiny"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _model():
    return load_fixture_model(NAME)


def _engine(**kwargs):
    return LLMEngine(_model(), None, EngineConfig(**kwargs))


def _run(engine, prompts, params=GREEDY, ids=None):
    return run_requests(engine, prompts, params, ids)


@pytest.fixture(scope="module")
def target():
    """A 37-token prompt and its greedy continuation from the plain (non-engine) model API."""
    prompt = random_prompts(1, seed=42, lo=37, hi=38)[0]
    ref = _model().generate(np.array([prompt]), max_new_tokens=GREEDY.max_tokens)[0, len(prompt):].tolist()
    return prompt, ref


def test_alone_matches_plain_generate(target):
    prompt, ref = target
    assert _run(_engine(), [prompt]) == [ref]


def test_among_seven_others_of_different_lengths(target):
    prompt, ref = target
    others = random_prompts(7, seed=1)
    out = _run(_engine(max_num_seqs=8), others[:3] + [prompt] + others[3:])
    assert out[3] == ref


def test_new_prompts_prefill_together_and_match_alone(target):
    """New prompts scheduled in one step share a prefill graph per padded length (batched
    in powers of two); each one's greedy output equals its output alone."""
    prompt, ref = target
    others = random_prompts(3, seed=5, lo=33, hi=60) + random_prompts(1, seed=6, lo=5, hi=12)
    engine = _engine(max_num_seqs=8)
    calls = []
    run = engine.runner._run

    def recording_run(kind, *args):
        calls.append((kind, args[0].shape))
        return run(kind, *args)

    engine.runner._run = recording_run
    out = _run(engine, others[:2] + [prompt] + others[2:])
    assert out[2] == ref
    prefills = sorted(shape for kind, shape in calls if kind == "prefill")
    # lengths 33..59 and 37 pad to 64 (4 prompts: one batch of 4); the short one pads to 16
    assert prefills == [(1, 16), (4, 64)]
    alone = [_run(_engine(), [p])[0] for p in others]
    assert out[:2] + out[3:] == alone


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_prefill_on_and_off(target, chunked):
    prompt, ref = target
    engine = _engine(max_num_batched_tokens=16, enable_chunked_prefill=chunked)
    out = _run(engine, random_prompts(3, seed=2) + [prompt])
    assert out[-1] == ref



def test_a_prompt_that_fits_a_step_is_split_only_when_first():
    from deepseek_ms.engine.block_manager import BlockManager
    from deepseek_ms.engine.request import Request
    from deepseek_ms.engine.scheduler import Scheduler

    def first_step(lengths):
        scheduler = Scheduler(BlockManager(num_blocks=256, block_size=16), max_num_seqs=16,
                              max_num_batched_tokens=100)
        for i, n in enumerate(lengths):
            scheduler.add(Request(f"r{i}", list(range(1000 * i, 1000 * i + n)), GREEDY, None))
        return [(c.request.request_id, len(c.token_ids)) for c in scheduler.schedule().prefills]

    # the third prompt would leave a 20-token remainder for a call of its own: it waits whole
    assert first_step([40, 40, 40]) == [("r0", 40), ("r1", 40)]
    # a prompt that comes first is split at the budget, whatever its length
    assert first_step([250, 40]) == [("r0", 100)]
    # one longer than the budget needs several calls anyway: it starts in what is left
    assert first_step([40, 250]) == [("r0", 40), ("r1", 60)]


def test_prefix_cache_hit_and_miss(target):
    prompt, ref = target
    engine = _engine(block_size=8)
    assert _run(engine, [prompt], ids=["miss"]) == [ref]
    engine.add_request("hit", prompt, GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].token_ids == ref
    assert outs[0].metrics.num_cached_prompt_tokens == (len(prompt) // 8) * 8
    # a different continuation of a shared prefix still matches its own reference
    other = prompt[:24] + [5, 6, 7]
    ref_other = _model().generate(np.array([other]), max_new_tokens=GREEDY.max_tokens)[0, len(other):].tolist()
    assert _run(engine, [other], ids=["shared"]) == [ref_other]


def test_preemption_recomputes_and_matches(target):
    prompt, ref = target
    # 14 usable blocks of 8 tokens cannot hold four 37+12-token sequences at once
    engine = _engine(block_size=8, num_blocks=15, max_num_seqs=4)
    out = _run(engine, [prompt] + random_prompts(3, seed=3, lo=30, hi=40))
    assert engine.scheduler.num_preemptions > 0
    assert out[0] == ref
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_allocatable_blocks


def test_seed_gives_same_output_whatever_the_batch():
    prompt = random_prompts(1, seed=5)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = _run(_engine(), [prompt], params)[0]
    engine = _engine()
    others = random_prompts(5, seed=6)
    mixed_params = [SamplingParams(temperature=0.7, seed=i, max_tokens=8, ignore_eos=True) for i in range(5)]
    for i, p in enumerate(others):
        engine.add_request(f"o{i}", p, mixed_params[i])
    assert _run(engine, [prompt], params, ids=["target"])[0] == alone


def test_logprobs_match_model_logits(target):
    prompt, ref = target
    engine = _engine()
    engine.add_request("lp", prompt, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True))
    entries = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            entries += out.logprobs
    logits = _model().logits(np.array([prompt + ref[:3]]))[0, len(prompt) - 1:]
    logsoftmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    assert len(entries) == 4
    for step, (token, logprob, top) in enumerate(entries):
        assert token == ref[step]
        assert logprob == pytest.approx(logsoftmax[step, token], abs=1e-4)
        assert [t for t, _ in top][0] == token and len(top) == 3


def test_max_tokens_stop_token_ids_and_min_tokens(target):
    prompt, ref = target
    engine = _engine()
    stop_tok = ref[4]
    engine.add_request("a", prompt, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_tok],
                                                   ignore_eos=True))
    engine.add_request("b", prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals["a"].token_ids == ref[:5] and finals["a"].finish_reason == "stop"
    assert finals["b"].token_ids == ref[:3] and finals["b"].finish_reason == "length"


def test_cancellation_frees_blocks_at_once(target):
    prompt, _ = target
    engine = _engine()
    engine.add_request("x", prompt, GREEDY)
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort("x")
    assert engine.block_manager.num_used_blocks == 0
    outs = engine.step()
    assert outs[0].finished and outs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_cache_accounting():
    engine = _engine()
    cfg = _model().config
    assert engine.cache_bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    stats = engine.stats()
    assert stats["cache_usage"] == 0 and stats["cache_blocks_free"] == stats["cache_blocks_total"]


@pytest.mark.parametrize("prompt, match", [
    ([], "empty"),
    ([0, 1, 10 ** 6], "outside the vocabulary"),
    (list(range(10)) * 30, "context length"),
])
def test_bad_requests_are_refused_clearly(prompt, match):
    engine = _engine(max_model_len=256)
    with pytest.raises(ValueError, match=match):
        engine.add_request(None, prompt, GREEDY)
    assert not engine.has_unfinished_requests()


def test_soak_1000_random_requests_with_cancellations():
    rng = np.random.default_rng(7)
    engine = _engine(block_size=8, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    shared = [rng.integers(0, 512, 16).tolist() for _ in range(4)]
    submitted = finished = aborted = 0
    live = set()
    while submitted < 1000 or engine.has_unfinished_requests():
        while submitted < 1000 and len(live) < 24:
            prefix = shared[rng.integers(0, 4)] if rng.random() < 0.5 else []
            prompt = prefix + rng.integers(0, 512, rng.integers(1, 20)).tolist()
            params = SamplingParams(temperature=float(rng.choice([0.0, 1.0])), max_tokens=int(rng.integers(1, 6)),
                                    seed=int(submitted), ignore_eos=True)
            rid = f"s{submitted}"
            engine.add_request(rid, prompt, params)
            live.add(rid)
            submitted += 1
        if live and rng.random() < 0.15:
            victim = sorted(live)[rng.integers(0, len(live))]
            if engine.abort(victim):
                aborted += 1
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        engine.block_manager.check_invariants()
    assert finished == 1000 and aborted >= 50  # at least 5% cancelled, some mid-flight
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_allocatable_blocks


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def text_model_folder(tmp_path_factory):
    """The fixture model plus a byte-fallback sentencepiece tokenizer of the model's 512-token
    vocabulary and a chat template: random weights, but real text in and out."""
    import json
    import shutil

    import sentencepiece

    from test_tokenizer import LLAMA_CONFIG, SP_CORPUS

    folder = tmp_path_factory.mktemp("text_model")
    for f in fixture_dir(NAME).iterdir():
        if f.name != "golden.npz":
            shutil.copy(f, folder / f.name)
    words = " ".join(f"w{i}x{i * 7 % 13}" for i in range(400))  # enough distinct pieces for 512 ids
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS.splitlines() + [words] * 3), model_prefix=str(folder / "tokenizer"),
        vocab_size=512, model_type="bpe", byte_fallback=True, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(LLAMA_CONFIG, chat_template=CHAT_TEMPLATE)))
    return folder


@pytest.fixture(scope="module")
def text_engine(text_model_folder):
    from deepseek_ms.tokenizer import load_tokenizer

    tok = load_tokenizer(str(text_model_folder))
    assert len(tok) == _model().config.vocab_size
    return LLMEngine(_model(), tok, EngineConfig())


def _stream(engine, prompt, params):
    engine.add_request("t", prompt, params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta_text)
            final = out
    return deltas, final


def test_text_prompt_stream_and_stop_strings(text_engine):
    params = dict(temperature=0.0, max_tokens=24, ignore_eos=True, skip_special_tokens=True)
    deltas, full = _stream(text_engine, "Hello world", SamplingParams(**params))
    assert "".join(deltas) == full.text == text_engine.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    text = full.text
    assert len(text) > 8, text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    deltas, out = _stream(text_engine, "Hello world", SamplingParams(stop=[stop], **params))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    assert "".join(deltas) == out.text  # nothing of the stop string leaked into the stream


def test_cli_generate_text_and_chat(text_model_folder, text_engine, capsys, monkeypatch):
    import io

    from deepseek_ms.cli import main

    _, expected = _stream(text_engine, "Hello world", SamplingParams(temperature=0.0, max_tokens=8))
    assert main(["generate", "--model", str(text_model_folder), "--prompt", "Hello world", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith(expected.text)

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\nAnd again\n\n"))
    assert main(["chat", "--model", str(text_model_folder), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and out.count("you> ") == 3


def test_async_streams_match_and_cancel_frees_blocks(target):
    import asyncio

    from deepseek_ms.engine.async_engine import AsyncLLMEngine

    prompt, ref = target
    engine = AsyncLLMEngine(_engine())

    async def collect(p):
        tokens = []
        async for out in engine.generate(p, GREEDY):
            tokens += out.new_token_ids
        return tokens

    async def cancel_early(p):
        async for out in engine.generate(p, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)):
            if len(out.token_ids) >= 2:
                break  # the consumer goes away: the request must be aborted

    async def invalid():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in engine.generate([1, 10 ** 6], GREEDY):
                pass
        return "refused"

    async def main():
        results = await asyncio.gather(collect(prompt), *[collect(p) for p in random_prompts(3, seed=9)],
                                       cancel_early(prompt), invalid())
        return results

    try:
        results = asyncio.run(main())
        assert results[0] == ref and results[-1] == "refused"
        for _ in range(100):
            if not engine.engine.has_unfinished_requests():
                break
            import time
            time.sleep(0.05)
        bm = engine.engine.block_manager
        assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_allocatable_blocks
    finally:
        engine.shutdown()
