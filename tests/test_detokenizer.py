"""Streaming output: IncrementalDetokenizer and StopStringMatcher.

The byte-level BPE tests use the real DeepSeek tokenizers fetched by
`python scripts/fetch_test_tokenizers.py` (skipped without them, failing under
CI=true); the sentencepiece tests train a byte-fallback model on the spot.
"""
import functools
import json
import os
import pathlib
import random

import pytest

from deepseek_ms.detokenizer import MAX_HELD_TOKENS, SETTLE_MARGIN, IncrementalDetokenizer, StopStringMatcher
from deepseek_ms.tokenizer import load_tokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZERS_DIR = pathlib.Path(os.environ.get("DEEPSEEK_MS_TOKENIZERS") or REPO_ROOT / ".cache" / "tokenizers")
FETCH_HINT = "run `python scripts/fetch_test_tokenizers.py` (or point DEEPSEEK_MS_TOKENIZERS at its output)"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
FFFD = "\ufffd"

TEXTS = [
    "Hello, world! Streaming text one token at a time.",
    "你好，世界！深度求索是一家人工智能公司。机器学习需要大量数据。",
    "emoji 😀👍🏽🇨🇳👨‍👩‍👧‍👦 mixed with 中文 and ασκηση ελληνικά",
    "🤖🦾🧠🎉🎉🎉 鑫龘靐齉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "def f(x):\n\treturn x ** 2  # 平方\n\n\n    spaces   and\ttabs\r\n",
    "<think>\n先想一想 🤔\n</think>\n\n答案是 42。",
    "日本語のテキスト、한국어 텍스트, العربية, עברית, ไทย",
]


@functools.lru_cache(maxsize=None)
def real_tokenizer(name):
    path = TOKENIZERS_DIR / name
    if not (path / "tokenizer.json").is_file():
        message = "real tokenizer {} not found in {}: {}".format(name, TOKENIZERS_DIR, FETCH_HINT)
        if IN_CI:
            pytest.fail(message + " (CI=true: failing instead of skipping)")
        pytest.skip(message)
    return load_tokenizer(path)


SP_CORPUS = ("The quick brown fox jumps over the lazy dog. Streaming tokens one by one.\n"
             "def add(a, b):\n    return a + b  # code\n"
             "机器学习是人工智能的一个分支。深度学习模型需要大量数据。\n") * 30


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    import sentencepiece
    folder = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS.splitlines()), model_prefix=str(folder / "tokenizer"),
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": True}), encoding="utf-8")
    return load_tokenizer(folder)


