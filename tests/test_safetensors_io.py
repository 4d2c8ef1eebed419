"""Unit tests for deepseek_ms.checkpoint.safetensors_io (pure numpy, no torch/mindspore)."""
import json
import math
import os
import struct

import numpy as np
import pytest

from deepseek_ms.checkpoint import (
    E4M3_LUT,
    E8M0_LUT,
    CheckpointError,
    CheckpointReader,
    SafetensorsFile,
    bf16_to_float32,
    dequantize_fp8_blocks,
    e4m3_to_float32,
    float32_to_bf16,
    float32_to_e4m3,
    float32_to_e8m0,
    fp8_block_quantize,
    write_safetensors,
)
from deepseek_ms.checkpoint import safetensors_io as sio


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _raw_file(path, header, data=b"", header_len=None):
    """Write a safetensors file by hand, for malformed-file tests."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if header_len is None else header_len))
        f.write(hb)
        f.write(data)
    return str(path)


def _naive_dequant(codes, scale, block):
    """Element-by-element reference: value(code) * scale[row // bo, col // bi]."""
    rows, cols = codes.shape
    out = np.empty((rows, cols), np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = np.float32(E4M3_LUT[codes[r, c]]) * np.float32(
                scale[r // block[0], c // block[1]])
    return out


def _assert_error(exc_info, *fragments):
    msg = str(exc_info.value)
    for frag in fragments:
        assert frag in msg, "%r not in error message %r" % (frag, msg)


# ---------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------

def test_e4m3_lut_hand_values():
    expected = {
        0x00: 0.0,
        0x01: 2.0 ** -9,           # smallest subnormal
        0x04: 4 * 2.0 ** -9,
        0x07: 7 * 2.0 ** -9,       # largest subnormal
        0x08: 2.0 ** -6,           # smallest normal
        0x30: 0.5,
        0x38: 1.0,
        0x39: 1.125,
        0x3C: 1.5,
        0x40: 2.0,
        0x77: 240.0,               # 2**7 * 1.875
        0x78: 256.0,
        0x7E: 448.0,               # largest finite
        0xB8: -1.0,
        0xFE: -448.0,
        0x81: -(2.0 ** -9),
    }
    for code, value in expected.items():
        assert E4M3_LUT[code] == np.float32(value), hex(code)
    assert E4M3_LUT[0x80] == 0.0 and np.signbit(E4M3_LUT[0x80])
    assert not np.signbit(E4M3_LUT[0x00])
    nan_codes = np.flatnonzero(np.isnan(E4M3_LUT))
    assert nan_codes.tolist() == [0x7F, 0xFF]
    assert E4M3_LUT.dtype == np.float32
    # no infinities; positive half strictly increasing; negative half mirrors it
    assert not np.isinf(E4M3_LUT).any()
    assert np.all(np.diff(E4M3_LUT[:0x7F]) > 0)
    np.testing.assert_array_equal(E4M3_LUT[0x80:0xFF], -E4M3_LUT[:0x7F])


def test_e4m3_encode_roundtrip_ties_and_saturation():
    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], np.uint8)
    np.testing.assert_array_equal(float32_to_e4m3(E4M3_LUT[codes]), codes)
    cases = {
        1.0 + 1 / 16: 0x38,        # tie between 1.0 (even) and 1.125
        1.0 + 3 / 16: 0x3A,        # tie between 1.125 and 1.25 (even)
        1.0 + 1 / 16 + 1e-3: 0x39,
        2.0 ** -10: 0x00,          # half the smallest subnormal -> even (0)
        3 * 2.0 ** -10: 0x02,      # tie between codes 1 and 2 -> 2
        15 * 2.0 ** -10: 0x08,     # tie between the largest subnormal and the smallest normal
        460.0: 0x7E,
        1000.0: 0x7E,
        -1e9: 0xFE,
        np.inf: 0x7E,
        -np.inf: 0xFE,
        -0.0: 0x80,
    }
    got = float32_to_e4m3(np.array(list(cases), np.float32))
    assert [hex(c) for c in got] == [hex(c) for c in cases.values()]
    assert float32_to_e4m3(np.array([np.nan]))[0] & 0x7F == 0x7F


def test_bf16_decode_known_values():
    bits = np.array([0x0000, 0x8000, 0x3F80, 0xC000, 0x4049, 0x7F80, 0xFF80, 0x0001, 0x7F7F,
                     0x3C00], np.uint16)
    got = bf16_to_float32(bits)
    assert got.dtype == np.float32
    expected = [0.0, -0.0, 1.0, -2.0, 3.140625, np.inf, -np.inf, 2.0 ** -133,
                (2 - 2.0 ** -7) * 2.0 ** 127, 2.0 ** -7]
    np.testing.assert_array_equal(got, np.array(expected, np.float32))
    assert np.signbit(got[1])
    assert np.isnan(bf16_to_float32(np.array([0x7FC0], np.uint16)))[0]


def test_bf16_encode_rounding():
    one_ulp = 2.0 ** -7
    cases = {
        1.0: 0x3F80,
        1.0 + one_ulp / 2: 0x3F80,                # tie -> even
        1.0 + 3 * one_ulp / 2: 0x3F82,            # tie -> even (up)
        1.0 + one_ulp / 2 + 2.0 ** -20: 0x3F81,   # just above the tie
        -2.0: 0xC000,
        np.inf: 0x7F80,
        float(np.finfo(np.float32).max): 0x7F80,  # rounds past the largest bf16
        -0.0: 0x8000,
    }
    got = float32_to_bf16(np.array(list(cases), np.float32))
    assert [hex(c) for c in got] == [hex(c) for c in cases.values()]
    # NaN must stay NaN even when its payload sits only in the dropped low bits
    nan_low = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(bf16_to_float32(float32_to_bf16(nan_low)))[0]
    # every bf16 value survives decode -> encode
    all_bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    decoded = bf16_to_float32(all_bits)
    finite = ~np.isnan(decoded)
    np.testing.assert_array_equal(float32_to_bf16(decoded)[finite], all_bits[finite])


def test_e8m0_lut_and_encode():
    assert E8M0_LUT[127] == 1.0
    assert E8M0_LUT[128] == 2.0
    assert E8M0_LUT[120] == 2.0 ** -7
    assert E8M0_LUT[0] == np.float32(2.0 ** -127)
    assert E8M0_LUT[254] == np.float32(2.0 ** 127)
    assert np.isnan(E8M0_LUT[255])
    vals = np.array([1.0, 0.5, 2.0 ** -20, 2.0 ** 10], np.float32)
    np.testing.assert_array_equal(E8M0_LUT[float32_to_e8m0(vals)], vals)
    with pytest.raises(ValueError):
        float32_to_e8m0(np.array([3.0], np.float32))


# ---------------------------------------------------------------------------------------------
# single-file round trips
# ---------------------------------------------------------------------------------------------

def test_roundtrip_native_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 7)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "i64": rng.integers(-2 ** 40, 2 ** 40, (6,)),
        "i32": rng.integers(-2 ** 30, 2 ** 30, (2, 2)).astype(np.int32),
        "i16": rng.integers(-300, 300, (5,)).astype(np.int16),
        "i8": rng.integers(-128, 127, (3, 3)).astype(np.int8),
        "u8": rng.integers(0, 255, (9,)).astype(np.uint8),
        "bool": rng.integers(0, 2, (4, 2)).astype(bool),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "native.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np"})
    with SafetensorsFile(path) as st:
        assert sorted(st.keys()) == sorted(tensors)
        assert st.metadata() == {"format": "np"}
        expected_dtypes = {"f64": "F64", "f32": "F32", "f16": "F16", "i64": "I64", "i32": "I32",
                           "i16": "I16", "i8": "I8", "u8": "U8", "bool": "BOOL",
                           "scalar": "F32", "empty": "F32"}
        for name, arr in tensors.items():
            assert st.dtype(name) == expected_dtypes[name]
            assert st.shape(name) == arr.shape
            assert st.nbytes(name) == arr.nbytes
            raw = st.get(name, dtype=None)
            assert raw.dtype == arr.dtype and raw.shape == arr.shape
            np.testing.assert_array_equal(raw, arr)
            as_f32 = st.get(name)
            assert as_f32.dtype == np.float32
            np.testing.assert_array_equal(as_f32, arr.astype(np.float32))
        np.testing.assert_array_equal(st.get("i64", np.int64), tensors["i64"])
        np.testing.assert_array_equal(st.get("f64", np.float64), tensors["f64"])
        with pytest.raises(CheckpointError, match="f32"):
            st.get("f32", np.int32)  # float data never silently becomes integer


