"""Tokenizer layer: parity with transformers on the real DeepSeek tokenizers,
chat-template semantics, sentencepiece byte-fallback models, errors, speed.

The real tokenizer files come from `python scripts/fetch_test_tokenizers.py`
(into .cache/tokenizers/, or $DEEPSEEK_MS_TOKENIZERS). Without them these tests
skip with that hint, except under CI=true where they fail. transformers is used
here only as the reference implementation.
"""
import functools
import json
import os
import pathlib
import random
import time

import pytest

from deepseek_ms.tokenizer import (
    FastTokenizer, SentencePieceTokenizer, TokenizerError, TokenizerNotFoundError, load_tokenizer,
    render_chat_template,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZERS_DIR = pathlib.Path(os.environ.get("DEEPSEEK_MS_TOKENIZERS") or REPO_ROOT / ".cache" / "tokenizers")
FETCH_HINT = "run `python scripts/fetch_test_tokenizers.py` (or point DEEPSEEK_MS_TOKENIZERS at its output)"
REAL_TOKENIZERS = ["deepseek-v2", "deepseek-v2.5", "deepseek-v3", "deepseek-v3.1", "deepseek-v3.2", "deepseek-r1"]
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(message):
    """Missing test data must not turn CI green by skipping."""
    if IN_CI:
        pytest.fail(message + " (CI=true: failing instead of skipping)")
    pytest.skip(message)


def real_dir(name):
    path = TOKENIZERS_DIR / name
    if not (path / "tokenizer.json").is_file():
        _missing("real tokenizer {} not found in {}: {}".format(name, TOKENIZERS_DIR, FETCH_HINT))
    return path


def transformers_module():
    try:
        import transformers
    except ImportError:
        _missing("transformers is not installed (it comes with the test extra: make setup-test)")
    transformers.logging.set_verbosity_error()
    return transformers


@functools.lru_cache(maxsize=None)
def ours(name):
    return load_tokenizer(real_dir(name))


@functools.lru_cache(maxsize=None)
def reference(name):
    return transformers_module().AutoTokenizer.from_pretrained(str(real_dir(name)))


# --------------------------------------------------------------------------------------
# texts and conversations
# --------------------------------------------------------------------------------------
TEXTS = [
    "", " ", "a", "Hello, world!", "hello world", "  leading spaces", "trailing spaces   ",
    "tabs\tand\t\ttabs", "new\nlines\n\n\nand\r\nCRLF\r", "   \t\n \t\n  ", "\n", "\n\n\n\n", "\t",
    "你好，世界！", "深度求索（DeepSeek）是一家中国的人工智能公司。", "日本語のテキストとカタカナ", "한국어 텍스트입니다",
    "emoji 😀👍🏽🇨🇳👨‍👩‍👧‍👦 mixed", "🤖🦾🧠", "Ünïcödé àccents ñ ß ø", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "zero\u200bwidth\u200djoiner",
    "Arabic مرحبا Hebrew שלום Thai สวัสดี", "Mixed 中文 and English 和 emoji 🎉 in one line.\n第二行\t第三列",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}", "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    '{"key": [1, 2.5, null, true], "nested": {"k": "v"}}', "SELECT * FROM t WHERE a >= 3 -- comment",
    "12345678901234567890", "3.14159 2,718 1e-10 -0.5 0x1F", "$100 @user #tag 50% a&b ~/path/to/file.py",
    "<｜begin▁of▁sentence｜>", "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜>",
    "<｜User｜>hi<｜Assistant｜>yo", "<think>\nreasoning\n</think>\n\nanswer", "</think>", "<think>",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f<｜tool▁call▁end｜>",
    "<|EOT|>", "<｜fim▁begin｜>code<｜fim▁hole｜>more<｜fim▁end｜>", "<｜▁pad▁｜>", "<s></s><unk>",
    "<|im_start|>user<|im_end|>", "almost <｜begin of sentence｜> look-alike", "<｜begin▁of▁sentence",
    "<｜begin▁of▁sentence｜><｜begin▁of▁sentence｜>", "x<｜User｜>y",
    "a" * 1000, "ab" * 500, "的" * 300, " " * 100, "\n" * 50, "\t" * 40, "😀" * 100, "hello " * 200, "-=" * 300,
    "\x00\x01 control \x7f chars", "\ufffd replacement char", "▁▁ sentencepiece marks ▁",
]
# one long multilingual text, built deterministically
LONG_TEXT = "".join(TEXTS[i % len(TEXTS)] + ("\n" if i % 3 else " ") for i in range(400))