def stream(tokenizer, ids, skip_special_tokens=False, prompt_ids=None, chunk=1):
    """All deltas (flush last) of streaming `ids` `chunk` ids at a time."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = []
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        deltas.append(detok.add(piece[0] if chunk == 1 else piece))
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    assert detok.output_ids == list(ids)
    return deltas


def check_stream(tokenizer, ids, skip_special_tokens=False, chunk=1):
    deltas = stream(tokenizer, ids, skip_special_tokens, chunk=chunk)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected, ids
    if FFFD not in expected:
        assert not any(FFFD in d for d in deltas), (ids, deltas)
    return deltas


def fragment_ids(tokenizer, limit=400):
    """Ids whose text alone is an incomplete UTF-8 character (a byte-level fragment)."""
    found = []
    for token_id in range(tokenizer.vocab_size):
        if FFFD in tokenizer.decode([token_id]):
            found.append(token_id)
            if len(found) >= limit:
                break
    return found


# --------------------------------------------------------------------------------------
# IncrementalDetokenizer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v3"])
def test_real_texts_stream_exactly(name):
    tok = real_tokenizer(name)
    held_somewhere = False
    for text in TEXTS + ["".join(TEXTS)]:
        ids = tok.encode(text, add_special_tokens=False)
        for chunk in (1, 3):
            deltas = check_stream(tok, ids, chunk=chunk)
            assert "".join(deltas) == text
            held_somewhere |= "" in deltas[:-1]
        with_specials = tok.encode(text) + [tok.eos_token_id]
        for skip in (False, True):
            check_stream(tok, with_specials, skip_special_tokens=skip)
    # the texts do split characters across tokens, so holding back was exercised
    assert held_somewhere


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v3"])
def test_random_sequences_stream_exactly(name):
    tok = real_tokenizer(name)
    rng = random.Random(name)
    fragments = fragment_ids(tok)
    assert fragments, "expected byte-fragment tokens in a byte-level BPE vocabulary"
    specials = [tok.bos_token_id, tok.eos_token_id] + list(range(tok.vocab_size, len(tok)))[:50]
    for _ in range(400):
        ids = []
        for _ in range(rng.randrange(1, 40)):
            roll = rng.random()
            if roll < 0.45:
                ids.append(rng.choice(fragments))
            elif roll < 0.55:
                ids.append(rng.choice(specials))
            else:
                ids.append(rng.randrange(tok.vocab_size))
        for skip in (False, True):
            check_stream(tok, ids, skip_special_tokens=skip, chunk=rng.choice((1, 1, 2, 5)))


def test_sentencepiece_stream(sp_tokenizer):
    tok = sp_tokenizer
    held_somewhere = False
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (False, True):
            deltas = check_stream(tok, ids, skip_special_tokens=skip)
            held_somewhere |= "" in deltas[:-1]
    assert held_somewhere
    rng = random.Random(1)
    byte_ids = [i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))) if t.startswith("<0x")]
    # the bytes of a few multi-byte characters, to build valid and broken sequences from
    char_bytes = [[byte_ids[b] for b in ch.encode("utf-8")] for ch in "你好😀🎉é鑫"]
    for _ in range(400):
        ids = []
        for _ in range(rng.randrange(1, 30)):
            roll = rng.random()
            if roll < 0.3:
                ids.extend(rng.choice(char_bytes))
            elif roll < 0.45:
                ids.append(rng.choice(byte_ids))
            elif roll < 0.55:
                ids.append(rng.choice([0, 1, 2]))
            else:
                ids.append(rng.randrange(len(tok)))
        for skip in (False, True):
            check_stream(tok, ids, skip_special_tokens=skip)


def test_prompt_context(sp_tokenizer):
    tok = sp_tokenizer
    prompt = tok.encode("The quick")
    output = tok.encode("brown fox 你好", add_special_tokens=False)
    # alone, the first word loses its dummy-prefix space; after a prompt it keeps it
    assert "".join(stream(tok, output)) == "brown fox 你好"
    continued = "".join(stream(tok, output, prompt_ids=prompt))
    assert continued == " brown fox 你好"
    assert continued == tok.decode(prompt + output)[len(tok.decode(prompt)):]


def test_prompt_context_byte_level():
    tok = real_tokenizer("deepseek-v3")
    prompt = tok.encode("你好，")
    output = tok.encode("世界 😀!", add_special_tokens=False)
    assert "".join(stream(tok, output, prompt_ids=prompt)) == "世界 😀!"


class CountingTokenizer:
    def __init__(self, inner):
        self.inner = inner
        self.longest = 0
        self.calls = 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        self.calls += 1
        return self.inner.decode(ids, **kwargs)


def test_window_stays_small():
    """Each step decodes a few ids, however long the output grows (O(new tokens) per step)."""
    tok = real_tokenizer("deepseek-v3")
    counting = CountingTokenizer(tok)
    ids = tok.encode("".join(TEXTS) * 40, add_special_tokens=False)
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(counting, prompt_ids=tok.encode("prompt " * 100))
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert counting.longest <= 12, counting.longest
    assert counting.calls <= 2 * len(ids) + 2


def test_invalid_bytes_are_not_held_forever():
    tok = real_tokenizer("deepseek-v3")
    lone = [i for i in fragment_ids(tok, 2000) if tok.decode([i] * 4).count(FFFD) == 4][:1]
    assert lone, "expected a byte token that never completes a character"
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    deltas = [detok.add(lone[0]) for _ in range(200)]
    assert FFFD * 10 in "".join(deltas)  # emitted while still streaming, not at flush
    assert counting.longest <= MAX_HELD_TOKENS + SETTLE_MARGIN + 2
    assert "".join(deltas) + detok.flush() == tok.decode(lone * 200)


def test_add_accepts_lists_and_empty():
    tok = real_tokenizer("deepseek-v3")
    ids = tok.encode("你好 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert detok.add([]) == ""
    assert detok.add(ids) + detok.flush() == "你好 😀"
    assert detok.flush() == ""


# --------------------------------------------------------------------------------------
# StopStringMatcher
# --------------------------------------------------------------------------------------
def reference_stop(text, stops):
    """(text shown, stop) for the whole text at once: the stop that completes first wins."""
    best = None
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[0]):
            best = ((start + len(stop), start), stop)
    if best is None:
        return text, None
    return text[:best[0][1]], best[1]


def run_matcher(stops, deltas):
    matcher = StopStringMatcher(stops)
    shown, hit = [], None
    longest = max([len(s) for s in matcher.stops] or [1])
    for delta in deltas:
        text, hit = matcher.feed(delta)
        shown.append(text)
        # a held tail is always shorter than the longest stop
        assert len(matcher._held) < longest
        if hit:
            break
    if hit is None:
        shown.append(matcher.flush())
    return "".join(shown), hit, shown


def test_stop_basic_and_flush():
    text, hit, shown = run_matcher(["STOP"], ["Hello wor", "ld ST", "OP more"])
    assert (text, hit) == ("Hello world ", "STOP")
    assert shown == ["Hello wor", "ld ", ""]
    text, hit, shown = run_matcher(["STOP"], ["Hello ST", "ATE S", "T"])
    assert (text, hit) == ("Hello STATE ST", None)
    assert shown == ["Hello ", "STATE ", "", "ST"]  # held "ST" only comes out at flush


def test_stop_after_match_and_no_stops():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", "x") and matcher.stopped
    assert matcher.feed("more") == ("", None)
    passthrough = StopStringMatcher([])
    assert passthrough.feed("abc") == ("abc", None) and passthrough.flush() == ""
    assert StopStringMatcher(["", "b"]).feed("abc") == ("a", "b")      # empty stops are ignored
    assert StopStringMatcher("b").feed("abc") == ("a", "b")            # a single string works too


def test_stop_overlapping_and_multiple():
    assert reference_stop("xabcd", ["bcd", "abc"]) == ("x", "abc")      # abc completes first
    assert run_matcher(["bcd", "abc"], list("xabcd"))[:2] == ("x", "abc")
    assert run_matcher(["abcd", "bc"], ["ab", "cd"])[:2] == ("a", "bc")  # bc completes before abcd
    assert run_matcher(["bc", "abc"], ["xab", "c"])[:2] == ("x", "abc")  # same end: the longer wins
    assert run_matcher(["aab"], ["a", "a", "a", "b"])[:2] == ("a", "aab")  # self-overlapping prefix
    assert run_matcher(["\n\nUser:", "</s>", "###"], ["Sure.\n", "\nUs", "er: next"])[:2] == ("Sure.", "\n\nUser:")


def test_stop_unicode():
    assert run_matcher(["。", "结束"], ["你好", "，世界", "。后面"])[:2] == ("你好，世界", "。")
    assert run_matcher(["🛑"], ["go go 🛑 stop"])[:2] == ("go go ", "🛑")
    assert run_matcher(["结束吧"], ["开始", "结", "束", "了"])[:2] == ("开始结束了", None)
    eos = "<｜end▁of▁sentence｜>"
    assert run_matcher([eos], ["a<｜end▁of", "▁sentence｜>b"])[:2] == ("a", eos)


def test_stop_chunking_does_not_matter():
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice("abcé你") for _ in range(rng.randrange(0, 25)))
        stops = ["".join(rng.choice("abcé你") for _ in range(rng.randrange(1, 5)))
                 for _ in range(rng.randrange(1, 4))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 6))))
        deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        shown, hit, _ = run_matcher(stops, deltas)
        assert (shown, hit) == reference_stop(text, stops), (text, stops, deltas)


def test_stop_strings_across_token_boundaries():
    """Stop strings split over several tokens, fed by the detokenizer."""
    tok = real_tokenizer("deepseek-v3")
    text = "Answer: 42.\n\nUser: 下一个问题 😀 END"
    ids = tok.encode(text, add_special_tokens=False)
    for stops, expected in ((["\n\nUser:"], ("Answer: 42.", "\n\nUser:")),
                            (["问题 😀"], ("Answer: 42.\n\nUser: 下一个", "问题 😀")),
                            (["😀 E"], ("Answer: 42.\n\nUser: 下一个问题 ", "😀 E")),
                            (["nope", "ND"], ("Answer: 42.\n\nUser: 下一个问题 😀 E", "ND")),
                            (["never"], (text, None))):
        detok, matcher = IncrementalDetokenizer(tok), StopStringMatcher(stops)
        shown, hit = "", None
        for token_id in ids:
            piece, hit = matcher.feed(detok.add(token_id))
            shown += piece
            if hit:
                break
        if hit is None:
            piece, hit = matcher.feed(detok.flush())
            shown += piece + matcher.flush()
        assert (shown, hit) == expected