def test_roundtrip_bf16_fp8_e8m0(tmp_path):
    rng = np.random.default_rng(1)
    bf16_vals = bf16_to_float32(rng.integers(0, 0x7F00, (5, 6)).astype(np.uint16))
    e4m3_vals = E4M3_LUT[rng.integers(0, 0x7F, (4, 9))]
    e8m0_vals = np.exp2(rng.integers(-20, 20, (3, 2))).astype(np.float32)
    path = tmp_path / "low.safetensors"
    write_safetensors(path, {"b": bf16_vals, "q": e4m3_vals, "s": e8m0_vals},
                      dtypes={"b": "BF16", "q": "F8_E4M3", "s": "F8_E8M0"})
    with SafetensorsFile(path) as st:
        assert (st.dtype("b"), st.dtype("q"), st.dtype("s")) == ("BF16", "F8_E4M3", "F8_E8M0")
        assert st.nbytes("b") == bf16_vals.size * 2 and st.nbytes("q") == e4m3_vals.size
        np.testing.assert_array_equal(st.get("b"), bf16_vals)
        np.testing.assert_array_equal(st.get("q"), e4m3_vals)
        np.testing.assert_array_equal(st.get("s"), e8m0_vals)
        assert st.get("b", dtype=None).dtype == np.uint16
        np.testing.assert_array_equal(st.get("b", dtype=None), float32_to_bf16(bf16_vals))
        assert st.get("q", dtype=None).dtype == np.uint8
        np.testing.assert_array_equal(st.get("b", np.float64), bf16_vals.astype(np.float64))
        np.testing.assert_array_equal(st.get("q", np.float16), e4m3_vals.astype(np.float16))