def _conversations():
    weather_call = {"type": "function", "function": {"name": "get_weather",
                                                     "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}
    time_call = {"type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"Europe/Paris\"}"}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    return {
        "user": ([{"role": "user", "content": "Hello!"}], {}),
        "system_user": ([{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is 2+2?"}], {}),
        "two_systems": ([{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
                         {"role": "user", "content": "Go."}], {}),
        "multi_turn": ([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Tell me a joke."},
                        {"role": "assistant", "content": "Why did the GPU cross the road?"},
                        {"role": "user", "content": "Why?"}], {}),
        "ends_with_assistant": ([{"role": "user", "content": "Say hi"},
                                 {"role": "assistant", "content": "hi"}], {}),
        "think_in_history": ([{"role": "user", "content": "1+1?"},
                              {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n2"},
                              {"role": "user", "content": "and 2+2?"}], {}),
        "chinese_emoji": ([{"role": "system", "content": "你是一个乐于助人的助手。"},
                           {"role": "user", "content": "讲个笑话 😀\n要短"},
                           {"role": "assistant", "content": "好的！🎉"},
                           {"role": "user", "content": "再来一个\t谢谢"}], {}),
        "look_alikes": ([{"role": "user", "content": "type <｜begin▁of▁sentence｜> and <think> literally"},
                         {"role": "assistant", "content": "ok </think> done"},
                         {"role": "user", "content": "<｜User｜>nested<｜Assistant｜>"}], {}),
        "empty_contents": ([{"role": "system", "content": ""}, {"role": "user", "content": ""}], {}),
        "whitespace": ([{"role": "user", "content": "  spaced \n\n\t tabs  "}], {}),
        "tool_call_flow": ([{"role": "system", "content": "Use tools."},
                            {"role": "user", "content": "Weather in Paris?"},
                            {"role": "assistant", "content": None, "tool_calls": [weather_call]},
                            {"role": "tool", "content": "{\"temp\": 21}"},
                            {"role": "assistant", "content": "It is 21°C."},
                            {"role": "user", "content": "Thanks"}], {"tools": tools}),
        "two_tool_calls": ([{"role": "user", "content": "Weather and time?"},
                            {"role": "assistant", "content": None, "tool_calls": [weather_call, time_call]},
                            {"role": "tool", "content": "{\"temp\": 21}"},
                            {"role": "tool", "content": "{\"time\": \"12:00\"}"}], {}),
        "tool_call_with_content": ([{"role": "user", "content": "Weather?"},
                                    {"role": "assistant", "content": "Let me check.",
                                     "tool_calls": [weather_call]},
                                    {"role": "tool", "content": "sunny"},
                                    {"role": "assistant", "content": "Sunny."}], {}),
        "prefix_assistant": ([{"role": "user", "content": "Write a haiku"},
                              {"role": "assistant", "content": "Autumn", "prefix": True}], {}),
    }


CONVERSATIONS = _conversations()


def _outcome(fn):
    """The result of fn(), or the exception type if it raised (templates may reject a conversation)."""
    try:
        return fn()
    except Exception as exc:  # compared by type between the two implementations
        return type(exc)


# --------------------------------------------------------------------------------------
# parity with transformers on the real DeepSeek tokenizers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_encode_decode_parity(name):
    tok, ref = ours(name), reference(name)
    assert isinstance(tok, FastTokenizer)
    for text in TEXTS + [LONG_TEXT]:
        for add_special in (True, False):
            ids = tok.encode(text, add_special_tokens=add_special)
            assert ids == ref.encode(text, add_special_tokens=add_special), (name, text[:50], add_special)
            for skip in (False, True):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        # byte-level BPE is lossless
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_decode_parity_random_ids(name):
    tok, ref = ours(name), reference(name)
    rng = random.Random(name)
    added = [0, 1, 2] + list(range(tok.vocab_size, len(tok)))
    for _ in range(200):
        ids = [rng.choice(added) if rng.random() < 0.15 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(0, 30))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_attribute_parity(name):
    tok, ref = ours(name), reference(name)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "vocab_size", "all_special_ids", "all_special_tokens",
                 "special_tokens_map", "model_max_length", "chat_template", "add_bos_token", "add_eos_token",
                 "clean_up_tokenization_spaces"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    assert len(tok) == len(ref)
    assert tok.get_vocab() == ref.get_vocab()
    sample = list(range(0, 300)) + list(range(len(tok) - 300, len(tok))) + [len(tok), len(tok) + 7]
    assert tok.convert_ids_to_tokens(sample) == ref.convert_ids_to_tokens(sample)
    assert tok.convert_ids_to_tokens(sample, skip_special_tokens=True) == \
        ref.convert_ids_to_tokens(sample, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(5) == ref.convert_ids_to_tokens(5)
    tokens = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "Hello", "Ġworld", "no-such-token", ""]
    assert tok.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    eos = "<｜end▁of▁sentence｜>"
    assert tok.convert_tokens_to_ids(eos) == ref.convert_tokens_to_ids(eos)


def test_real_tokenizer_basics():
    tok = ours("deepseek-v3")
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.bos_token_id == 0
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.eos_token_id == 1
    assert tok.encode("") == [0]
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0
    # a special token typed as text is the special token, not its spelling
    assert tok.encode("<｜begin▁of▁sentence｜>", add_special_tokens=False) == [0]
    assert tok.decode([0, 1], skip_special_tokens=True) == ""
    assert tok.decode(tok.encode("你好")[1:]) == "你好"
    assert ours("deepseek-v3.2").encode("hi")[0] != 0  # V3.2: add_bos_token is false


@pytest.mark.parametrize("name", [n for n in REAL_TOKENIZERS if n != "deepseek-v3.2"])
def test_chat_template_parity(name):
    tok, ref = ours(name), reference(name)
    rendered_count = 0
    for label, (messages, extra) in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            for thinking in (None, False, True):
                kwargs = dict(extra)
                if thinking is not None:
                    kwargs["thinking"] = thinking
                mine = _outcome(lambda: tok.apply_chat_template(
                    messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs))
                theirs = _outcome(lambda: ref.apply_chat_template(
                    messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs))
                assert mine == theirs, (name, label, add_generation_prompt, thinking)
                if isinstance(theirs, str):
                    rendered_count += 1
                    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **kwargs)
                    assert ids == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          tokenize=True, **kwargs), (name, label)
    assert rendered_count >= 30


def test_chat_template_deepseek_specifics():
    messages = [{"role": "user", "content": "1+1?"}]
    # R1 opens the reasoning block in the generation prompt
    assert ours("deepseek-r1").apply_chat_template(messages).endswith("<｜Assistant｜><think>\n")
    # V3.1 switches between thinking and non-thinking mode
    v31 = ours("deepseek-v3.1")
    assert v31.apply_chat_template(messages, thinking=True).endswith("<｜Assistant｜><think>")
    assert v31.apply_chat_template(messages, thinking=False).endswith("<｜Assistant｜></think>")
    assert v31.apply_chat_template(messages).endswith("<｜Assistant｜></think>")
    v3 = ours("deepseek-v3")
    text = v3.apply_chat_template([{"role": "system", "content": "S"}] + messages)
    assert text == "<｜begin▁of▁sentence｜>S<｜User｜>1+1?<｜Assistant｜>"
    assert v3.apply_chat_template(messages, add_generation_prompt=False).endswith("1+1?")
    ids = v3.apply_chat_template(messages, tokenize=True)
    assert ids[0] == v3.bos_token_id and ids.count(v3.bos_token_id) == 1  # template writes bos, encode doesn't


def test_no_chat_template_is_an_error():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="no chat template"):
        ours("deepseek-v3.2").apply_chat_template(messages)
    with pytest.raises(ValueError):
        reference("deepseek-v3.2").apply_chat_template(messages, tokenize=False)
    # an explicit template still works
    assert ours("deepseek-v3.2").apply_chat_template(
        messages, chat_template="{{ bos_token }}{{ messages[0]['content'] }}") == "<｜begin▁of▁sentence｜>hi"


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v3.1", "deepseek-r1"])
def test_continue_final_message_parity(name):
    tok, ref = ours(name), reference(name)
    for messages in ([{"role": "user", "content": "Write"}, {"role": "assistant", "content": "Once upon"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "trailing  "}]):
        kwargs = dict(add_generation_prompt=False, continue_final_message=True, tokenize=False)
        assert _outcome(lambda: tok.apply_chat_template(messages, **kwargs)) == \
            _outcome(lambda: ref.apply_chat_template(messages, **kwargs))
    with pytest.raises(ValueError, match="not compatible"):
        tok.apply_chat_template(messages, continue_final_message=True)


DROP = object()


def _clone_with_config(name, tmp_path, **changes):
    """A copy of a real tokenizer folder with tokenizer_config.json changed (DROP removes a key)."""
    src = real_dir(name)
    dst = tmp_path / (name + "-variant")
    dst.mkdir()
    os.symlink(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return dst


def test_config_variants_parity(tmp_path):
    """added_tokens_decoder entries, extra special tokens and add_eos_token, as transformers applies them."""
    AutoTokenizer = transformers_module().AutoTokenizer
    variants = {
        "added": dict(
            added_tokens_decoder={
                "128815": {"content": "<my_special>", "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True},
                "128816": {"content": "<my_plain>", "lstrip": False, "normalized": True, "rstrip": False,
                           "single_word": False, "special": False}},
            additional_special_tokens=["<my_special>", "<extra_new>"]),
        "eos": dict(add_eos_token=True, add_bos_token=False),
        "split": dict(split_special_tokens=True),
        "cleanup": dict(clean_up_tokenization_spaces=True),
    }
    texts = ["a <my_special> b <my_plain> c <extra_new>", "Hello , world . isn 't it ?", "<｜User｜>x"] + TEXTS[:20]
    for label, changes in variants.items():
        (tmp_path / label).mkdir()
        folder = _clone_with_config("deepseek-v3", tmp_path / label, **changes)
        tok, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
        assert len(tok) == len(ref) and tok.all_special_ids == ref.all_special_ids, label
        assert tok.special_tokens_map == ref.special_tokens_map, label
        for text in texts:
            ids = tok.encode(text)
            assert ids == ref.encode(text), (label, text)
            assert tok.decode(ids) == ref.decode(ids), (label, text)
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_chat_template_file_and_named_templates(tmp_path):
    AutoTokenizer = transformers_module().AutoTokenizer
    named = [{"name": "default", "template": "D{% for m in messages %}[{{ m.content }}]{% endfor %}"},
             {"name": "tool_use", "template": "T{{ tools | tojson }}{{ messages | length }}"}]
    folder = _clone_with_config("deepseek-v3", tmp_path, chat_template=named)
    tok, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "é<x>"}]
    tools = [{"name": "f", "description": "ü & <b>"}]
    for kwargs in ({}, {"tools": tools}, {"chat_template": "tool_use", "tools": tools}):
        assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == \
            ref.apply_chat_template(messages, tokenize=False, **kwargs)
    (folder / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}{{ eos_token }}\n", encoding="utf-8")
    tok, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template == ref.chat_template
    assert tok.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


# --------------------------------------------------------------------------------------
# chat-template engine semantics, against transformers' renderer
# --------------------------------------------------------------------------------------
TEMPLATE_CASES = [
    # trim_blocks / lstrip_blocks
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n  U: {{ m.content }}\n    {% endif %}\n{% endfor %}\n",
    "{%- for m in messages -%}  {{ m.role }}|{{ m['content'] }}  {%- endfor -%}",
    "{{ messages | tojson }}", "{{ messages[0] | tojson(indent=2) }}",
    "{{ {'b': 1, 'a': '<é>'} | tojson(sort_keys=True, separators=(',', ':')) }}",
    "{{ tools | tojson }}|{{ documents }}|{{ add_generation_prompt }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}",
    "{{ bos_token }}{% if thinking is defined and thinking %}T{% endif %}{{ custom | default('none') }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ messages[0].content.split(' ')[-1] | upper }}{{ '%05d' | format(7) }}",
    "{% if messages[0]['missing'] is not defined %}undefined-ok{% endif %}",
    "{{ raise_exception('boom: ' + messages[0].role) }}",
    "{{ messages.__class__ }}",
    "{{ messages.append(1) }}",
    "{{ strftime_now('%Y') | length }}",
]


@pytest.mark.parametrize("index", range(len(TEMPLATE_CASES)))
def test_template_engine_parity(index):
    transformers_module()
    from transformers.utils.chat_template_utils import render_jinja_template
    template = TEMPLATE_CASES[index]
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there <b>&</b>"}]
    variables = {"bos_token": "<s>", "thinking": True}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": False, "tools": tools}):
        mine = _outcome(lambda: render_chat_template(template, messages, **kwargs, **variables))
        theirs = _outcome(lambda: render_jinja_template([messages], chat_template=template, **kwargs,
                                                        **variables)[0][0])
        assert mine == theirs, template


def test_template_errors_are_clear():
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}", [])
    with pytest.raises(TokenizerError, match="does not compile"):
        render_chat_template("{% if %}", [])
    with pytest.raises(TypeError, match="tools"):
        render_chat_template("x", [], tools=[lambda: None])


# --------------------------------------------------------------------------------------
# sentencepiece byte-fallback models (trained here)
# --------------------------------------------------------------------------------------
SP_CORPUS = ("The quick brown fox jumps over the lazy dog. Streaming tokens one by one.\n"
             "def add(a, b):\n    return a + b  # code\n"
             "机器学习是人工智能的一个分支。深度学习模型需要大量数据。\n"
             "Incremental decoding keeps multi-byte characters whole.\n") * 30
SP_TEXTS = ["", "hello world", "The quick brown fox", "你好 😀 hello  x", "机器学习是人工智能",
            "  leading and trailing  ", "a\tb\n\nc", "<s>hi</s> there <unk>", "Hello <s>.", "</s>",
            "emoji 🎉🎉 and rare 鑫龘 chars", "x" * 300, "深度学习" * 20, "🤖 at the start", "\n\n", " "]


def train_sentencepiece(folder, model_type="unigram", config=None):
    import sentencepiece
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS.splitlines()), model_prefix=str(folder / "tokenizer"),
        vocab_size=400, model_type=model_type, byte_fallback=True, character_coverage=0.9995,
        hard_vocab_limit=False, minloglevel=2)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


LLAMA_CONFIG = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                "add_eos_token": False, "clean_up_tokenization_spaces": False}


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def sp_folder(request, tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp-" + request.param), request.param, LLAMA_CONFIG)


def test_sentencepiece_basics(sp_folder):
    tok = load_tokenizer(sp_folder)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.pad_token_id is None and tok.chat_template is None
    assert tok.vocab_size == len(tok) and tok.all_special_ids == [1, 2, 0]
    ids = tok.encode("你好 😀")
    assert ids[0] == tok.bos_token_id
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids)), "expected byte-fallback pieces"
    for text in ["hello world", "你好 😀 hello x", "机器学习是人工智能", "🤖 at the start"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode("<s>", add_special_tokens=False) == [1]
    assert tok.decode([1, 2]) == "<s></s>" and tok.decode([1, 2], skip_special_tokens=True) == ""
    assert tok.convert_tokens_to_ids(["<s>", "no-such-piece"]) == [1, 0]


def test_sentencepiece_parity_with_transformers(sp_folder):
    """Encoding is sentencepiece's own, as in transformers' (slow) LlamaTokenizer; decoding
    follows the fast LlamaTokenizer converted from the same model (and the slow one when
    special tokens are skipped: its legacy decode puts spaces around special tokens)."""
    AutoTokenizer = transformers_module().AutoTokenizer
    tok = load_tokenizer(sp_folder)
    slow = AutoTokenizer.from_pretrained(str(sp_folder), use_fast=False)
    fast = AutoTokenizer.from_pretrained(str(sp_folder))
    assert (tok.vocab_size, len(tok), tok.all_special_ids) == (slow.vocab_size, len(slow), slow.all_special_ids)
    rng = random.Random(0)
    is_byte = [t.startswith("<0x") for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    for text in SP_TEXTS:
        for add_special in (True, False):
            ids = tok.encode(text, add_special_tokens=add_special)
            assert ids == slow.encode(text, add_special_tokens=add_special), text
            # the ids of real text plus special tokens at random places, but not inside the bytes
            # of one character (see test_sentencepiece_invalid_bytes)
            mixed = list(ids)
            for _ in range(2):
                places = [i for i in range(len(mixed) + 1)
                          if not (0 < i < len(mixed) and is_byte[mixed[i - 1]] and is_byte[mixed[i]])]
                mixed.insert(rng.choice(places), rng.choice([0, 1, 2]))
            for seq in (ids, mixed):
                assert tok.decode(seq) == fast.decode(seq), (text, seq)
                assert tok.decode(seq, skip_special_tokens=True) == fast.decode(seq, skip_special_tokens=True)
                assert tok.decode(seq, skip_special_tokens=True) == slow.decode(seq, skip_special_tokens=True)
    sample = list(range(len(tok)))
    assert tok.convert_ids_to_tokens(sample) == slow.convert_ids_to_tokens(sample)


def test_sentencepiece_invalid_bytes(sp_folder):
    """Invalid UTF-8 from byte pieces decodes like Python's errors="replace" (one U+FFFD per
    maximal invalid subsequence), so that valid characters before it survive and streaming
    decode agrees with whole decode. (The Rust ByteFallback decoder of the converted fast
    tokenizer would turn the whole byte run into U+FFFDs instead.)"""
    tok = load_tokenizer(sp_folder)
    byte = {int(t[3:5], 16): i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))
            if t.startswith("<0x")}
    ni = [byte[b] for b in "你".encode("utf-8")]
    assert tok.decode(ni) == "你"
    assert tok.decode(ni + [byte[0x80]]) == "你\ufffd"
    assert tok.decode(ni[:2]) == "\ufffd"
    assert tok.decode(ni[:2] + [1] + ni[2:]) == "\ufffd<s>\ufffd"
    assert tok.decode(ni[:2] + [1] + ni[2:], skip_special_tokens=True) == "你"


