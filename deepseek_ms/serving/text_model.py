"""Give a model folder without tokenizer files a tokenizer and a chat template, so it can be
served as text (the tiny random fixture model, until a trained default model exists).

`ensure_text_model(folder)` returns `folder` itself when it already has a tokenizer; otherwise
it builds (once, cached under `.cache/serve_models/`) a folder with the same config and
weights (symlinked) plus a byte-fallback sentencepiece tokenizer of exactly the model's
vocabulary size, trained on a small built-in corpus, and a chat template. The text a random
model produces is gibberish, but every byte of the serving path is real.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.path.join(REPO_ROOT, ".cache", "serve_models")

# Plain role-tagged turns.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# DeepSeek-R1 style: the generation prompt opens the reasoning block, so the model's output is
# "reasoning</think>answer".
REASONING_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
TEMPLATES = {"plain": PLAIN_TEMPLATE, "reasoning": REASONING_TEMPLATE}

_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                     "add_eos_token": False, "clean_up_tokenization_spaces": False}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_BUILD_VERSION = 1


def _corpus():
    lines = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
             "def add(a, b):\n    return a + b", "<think>\nLet me think step by step.\n</think>",
             "机器学习是人工智能的一个分支。", "Streaming tokens one by one keeps the reply responsive."]
    words = " ".join(f"w{i}x{i * 7 % 13}" for i in range(400))  # enough distinct pieces for any small vocab
    return lines * 30 + [words] * 3


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES)


def ensure_text_model(folder: str, template: str = "plain", cache_dir: str = DEFAULT_CACHE) -> str:
    """`folder` if it has a tokenizer, else the cached text-capable copy (built on first use)."""
    if has_tokenizer(folder):
        return folder
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has no config.json")
    with open(config_path, "rb") as f:
        config_bytes = f.read()
    vocab_size = int(json.loads(config_bytes)["vocab_size"])
    key = hashlib.sha256(config_bytes + os.path.abspath(folder).encode()
                         + f"{template}-{_BUILD_VERSION}".encode()).hexdigest()[:12]
    target = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(folder))}-{template}-{key}")
    if has_tokenizer(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
    try:
        _build(folder, staging, vocab_size, TEMPLATES[template])
        try:
            os.rename(staging, target)
        except OSError:  # built concurrently by another process: theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("built a text-capable copy of %s at %s", folder, target)
    return target


def _build(source: str, out: str, vocab_size: int, chat_template: str) -> None:
    import sentencepiece

    for name in os.listdir(source):
        if name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json", ".ckpt")):
            os.symlink(os.path.abspath(os.path.join(source, name)), os.path.join(out, name))
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=os.path.join(out, "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, minloglevel=2)
    os.remove(os.path.join(out, "tokenizer.vocab"))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(_TOKENIZER_CONFIG, chat_template=chat_template), f, indent=1)