def test_writer_layout_is_aligned_and_sorted(tmp_path):
    path = tmp_path / "layout.safetensors"
    write_safetensors(path, {"z8": np.zeros(3, np.uint8), "a16": np.ones(3, np.float16),
                             "m64": np.ones(1, np.float64), "b32": np.ones(5, np.float32)},
                      metadata={"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header) == ["__metadata__", "a16", "b32", "m64", "z8"]
    offsets = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    # laid out contiguously by decreasing element size, each aligned to its element size
    assert offsets == {"m64": [0, 8], "b32": [8, 28], "a16": [28, 34], "z8": [34, 37]}
    assert len(raw) == 8 + n + 37
    assert not any(p.name.startswith("layout.safetensors.tmp") for p in tmp_path.iterdir())


def test_reads_do_not_alias_the_file(tmp_path):
    path = tmp_path / "alias.safetensors"
    write_safetensors(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    st = SafetensorsFile(path)
    a = st.get("w")
    b = st.get("w", dtype=None)
    s = st.get_slice("w", 1, 1, 3)
    st.close()  # must not fail because of outstanding views
    a += 1
    b += 1
    np.testing.assert_array_equal(s, np.arange(12, dtype=np.float32).reshape(3, 4)[:, 1:3])


def test_chunked_read_matches_small_chunks(tmp_path, monkeypatch):
    # Force many tiny chunks so chunk boundaries cut through rows and slices.
    rng = np.random.default_rng(2)
    w = bf16_to_float32(rng.integers(0, 0x7F00, (37, 23)).astype(np.uint16))
    q = rng.integers(0, 0x7F, (37, 23)).astype(np.uint8)
    path = tmp_path / "chunks.safetensors"
    write_safetensors(path, {"w": w, "q": q}, dtypes={"w": "BF16", "q": "F8_E4M3"})
    monkeypatch.setattr(sio, "_CHUNK_ELEMS", 50)
    with SafetensorsFile(path) as st:
        np.testing.assert_array_equal(st.get("w"), w)
        np.testing.assert_array_equal(st.get_slice("w", 1, 5, 19), w[:, 5:19])
        np.testing.assert_array_equal(st.get_slice("w", 0, 3, 30), w[3:30])
        np.testing.assert_array_equal(st.get("q"), E4M3_LUT[q])
        np.testing.assert_array_equal(st.get_slice("q", 1, 7, 8), E4M3_LUT[q][:, 7:8])


# ---------------------------------------------------------------------------------------------
# slices
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F8_E4M3", "I32"])
def test_get_slice_equals_full_read(tmp_path, dtype):
    rng = np.random.default_rng(3)
    if dtype == "F8_E4M3":
        data = E4M3_LUT[rng.integers(0, 0x7F, (10, 12, 6))]
    elif dtype == "I32":
        data = rng.integers(-1000, 1000, (10, 12, 6)).astype(np.int32)
    else:
        data = rng.standard_normal((10, 12, 6)).astype(np.float32)
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"t": data, "v": data[0, 0]}, dtypes={"t": dtype, "v": dtype})
    with SafetensorsFile(path) as st:
        full = st.get("t")
        for axis in (0, 1, 2, -1):
            n = data.shape[axis]
            for start, stop in ((0, n), (0, 1), (2, 5), (n - 1, n), (4, 4)):
                index = [slice(None)] * 3
                index[axis] = slice(start, stop)
                np.testing.assert_array_equal(st.get_slice("t", axis, start, stop),
                                              full[tuple(index)])
                np.testing.assert_array_equal(st.get_slice("t", axis, start, stop, dtype=None),
                                              st.get("t", dtype=None)[tuple(index)])
        np.testing.assert_array_equal(st.get_slice("v", 0, 2, 5), st.get("v")[2:5])
        for bad in ((3, 0, 1), (0, -1, 2), (0, 5, 4), (1, 0, 13)):
            with pytest.raises(CheckpointError, match="'t'"):
                st.get_slice("t", *bad)


# ---------------------------------------------------------------------------------------------
# FP8 block dequantisation
# ---------------------------------------------------------------------------------------------

def _fp8_checkpoint(folder, weights, block=(128, 128), scale_fmt=None, scale_dtype="F32"):
    tensors, dtypes, quant = {}, {}, {}
    for name, w in weights.items():
        codes, scale = fp8_block_quantize(w, block, scale_fmt)
        tensors[name] = codes
        tensors[name + "_scale_inv"] = scale
        dtypes[name] = "F8_E4M3"
        dtypes[name + "_scale_inv"] = scale_dtype
        quant[name] = (codes, scale)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, dtypes)
    return quant


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((128, 256), (128, 128)),
                                         ((70, 45), (16, 32)), ((5, 3), (128, 128))])