def test_sentencepiece_added_tokens_and_chat(tmp_path):
    import sentencepiece
    folder = train_sentencepiece(tmp_path / "sp", "bpe")
    base = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).GetPieceSize()
    config = dict(LLAMA_CONFIG, add_eos_token=True, pad_token="<pad>",
                  added_tokens_decoder={str(base): {"content": "<|user|>", "special": True},
                                        str(base + 1): {"content": "<tool>", "special": False}},
                  chat_template="{{ bos_token }}{% for m in messages %}<|user|>{{ m.content }}{% endfor %}"
                                "{% if add_generation_prompt %}<tool>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(folder)
    assert tok.vocab_size == base
    assert tok.convert_tokens_to_ids(["<|user|>", "<tool>", "<pad>"]) == [base, base + 1, base + 2]
    assert tok.pad_token_id == base + 2 and len(tok) == base + 3
    assert tok.all_special_ids == [1, 2, 0, base + 2]
    ids = tok.encode("hi<|user|>there<tool>")
    assert ids[0] == 1 and ids[-1] == 2 and base in ids and base + 1 in ids
    assert tok.decode(ids) == "<s> hi<|user|> there<tool></s>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi there<tool>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "yo"}])
    assert prompt == "<s><|user|>yo<tool>"
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}], tokenize=True) == \
        tok.encode(prompt, add_special_tokens=False)


