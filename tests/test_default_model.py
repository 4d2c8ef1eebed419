"""The committed default model (models/deepseek-ms-tiny): size, HF interop, held-out
perplexity against the unigram baseline, tokenizer and chat template, and that `serve` uses it.
"""
import hashlib
import json
import os

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO_ROOT, "models", "deepseek-ms-tiny")
HELDOUT = os.path.join(REPO_ROOT, "tests", "fixtures", "corpus", "heldout.txt")
TRAIN_COUNTS = os.path.join(REPO_ROOT, "tests", "fixtures", "corpus", "train_token_counts.npy")
HF_GOLDEN = os.path.join(REPO_ROOT, "tests", "fixtures", "default_model_hf_logits.npz")
MAX_BYTES = 25 * 1024 * 1024
WINDOW = 128  # the training sequence length (yaml/train_tiny.yaml)


@pytest.fixture(scope="module")
def model():
    import deepseek_ms
    return deepseek_ms.load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    from deepseek_ms.tokenizer import load_tokenizer
    return load_tokenizer(MODEL_DIR)


def test_folder_is_a_complete_hf_model_within_25_mb():
    names = set(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= names
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names)
    assert total <= MAX_BYTES, total
    with open(os.path.join(MODEL_DIR, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    # the DeepSeek-V3 architecture: MLA, shared + routed experts, noaux_tc routing, one MTP layer
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["q_lora_rank"] and cfg["kv_lora_rank"]
    assert cfg["n_shared_experts"] >= 1 and cfg["n_routed_experts"] > cfg["num_experts_per_tok"]
    assert cfg["topk_method"] == "noaux_tc" and cfg["num_nextn_predict_layers"] == 1


def test_serve_defaults_to_it():
    from deepseek_ms import cli
    assert os.path.realpath(cli.DEFAULT_MODEL) == os.path.realpath(MODEL_DIR)


def test_logits_match_hf_transformers(model):
    """Golden from scripts/make_reference_fixtures.py --default-model (transformers 4.57.1)."""
    golden = np.load(HF_GOLDEN)
    with open(os.path.join(MODEL_DIR, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert str(golden["safetensors_sha256"]) == digest, "golden was made from another model.safetensors"
    ours = model.logits(golden["input_ids"])
    assert ours.shape == golden["logits"].shape
    np.testing.assert_allclose(ours, golden["logits"], rtol=0, atol=1e-4)


def test_held_out_perplexity_is_5x_below_unigram(model, tokenizer):
    from deepseek_ms.train.data import encode_corpus, unigram_perplexity_from_counts, windows

    stream = encode_corpus(tokenizer, HELDOUT)
    w = windows(stream, WINDOW)
    nll, count = 0.0, 0
    for start in range(0, len(w), 16):
        batch = w[start:start + 16]
        logits = model.logits(batch[:, :-1]).astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)
        nll -= np.take_along_axis(logp, batch[:, 1:, None], -1).sum()
        count += batch[:, 1:].size
    ppl = float(np.exp(nll / count))
    unigram = unigram_perplexity_from_counts(np.load(TRAIN_COUNTS), stream[1:len(w) * WINDOW + 1])
    assert ppl * 5 <= unigram, (ppl, unigram)


def test_tokenizer_round_trips_and_chat_template_renders(tokenizer):
    text = "Lists are mutable sequences. Émile wrote 42 ünïcode lines: ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text  # byte fallback covers characters the corpus lacks
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>Be brief.\n<|User|>What is a list?<|Assistant|>"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[-1:]) == ["<|Assistant|>"]


def test_it_writes_english(model, tokenizer):
    prompt = tokenizer.encode("The list data type has some more methods.")
    out = model.generate(np.array([prompt]), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
    words = [w.strip(".,:;()'\"") for w in text.split()]
    assert len(words) >= 8, text
    # mostly real words: alphabetic tokens that occur in the held-out documentation text
    with open(HELDOUT, encoding="utf-8") as f:
        vocabulary = set(f.read().lower().split())
    known = [w for w in words if w.isalpha() and w.lower() in vocabulary]
    assert len(known) >= 0.6 * len(words), text