def test_block_dequant_partial_blocks_vs_naive(tmp_path, shape, block):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    quant = _fp8_checkpoint(tmp_path / "ckpt", {"layer.weight": w}, block)
    codes, scale = quant["layer.weight"]
    assert scale.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    # blocks get different scales so a wrong block mapping cannot pass
    scale_variation = np.unique(scale).size
    reference = _naive_dequant(codes, scale, block)
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.is_fp8("layer.weight") and not reader.is_fp8("layer.weight_scale_inv")
        assert reader.logical_names() == ["layer.weight"]
        got = reader.read_dequantized("layer.weight", block_size=block)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(dequantize_fp8_blocks(codes, scale, block), reference)
    # quantisation itself is sane: e4m3 keeps ~3 mantissa bits
    np.testing.assert_allclose(got, w, rtol=0.07, atol=float(scale.max()) * 2.0 ** -9)
    assert scale_variation >= 1


def test_ue8m0_scales_as_f32_and_e8m0(tmp_path):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((260, 130)) * np.linspace(0.1, 50, 130)).astype(np.float32)
    q32 = _fp8_checkpoint(tmp_path / "f32", {"w.weight": w}, scale_fmt="ue8m0", scale_dtype="F32")
    q8 = _fp8_checkpoint(tmp_path / "e8m0", {"w.weight": w}, scale_fmt="ue8m0",
                         scale_dtype="F8_E8M0")
    codes, scale = q32["w.weight"]
    mant, _ = np.frexp(scale)
    assert np.all(mant == 0.5), "ue8m0 scales must be powers of two"
    reference = _naive_dequant(codes, scale, (128, 128))
    with CheckpointReader(tmp_path / "f32") as a, CheckpointReader(tmp_path / "e8m0") as b:
        assert a.dtype("w.weight_scale_inv") == "F32"
        assert b.dtype("w.weight_scale_inv") == "F8_E8M0"
        assert b.read("w.weight_scale_inv", dtype=None).dtype == np.uint8
        np.testing.assert_array_equal(b.read("w.weight_scale_inv"), scale)
        np.testing.assert_array_equal(a.read_dequantized("w.weight"), reference)
        np.testing.assert_array_equal(b.read_dequantized("w.weight"), reference)
    np.testing.assert_array_equal(q8["w.weight"][0], codes)