def test_sentencepiece_without_config(tmp_path):
    tok = load_tokenizer(train_sentencepiece(tmp_path / "bare"))
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert tok.encode("hi")[0] == 1


def test_runtime_never_imports_transformers(tmp_path):
    """Loading, encoding, rendering and streaming use tokenizers/sentencepiece/jinja2 only."""
    import subprocess
    import sys
    config = dict(LLAMA_CONFIG, chat_template="{{ bos_token }}{{ messages[0]['content'] | tojson }}")
    folder = train_sentencepiece(tmp_path / "sp", "bpe", config)
    probe = (
        "import sys\n"
        "from deepseek_ms.tokenizer import load_tokenizer\n"
        "from deepseek_ms.detokenizer import IncrementalDetokenizer, StopStringMatcher\n"
        "for folder in sys.argv[1:]:\n"
        "    tok = load_tokenizer(folder)\n"
        "    ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=True,\n"
        "                                  chat_template='{{ messages[0].content }}')\n"
        "    d = IncrementalDetokenizer(tok)\n"
        "    StopStringMatcher(['x']).feed(''.join(d.add(i) for i in ids) + d.flush())\n"
        "bad = [m for m in ('transformers', 'mindformers', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    folders = [str(folder)]
    if (TOKENIZERS_DIR / "deepseek-v3" / "tokenizer.json").is_file():
        folders.append(str(TOKENIZERS_DIR / "deepseek-v3"))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", probe] + folders, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerNotFoundError) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(info.value) and "tokenizer.model" in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("content, message", [
    ("{\"add_bos_token\": true,,}", "malformed .*tokenizer_config.json.*line 1"),
    ("[1, 2]", "malformed .*tokenizer_config.json.*JSON object"),
    ("{\"add_bos_token\": \"yes\"}", "tokenizer_config.json.*add_bos_token"),
    ("{\"bos_token\": 5}", "tokenizer_config.json.*bos_token"),
    ("{\"chat_template\": 3}", "tokenizer_config.json.*chat_template"),
    ("{\"added_tokens_decoder\": {\"x\": \"<a>\"}}", "tokenizer_config.json.*added_tokens_decoder"),
    ("{\"model_max_length\": \"long\"}", "tokenizer_config.json.*model_max_length"),
])
def test_malformed_config(tmp_path, content, message):
    folder = train_sentencepiece(tmp_path / "sp")
    (folder / "tokenizer_config.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(folder)


def test_malformed_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{\"model\": 1}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    other = tmp_path / "sp"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(other)


def test_add_bos_without_bos_token(tmp_path):
    folder = _clone_with_config("deepseek-v3", tmp_path, bos_token=None)
    with pytest.raises(TokenizerError, match="add_bos_token"):
        load_tokenizer(folder)
    with pytest.raises(ValueError):
        transformers_module().AutoTokenizer.from_pretrained(str(folder))


def test_llama_class_default_special_tokens(tmp_path):
    """Without bos/eos keys a Llama-class tokenizer falls back to <s>/</s>, added as new tokens."""
    folder = _clone_with_config("deepseek-v3", tmp_path, bos_token=DROP, eos_token=DROP, pad_token=DROP)
    tok, ref = load_tokenizer(folder), transformers_module().AutoTokenizer.from_pretrained(str(folder))
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", None) == \
        (ref.bos_token, ref.eos_token, ref.unk_token)
    assert len(tok) == len(ref) and tok.all_special_ids == ref.all_special_ids
    for text in ["hi <s> there </s>", "<｜begin▁of▁sentence｜>x"]:
        assert tok.encode(text) == ref.encode(text)


# --------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------
def test_load_and_encode_speed():
    """Loading V3 is the Rust tokenizers' parse of tokenizer.json (~0.5 s of CPU here); we add
    next to nothing. CPU time is asserted so that a busy machine does not fail the test."""
    folder = real_dir("deepseek-v3")
    cpu, wall = [], []
    for _ in range(3):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        tok = load_tokenizer(folder)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    assert min(cpu) < 1.0, (cpu, wall)
    text = LONG_TEXT * 4
    start = time.process_time()
    ids = tok.encode(text)
    elapsed = time.process_time() - start
    assert len(ids) > 10000
    assert elapsed < 1.0, (len(text), len(ids), elapsed)
