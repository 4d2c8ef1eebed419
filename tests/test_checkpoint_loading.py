"""Loading real-format HF folders: sharded/bf16/fp16/fp32, MindSpore export, and every
bad-checkpoint error naming the file and tensor."""
import json
import shutil

import numpy as np
import pytest

import deepseek_ms
from deepseek_ms.checkpoint import CheckpointError, SafetensorsFile, write_safetensors
from deepseek_ms.config import ConfigError
from helpers import fixture_dir, load_fixture_model

SOURCE = "deepseek_v2_lite_tiny"  # single fp32 model.safetensors


def _tensors(path):
    with SafetensorsFile(str(path)) as f:
        return {k: f.get(k, dtype=None) for k in f.keys()}, {k: f.dtype(k) for k in f.keys()}


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(fixture_dir(SOURCE), dst)
    (dst / "golden.npz").unlink()
    return dst


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors, dtypes = _tensors(path)
    edit(tensors, dtypes)
    write_safetensors(str(path), tensors, dtypes={k: v for k, v in dtypes.items() if k in tensors})
    return path


def _load_error(folder):
    with pytest.raises(CheckpointError) as e:
        deepseek_ms.load_model(str(folder), progress=False)
    return str(e.value)


def test_missing_tensor(model_copy):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(model_copy, lambda t, d: t.pop(name))
    msg = _load_error(model_copy)
    assert "missing tensor" in msg and name in msg


def test_unexpected_tensor(model_copy):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(model_copy, lambda t, d: t.__setitem__(name, np.ones(4, np.float32)))
    msg = _load_error(model_copy)
    assert "unexpected tensor" in msg and name in msg and "model.safetensors" in msg


def test_wrong_shape(model_copy):
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    _rewrite(model_copy, lambda t, d: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
    msg = _load_error(model_copy)
    assert name in msg and "shape" in msg and "model.safetensors" in msg


def test_wrong_dtype(model_copy):
    name = "model.norm.weight"

    def to_int(t, d):
        t[name] = t[name].astype(np.int32)
        d[name] = "I32"
    _rewrite(model_copy, to_int)
    msg = _load_error(model_copy)
    assert name in msg and "I32" in msg


def test_fp8_tensor_without_quantization_config(model_copy):
    name = "model.layers.0.self_attn.o_proj.weight"

    def to_fp8(t, d):
        d[name] = "F8_E4M3"
        t[name] = np.clip(t[name], -1, 1).astype(np.float32)
    _rewrite(model_copy, to_fp8)
    msg = _load_error(model_copy)
    assert name in msg and "quantization_config" in msg


def test_truncated_file(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    msg = _load_error(model_copy)
    assert "model.safetensors" in msg and "truncated" in msg


def test_corrupt_header(model_copy):
    path = model_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#corrupted!!"
    path.write_bytes(bytes(data))
    msg = _load_error(model_copy)
    assert "model.safetensors" in msg


def test_unknown_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "qwen2_moe"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        deepseek_ms.load_model(str(model_copy), progress=False)
    assert "model_type" in str(e.value) and "qwen2_moe" in str(e.value) and "config.json" in str(e.value)


def test_config_and_weights_mismatch(model_copy):
    """A config.json from a different size of model: the first differing tensor is named."""
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["moe_intermediate_size"] *= 2
    (model_copy / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(model_copy)
    assert "mlp.experts" in msg and "shape" in msg


def test_sharded_index_missing_shard(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(fixture_dir("deepseek_v3_tiny"), dst)
    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert len(shards) >= 2, "the v3 fixture is sharded with an index"
    (dst / shards[-1]).unlink()
    msg = _load_error(dst)
    assert shards[-1] in msg


def test_mindspore_checkpoint_round_trip_is_bit_exact(tmp_path):
    from deepseek_ms.cli import main

    src = fixture_dir("deepseek_v3_tiny")
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(src), "--output", str(out)]) == 0
    assert (out / "model.ckpt").is_file() and (out / "config.json").is_file()
    original = load_fixture_model("deepseek_v3_tiny")
    reloaded = deepseek_ms.load_model(str(out), progress=False)
    theirs = dict(reloaded.net.parameters_and_names())
    for name, param in original.net.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), theirs[name].asnumpy(), err_msg=name)
        assert theirs[name].dtype == param.dtype, name  # bf16 storage survives the round trip
    ids = np.load(src / "golden.npz")["input_ids"]
    np.testing.assert_array_equal(reloaded.logits(ids), original.logits(ids))


def test_bf16_and_fp16_fixtures_keep_their_values():
    """The v3 fixture is stored bf16 and v2 fp16; loading widens them exactly to fp32."""
    from deepseek_ms.checkpoint import CheckpointReader

    for name, dtype in (("deepseek_v3_tiny", "BF16"), ("deepseek_v2_tiny", "F16")):
        model = load_fixture_model(name)
        params = dict(model.net.parameters_and_names())
        with CheckpointReader(str(fixture_dir(name))) as reader:
            tensor = "model.layers.0.self_attn.o_proj.weight"
            assert reader.dtype(tensor) == dtype
            np.testing.assert_array_equal(params[tensor].asnumpy(), reader.read(tensor))