def test_fp8_sliced_dequant_equals_full(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((300, 270)).astype(np.float32) * 3
    _fp8_checkpoint(tmp_path / "c", {"m.weight": w})
    with CheckpointReader(tmp_path / "c") as reader:
        full = reader.read_dequantized("m.weight")
        for axis in (0, 1, -1):
            n = w.shape[axis]
            for start, stop in ((0, n), (0, 128), (100, 200), (127, 129), (256, n), (10, 11),
                                (n // 2, n // 2)):
                index = [slice(None), slice(None)]
                index[axis] = slice(start, stop)
                got = reader.read_dequantized("m.weight", slice=(axis, start, stop))
                np.testing.assert_array_equal(got, full[tuple(index)])
        # tensor-parallel style: shards concatenate back to the full weight
        shards = [reader.read_dequantized("m.weight", slice=(1, r * 90, (r + 1) * 90))
                  for r in range(3)]
        np.testing.assert_array_equal(np.concatenate(shards, axis=1), full)


def test_read_dequantized_plain_tensors(tmp_path):
    b = bf16_to_float32(np.array([[0x3F80, 0x4000], [0xC040, 0x3E80]], np.uint16))
    write_safetensors(tmp_path / "model.safetensors", {"n.weight": b, "i": np.arange(4)},
                      dtypes={"n.weight": "BF16"})
    with CheckpointReader(tmp_path) as reader:
        assert not reader.is_fp8("n.weight")
        np.testing.assert_array_equal(reader.read_dequantized("n.weight"), b)
        np.testing.assert_array_equal(reader.read_dequantized("n.weight", slice=(1, 1, 2)),
                                      b[:, 1:2])
        assert reader.read_dequantized("i").dtype == np.float32


def test_fp8_scale_shape_mismatch(tmp_path):
    codes, scale = fp8_block_quantize(np.ones((200, 200), np.float32))
    write_safetensors(tmp_path / "model.safetensors",
                      {"x.weight": codes, "x.weight_scale_inv": scale[:1]},
                      dtypes={"x.weight": "F8_E4M3"})
    with CheckpointReader(tmp_path) as reader, pytest.raises(CheckpointError) as exc:
        reader.read_dequantized("x.weight")
    _assert_error(exc, "model.safetensors", "x.weight_scale_inv", "(2, 2)")


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------

def _sharded(folder, rng):
    a = {"model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float32),
         "model.layers.0.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype(np.float32)}
    b = {"model.norm.weight": np.ones(4, np.float32),
         "lm_head.weight": rng.standard_normal((8, 4)).astype(np.float32)}
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model-00001-of-00002.safetensors"), a,
                      dtypes={k: "BF16" for k in a})
    write_safetensors(os.path.join(folder, "model-00002-of-00002.safetensors"), b)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in b})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return a, b


def test_sharded_folder_with_index(tmp_path):
    a, b = _sharded(tmp_path, np.random.default_rng(7))
    # a stray file the index does not mention must be ignored
    write_safetensors(tmp_path / "extra.safetensors", {"model.norm.weight": np.zeros(4)})
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == sorted(list(a) + list(b))
        assert reader.logical_names() == reader.names()
        assert [os.path.basename(p) for p in reader.files()] == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert reader.dtype("model.embed_tokens.weight") == "BF16"
        assert reader.shape("lm_head.weight") == (8, 4)
        for name, value in a.items():
            np.testing.assert_array_equal(reader.read(name),
                                          bf16_to_float32(float32_to_bf16(value)))
        for name, value in b.items():
            np.testing.assert_array_equal(reader.read(name), value)
        np.testing.assert_array_equal(reader.read_slice("lm_head.weight", 0, 2, 6),
                                      b["lm_head.weight"][2:6])
        assert os.path.basename(reader.file_of("lm_head.weight")) == \
            "model-00002-of-00002.safetensors"
        assert "model.norm.weight" in reader and "nope" not in reader
        with pytest.raises(CheckpointError, match="nope"):
            reader.read("nope")


def test_folder_without_index(tmp_path):
    write_safetensors(tmp_path / "b.safetensors", {"y": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(2, np.float32)})
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == ["x", "y"]
        assert [os.path.basename(p) for p in reader.files()] == ["a.safetensors",
                                                                 "b.safetensors"]
    # model.safetensors wins over other files
    write_safetensors(tmp_path / "model.safetensors", {"m": np.ones(1, np.float32)})
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == ["m"]
    # a single file path works too
    with CheckpointReader(tmp_path / "a.safetensors") as reader:
        assert reader.names() == ["x"]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_error_truncated_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    write_safetensors(path, {"a": np.ones((4, 4), np.float32), "b": np.ones(3, np.float16)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "trunc.safetensors", "truncated", "'b'")
    path.write_bytes(raw[:5])
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "trunc.safetensors", "shorter than")


def test_error_header_length_too_large(tmp_path):
    path = _raw_file(tmp_path / "big.safetensors", {"a": {}}, header_len=10 ** 12)
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "big.safetensors", "header length")
    path = _raw_file(tmp_path / "big2.safetensors", {}, header_len=4096)
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "big2.safetensors", "exceeds the file size")


