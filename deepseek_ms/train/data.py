"""Corpus -> tokenizer -> token stream -> deterministic batches.

A corpus file holds one paragraph per line (lines starting with '#' are a license
header). The token stream is every paragraph's ids followed by EOS, so the model learns
where a paragraph ends (which is also where generation stops).

Batches are a pure function of (seed, step): the stream is cut into windows of
seq_length + 1 tokens, each epoch visits them in its own seeded permutation, and step t
takes samples [t*B, (t+1)*B) of that endless sequence. Resuming at step t therefore
needs nothing but t.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator, List, Tuple

import numpy as np

logger = logging.getLogger(__name__)

# Plain-ASCII role markers, in the style of DeepSeek's <｜User｜>/<｜Assistant｜> template.
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}")


def read_paragraphs(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path} does not exist (run scripts/prepare_corpus.py)")
    with open(path, encoding="utf-8") as f:
        paras = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not paras:
        raise ValueError(f"corpus file {path} has no text")
    return paras


def train_tokenizer(corpus: str, folder: str, vocab_size: int, model_type: str = "bpe",
                    max_length: int = 4096) -> None:
    """Train a sentencepiece model with byte fallback (any UTF-8 text round-trips) and write
    an HF-style tokenizer folder: tokenizer.model + tokenizer_config.json (chat template)."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    paras = read_paragraphs(corpus)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paras), model_prefix=os.path.join(folder, "tokenizer"),
        vocab_size=vocab_size, model_type=model_type, byte_fallback=True, character_coverage=0.9995,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[USER_TOKEN, ASSISTANT_TOKEN], num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "model_max_length": max_length, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN],
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    logger.info("trained a %d-piece sentencepiece %s tokenizer on %s -> %s", vocab_size, model_type, corpus, folder)


def encode_corpus(tokenizer, path: str) -> np.ndarray:
    """Paragraph ids + EOS each, concatenated: int32 [n_tokens]."""
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for para in read_paragraphs(path):
        ids.extend(tokenizer.encode(para, add_special_tokens=False))
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def windows(stream: np.ndarray, seq_length: int) -> np.ndarray:
    """Non-overlapping windows of seq_length + 1 tokens: [n, seq_length + 1]."""
    n = (len(stream) - 1) // seq_length
    if n < 1:
        raise ValueError(f"a token stream of {len(stream)} tokens is shorter than one window of "
                         f"{seq_length + 1}")
    idx = np.arange(n)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return stream[idx]


class BatchSchedule:
    """Step -> batch of windows, the same for every run with the same seed."""

    def __init__(self, stream: np.ndarray, seq_length: int, batch_size: int, seed: int):
        self.windows = windows(stream, seq_length)
        self.batch_size = batch_size
        self.seed = seed
        self._perm_epoch = -1
        self._perm = None
        if len(self.windows) < batch_size:
            raise ValueError(f"the corpus gives {len(self.windows)} windows of {seq_length + 1} tokens, "
                             f"fewer than batch_size {batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.windows) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> np.ndarray:
        """[B, seq_length + 1] int32; an epoch is steps_per_epoch steps (the remainder is dropped)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        rows = self._order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return self.windows[rows]


def eval_batches(stream: np.ndarray, seq_length: int, batch_size: int) -> Iterator[Tuple[np.ndarray, int]]:
    """All held-out windows in order, in batches; the last batch is padded by repeating
    windows and the int says how many rows are real."""
    w = windows(stream, seq_length)
    for start in range(0, len(w), batch_size):
        rows = w[start:start + batch_size]
        real = len(rows)
        if real < batch_size:
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - real, 0)])
        yield rows, real


def unigram_perplexity(train_stream: np.ndarray, eval_stream: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on train_stream."""
    return unigram_perplexity_from_counts(np.bincount(train_stream, minlength=vocab_size), eval_stream)


def unigram_perplexity_from_counts(counts: np.ndarray, eval_stream: np.ndarray) -> float:
    counts = counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[eval_stream].mean()))
