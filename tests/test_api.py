"""The public API and CLI: load_model / logits / generate, dtypes and input errors."""
import numpy as np
import pytest

import deepseek_ms
from helpers import fixture_dir, load_fixture_model

NAME = "deepseek_v3_tiny"


def _golden():
    return np.load(fixture_dir(NAME) / "golden.npz")


def test_cli_generate_prints_greedy_ids(capsys):
    from deepseek_ms.cli import main

    g = _golden()
    prompt = ",".join(str(int(t)) for t in g["input_ids"][0])
    assert main(["generate", "--model", str(fixture_dir(NAME)), "--prompt-ids", prompt,
                 "--max-new-tokens", "20"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert [int(t) for t in printed.split(",")] == g["greedy_ids"][0].tolist()


def test_cli_reports_bad_model_folder(tmp_path, caplog):
    from deepseek_ms.cli import main

    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1,2"]) == 2
    assert "not found" in caplog.text


@pytest.mark.parametrize("ids, match", [
    (np.zeros((1, 2, 3), np.int64), "batch, seq_len"),
    (np.array([[0, 1, 10 ** 6]]), "out of range"),
    (np.array([[-1, 2]]), "out of range"),
    (np.array([[0.5, 1.0]]), "integers"),
    (np.zeros((1, 0), np.int64), "non-empty"),
])
def test_bad_input_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        load_fixture_model(NAME).logits(ids)


def test_too_long_and_bad_max_new_tokens():
    model = load_fixture_model(NAME)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(np.zeros((1, 4), np.int64), max_new_tokens=model.max_seq_len)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(np.zeros((1, 4), np.int64), max_new_tokens=0)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    g = _golden()
    model = load_fixture_model(NAME)
    a = model.generate(g["input_ids"], max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    b = model.generate(g["input_ids"], max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    np.testing.assert_array_equal(a, b)
    greedy = model.generate(g["input_ids"], max_new_tokens=8, do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(greedy, g["greedy_ids"][:, :g["input_ids"].shape[1] + 8])


def test_eos_stops_rows():
    g = _golden()
    model = load_fixture_model(NAME)
    S = g["input_ids"].shape[1]
    eos = int(g["greedy_ids"][0, S + 2])  # row 0 emits this as its 3rd token
    out = model.generate(g["input_ids"], max_new_tokens=10, eos_token_id=eos)
    assert (out[0, S + 2:] == eos).all()
    np.testing.assert_array_equal(out[0, :S + 3], g["greedy_ids"][0, :S + 3])


def test_fp16_compute_runs_on_cpu():
    g = _golden()
    model = deepseek_ms.load_model(str(fixture_dir(NAME)), progress=False,
                                   overrides={"compute_dtype": "float16", "param_dtype": "float16"})
    logits = model.logits(g["input_ids"])
    assert logits.dtype == np.float32
    assert np.abs(logits - g["logits"]).max() < 0.1
    assert (logits.argmax(-1) == g["logits"].argmax(-1)).mean() > 0.9


def test_bf16_compute_is_refused_on_cpu():
    with pytest.raises(ValueError, match="bfloat16"):
        deepseek_ms.load_model(str(fixture_dir(NAME)), progress=False, overrides={"compute_dtype": "bfloat16"})


def test_kernel_choice_from_yaml_cli_and_argument(tmp_path, capsys):
    """kernels: a predict YAML's model.model_config.kernels picks MindSpore's ops or the native
    CPU kernels; an explicit argument wins over the YAML; the CLI's --kernels reaches the model
    and greedy output is the same either way."""
    import yaml

    from deepseek_ms.backend import native_kernels
    from deepseek_ms.cli import REPO_ROOT, main

    if native_kernels("auto") is None:
        pytest.skip("no C++ compiler: the native kernels are unavailable")
    with open(f"{REPO_ROOT}/yaml/predict_deepseek_v3_tiny.yaml", encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    doc["pretrained_model_dir"] = str(fixture_dir(NAME))
    doc["model"]["model_config"]["kernels"] = "mindspore"
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert deepseek_ms.load_model(str(path), progress=False).net.lm_head.native_linear is None
    assert deepseek_ms.load_model(str(path), progress=False, kernels="auto").net.lm_head.native_linear is not None

    g = _golden()
    prompt = ",".join(str(int(t)) for t in g["input_ids"][0])
    for choice in ("mindspore", "auto"):
        assert main(["generate", "--model", str(fixture_dir(NAME)), "--prompt-ids", prompt,
                     "--max-new-tokens", "8", "--kernels", choice]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        assert [int(t) for t in printed.split(",")] == g["greedy_ids"][0][:len(g["input_ids"][0]) + 8].tolist()
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(fixture_dir(NAME)), "--prompt-ids", prompt, "--kernels", "fast"])