def test_error_corrupt_header(tmp_path):
    path = _raw_file(tmp_path / "json.safetensors", b'{"a": {"dtype": "F32",')
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "json.safetensors", "JSON")
    path = _raw_file(tmp_path / "utf.safetensors", b'{"\xff\xfe": 1}  ')
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "utf.safetensors", "UTF-8")
    path = _raw_file(tmp_path / "list.safetensors", b"[1, 2]")
    with pytest.raises(CheckpointError, match="list.safetensors"):
        SafetensorsFile(path)
    path = _raw_file(tmp_path / "dup.safetensors",
                     b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                     b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0")
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "dup.safetensors", "duplicate", "'a'")


def test_error_bad_dtype_and_entries(tmp_path):
    path = _raw_file(tmp_path / "dtype.safetensors",
                     {"w.weight": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}},
                     b"\0\0")
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "dtype.safetensors", "'w.weight'", "unknown dtype", "Q4_K")

    path = _raw_file(tmp_path / "mismatch.safetensors",
                     {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}},
                     b"\0" * 24)
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "mismatch.safetensors", "'w'", "24")

    path = _raw_file(tmp_path / "overlap.safetensors",
                     {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                     b"\0" * 12)
    with pytest.raises(CheckpointError) as exc:
        SafetensorsFile(path)
    _assert_error(exc, "overlap.safetensors", "overlaps", "'a'", "'b'")

    path = _raw_file(tmp_path / "shape.safetensors",
                     {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="shape.safetensors.*'a'"):
        SafetensorsFile(path)

    path = _raw_file(tmp_path / "missing.safetensors", {"a": {"dtype": "F32", "shape": [1]}},
                     b"\0" * 4)
    with pytest.raises(CheckpointError, match="missing.safetensors.*data_offsets"):
        SafetensorsFile(path)


def test_error_index_points_to_missing_file(tmp_path):
    _sharded(tmp_path, np.random.default_rng(8))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError) as exc:
        CheckpointReader(tmp_path)
    _assert_error(exc, "model.safetensors.index.json", "model-00002-of-00002.safetensors")


def test_error_tensor_missing_from_file(tmp_path):
    _sharded(tmp_path, np.random.default_rng(9))
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        CheckpointReader(tmp_path)
    _assert_error(exc, "model-00001-of-00002.safetensors", "model.layers.1.mlp.up_proj.weight")


def test_error_bad_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointReader(tmp_path)


def test_error_same_tensor_in_two_files(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(2, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError) as exc:
        CheckpointReader(tmp_path)
    _assert_error(exc, "a.safetensors", "b.safetensors", "'x'")


def test_error_empty_folder(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        CheckpointReader(tmp_path)
    _assert_error(exc, str(tmp_path), "no .safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        CheckpointReader(tmp_path / "absent")


def test_error_fp8_without_scale(tmp_path):
    codes, _ = fp8_block_quantize(np.ones((4, 4), np.float32))
    write_safetensors(tmp_path / "model.safetensors", {"q.weight": codes},
                      dtypes={"q.weight": "F8_E4M3"})
    with CheckpointReader(tmp_path) as reader:
        assert reader.is_fp8("q.weight")
        # plain read still works (codes decoded, unscaled)
        np.testing.assert_array_equal(reader.read("q.weight"), e4m3_to_float32(codes))
        with pytest.raises(CheckpointError) as exc:
            reader.read_dequantized("q.weight")
    _assert_error(exc, "model.safetensors", "q.weight", "q.weight_scale_inv")


def test_writer_rejects_bad_input(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="w.safetensors"):
        write_safetensors(path, {"a": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="w.safetensors"):
        write_safetensors(path, {"a": np.ones(2)}, dtypes={"a": "F12"})
    with pytest.raises(ValueError, match="w.safetensors"):
        write_safetensors(path, {"a": np.ones(2)}, metadata={"k": 1})
    with pytest.raises(ValueError, match="'a'"):
        write_safetensors(path, {"a": np.array([300])}, dtypes={"a": "I8"})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# compatibility with the reference implementation
# ---------------------------------------------------------------------------------------------

def test_interop_with_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(10)
    tensors = {"a.weight": rng.standard_normal((5, 3)).astype(np.float32),
               "b.weight": rng.standard_normal((7,)).astype(np.float16),
               "c": rng.integers(0, 100, (2, 2)).astype(np.int64),
               "d": np.array(1.5, np.float32)}
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, tensors, metadata={"format": "np"})
    loaded = st_numpy.load_file(str(ours))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)
    # and the other direction
    theirs = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(theirs), metadata={"x": "y"})
    with SafetensorsFile(theirs) as st:
        assert st.metadata() == {"x": "y"}
        for name, value in tensors.items():
            np.testing.assert_array_equal(st.get(name, dtype=None), value)
