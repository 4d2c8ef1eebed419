"""Native CPU kernels (deepseek_ms/kernels): each one against the MindSpore-ops path it
replaces, in a compiled graph; the whole model with and without them; and the build's
failure modes (a missing or broken compiler falls back to MindSpore's ops)."""
import dataclasses

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import nn  # noqa: E402

from deepseek_ms.backend import native_kernels  # noqa: E402
from deepseek_ms.checkpoint.safetensors_io import bf16_to_float32  # noqa: E402
from deepseek_ms.config import DeepseekConfig  # noqa: E402
from deepseek_ms.kernels import cpu  # noqa: E402
from deepseek_ms.model.attention import MLAttention  # noqa: E402
from deepseek_ms.model.linear import NATIVE_MAX_ROWS, Linear  # noqa: E402
from deepseek_ms.model.moe import MLP, MoE  # noqa: E402
from deepseek_ms.model.norm import RMSNorm  # noqa: E402
from deepseek_ms.model.rope import apply_rope  # noqa: E402
from deepseek_ms.model.transformer import use_kernels  # noqa: E402
from helpers import experts_reference, fixture_dir, load_fixture_model  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)
NATIVE_ATTRS = ("native_linear", "native_swiglu", "native_silu_mul", "native_with_shared", "native_project",
                "native_norm", "native_rope", "native_decode", "native_experts", "native_router", "native_prefill")


@pytest.fixture(scope="module")
def kernels():
    k = native_kernels("auto")
    assert k is not None, "the CPU kernels must build on the test machines (g++ is required)"
    return k


class _Call(nn.Cell):
    def __init__(self, cell, method="construct"):
        super().__init__()
        self.cell = cell
        self.method = method

    def construct(self, *args):
        if self.method == "cached":
            return self.cell.cached(*args)
        if self.method == "prefill":
            return self.cell.prefill(*args)
        return self.cell(*args)


def _both(cell, kernels, *args, method="construct"):
    """(native output, MindSpore-ops output) of the same cell in compiled graphs."""
    use_kernels(cell, kernels)
    attached = [getattr(c, a) for _, c in cell.cells_and_names() for a in NATIVE_ATTRS if getattr(c, a, None)]
    assert attached, "use_kernels attached no native kernel"
    native = ms.jit(_Call(cell, method))(*args)
    use_kernels(cell, None)
    reference = ms.jit(_Call(cell, method))(*args)
    return native, reference


def _numpy(x):
    return [t.asnumpy() for t in x] if isinstance(x, (tuple, list)) else [x.asnumpy()]


def _bf16_bits(x):
    """float32 -> bfloat16 bits (uint16), truncated; widening them back is exact."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _keep_in_bf16(param, values):
    """Store `values` (bf16-exact float32) in `param` as bfloat16, as the loader keeps a BF16
    checkpoint's weights under the native kernels."""
    param.set_dtype(ms.bfloat16)
    param.set_data(ms.Tensor.from_numpy(_bf16_bits(values)).view(ms.bfloat16))


# rows and features cover every tail of the 8x3 (AVX-512) and 4x3 (AVX2) micro-kernels:
# 1-7 leftover rows, 1-2 leftover weight rows in a block, and in_features not a multiple of
# the vector width. Past NATIVE_MAX_ROWS, MindSpore's MatMul runs on the weight, widened
# from bf16 by `widen_bf16` under bf16 storage -- unless the kernels run bf16 weights on the
# tile unit (AMX) and in_features is a multiple of 32 (96 here), when `linear` takes any
# number of rows.
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 12, NATIVE_MAX_ROWS, 40])
@pytest.mark.parametrize("out_features,in_features", [(38, 60), (256, 96)])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_linear(kernels, rows, out_features, in_features, storage):
    """The native product against MindSpore's MatMul; with a weight kept in bf16 (as the
    loader keeps a BF16 checkpoint's), detaching the kernels widens it back for MatMul."""
    rng = np.random.default_rng(rows)
    cell = Linear(in_features, out_features)
    w = bf16_to_float32(_bf16_bits(rng.standard_normal((out_features, in_features))))
    cell.weight.set_data(ms.Tensor(w))
    x = rng.standard_normal((1, rows, in_features)).astype(np.float32)
    use_kernels(cell, kernels)
    assert cell.native_any_rows == (kernels.matrix_unit and in_features % 32 == 0)
    if storage == "bfloat16":
        assert cell.bf16_storage
        _keep_in_bf16(cell.weight, w)
    native, reference = _both(cell, kernels, ms.Tensor(x))
    assert cell.weight.dtype == ms.float32
    np.testing.assert_allclose(native.asnumpy(), x @ w.T, **TOL)
    np.testing.assert_allclose(reference.asnumpy(), x @ w.T, **TOL)


@pytest.mark.parametrize("rows", [1, 5, NATIVE_MAX_ROWS, 40])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("hidden", [40, 64])
def test_swiglu_mlp(kernels, rows, storage, hidden):
    """An MLP's gate, up and activation as one `swiglu` call up to NATIVE_MAX_ROWS rows (the
    down projection stays a Linear); past it, MindSpore's MatMuls and one `silu_mul`, unless
    bf16 gate and up weights of 64 columns run on the tile unit (AMX), which takes any
    number of rows. Native and MindSpore-ops paths against numpy, with the gate and up
    weights in fp32 or kept in bf16."""
    rng = np.random.default_rng(rows)
    inter = 100  # 48-feature blocks (two and a tail of 4), or the tile unit's 64 and a tail of 36
    mlp = MLP(hidden, inter)
    weights = {}
    for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        weights[name] = bf16_to_float32(_bf16_bits(rng.standard_normal(shape) * 0.3))
        getattr(mlp, name).weight.set_data(ms.Tensor(weights[name]))
    x = rng.standard_normal((1, rows, hidden)).astype(np.float32)
    g, u = x @ weights["gate_proj"].T, x @ weights["up_proj"].T
    want = (g / (1 + np.exp(-g)) * u) @ weights["down_proj"].T
    use_kernels(mlp, kernels)
    assert mlp.native_swiglu is not None and mlp.native_silu_mul is not None
    assert mlp.native_any_rows == (kernels.matrix_unit and hidden % 32 == 0)
    if storage == "bfloat16":
        for name in ("gate_proj", "up_proj"):
            _keep_in_bf16(getattr(mlp, name).weight, weights[name])
    native, reference = _both(mlp, kernels, ms.Tensor(x))
    np.testing.assert_allclose(native.asnumpy(), want, **TOL)
    np.testing.assert_allclose(reference.asnumpy(), want, **TOL)


@pytest.mark.parametrize("rows", [3, NATIVE_MAX_ROWS, 40])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_moe_layer_with_its_shared_experts_in_one_call(kernels, rows, storage):
    """On a single rank, up to NATIVE_MAX_ROWS tokens run the routed and the shared experts
    as one moe_experts call (two shared experts here, so their intermediate width differs
    from the routed ones'); more tokens, and MindSpore's ops, run them apart -- unless the
    weights are kept in bf16 and run on the tile unit (AMX), which takes any number of
    tokens in the one call. All agree."""
    config = DeepseekConfig.from_pretrained(str(fixture_dir("deepseek_v3_tiny")))
    moe = MoE(dataclasses.replace(config, n_shared_experts=2))
    rng = np.random.default_rng(rows)
    for _, p in moe.parameters_and_names():
        p.set_data(ms.Tensor(bf16_to_float32(_bf16_bits(rng.standard_normal(p.shape) * 0.3))))
    use_kernels(moe, kernels)
    assert moe.native_with_shared is not None
    assert moe.native_any_rows == kernels.matrix_unit  # hidden 64, shared width 64
    if storage == "bfloat16":
        e, sh = moe.experts, moe.shared_experts
        for p in (e.gate_proj, e.up_proj, e.down_proj, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight):
            _keep_in_bf16(p, p.asnumpy())
    x = rng.standard_normal((1, rows, config.hidden_size)).astype(np.float32)
    native, reference = _both(moe, kernels, ms.Tensor(x))
    np.testing.assert_array_equal(native[1].asnumpy(), reference[1].asnumpy())  # same routing
    np.testing.assert_allclose(native[0].asnumpy(), reference[0].asnumpy(), **TOL)


def _aot(lib, name, inputs, outputs):
    """Call an AOT kernel of `lib` (ctypes) as MindSpore does: inputs then outputs, numpy
    arrays, uint16 arrays passed as bfloat16."""
    import ctypes
    arrays = [np.ascontiguousarray(a) for a in inputs] + list(outputs)
    n = len(arrays)
    names = {np.dtype(np.float32): b"float32", np.dtype(np.int32): b"int32", np.dtype(np.uint16): b"bfloat16"}
    shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    rc = getattr(lib, name)(
        n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]), (ctypes.c_int * n)(*[a.ndim for a in arrays]),
        (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes]),
        (ctypes.c_char_p * n)(*[names[a.dtype] for a in arrays]), None, None)
    assert rc == 0, f"{name} returned {rc}"


ISA_FLAGS = {"native": [], "avx512": ["-mno-amx-tile"], "avx2": ["-mno-avx512f"]}


@pytest.mark.parametrize("isa", list(ISA_FLAGS))
def test_products_on_each_instruction_set(tmp_path, isa):
    """Each vector path of the dot products (the build for this CPU, AVX-512 without the
    tile unit, built here with -mno-amx-tile, and AVX2, with -mno-avx512f), for fp32 and
    bf16 weights, every row tail, and K with a tail past the vector width (so the tile
    unit, which takes K in 32s, never applies): `linear` and the routed experts against
    numpy. With AVX-512, 48 rows and more go through transposed weight panels of 3, 2 and 1
    vectors (N = 120 is blocks of 48, 48 and 24 rows), with 0, 5 and 7 rows left after the
    8-row tiles."""
    import ctypes
    flags = cpu._cpu_flags().split()
    if isa == "avx2" and b"avx2" not in flags or isa == "avx512" and b"avx512f" not in flags:
        pytest.skip(f"no {isa} on this CPU")
    lib = ctypes.CDLL(cpu.build(out_dir=str(tmp_path), extra_flags=ISA_FLAGS[isa]))
    widest = 16 if b"avx512f" in flags else 8 if b"avx2" in flags else 1
    assert lib.dsms_vector_width() == (8 if isa == "avx2" else widest)
    rng = np.random.default_rng(3)
    K, N = 16 * 5 + 9, 120
    w_bits = _bf16_bits(rng.standard_normal((N, K)))
    w = bf16_to_float32(w_bits)
    for rows in [*range(1, NATIVE_MAX_ROWS + 1), 48, 53, 63]:
        x = rng.standard_normal((rows, K)).astype(np.float32)
        for weight in (w, w_bits):
            y = np.zeros((rows, N), np.float32)
            _aot(lib, "dsms_linear", [x, weight], [y])
            np.testing.assert_allclose(y, x @ w.T, **TOL)
    E, I, H, k = 4, 40, K, 2
    gate, up, down = (_bf16_bits(rng.standard_normal(s) * 0.3) for s in ((E, I, H), (E, I, H), (E, H, I)))
    for T in (23, 130):  # about 11 and 65 rows per expert
        x = rng.standard_normal((T, H)).astype(np.float32)
        idx = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
        weights = rng.random((T, k)).astype(np.float32)
        want = experts_reference(x, idx, weights, {"gate_proj": bf16_to_float32(gate), "up_proj": bf16_to_float32(up),
                                                   "down_proj": bf16_to_float32(down)}, 0, E)
        y = np.zeros((T, H), np.float32)
        _aot(lib, "dsms_moe_experts", [x, idx, np.zeros(1, np.int32), weights, gate, up, down], [y])
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_bf16_weight_products_on_the_tile_unit(tmp_path):
    """With AMX (the build for this CPU; the test machines have it), bf16-weight products of
    8 rows and more run on the tile unit, each fp32 activation split into three bf16 parts.
    `linear` against float64 over every tile tail -- rows past a 16-row tile, a pair of
    them and a 128-row chunk; weight rows past a pair of 16-row tiles and past a single
    one -- with each error under 4 eps sqrt(K) of the root sum of squares of its products,
    a bound float32 sums keep (at K = 32, activations of one bf16 part are about 1000x off
    it, of two parts about 5x). Then the routed and shared experts, with rows per expert
    under the 8-row threshold and past a 128-row chunk, within float32's error of the
    largest output.
    Without AMX it checks the library says so."""
    import ctypes
    lib = ctypes.CDLL(cpu.build(out_dir=str(tmp_path)))
    has_amx = {b"amx_tile", b"amx_bf16", b"avx512_bf16"} <= set(cpu._cpu_flags().split())
    assert lib.dsms_matrix_unit() == int(has_amx)
    if not has_amx:
        pytest.skip("no AMX on this CPU")
    rng = np.random.default_rng(5)
    for M, N, K in [(8, 40, 32), (17, 16, 96), (300, 100, 32), (40, 33, 1024), (16, 75, 512)]:
        w = bf16_to_float32(w_bits := _bf16_bits(rng.standard_normal((N, K)))).astype(np.float64)
        x = (rng.standard_normal((M, K)) * 3).astype(np.float32)
        y = np.full((M, N), np.nan, np.float32)
        _aot(lib, "dsms_linear", [x, w_bits], [y])
        x64 = x.astype(np.float64)
        err = (np.abs(y - x64 @ w.T) / np.sqrt((x64 ** 2) @ (w ** 2).T)).max()
        assert err < 4 * 2.0 ** -24 * np.sqrt(K), f"{M}x{N}x{K}: error {err:.2e}, not float32 accuracy"
    E, I, H, k, Is = 4, 96, 64, 2, 64
    weights = {n: _bf16_bits(rng.standard_normal(s) * 0.3) for n, s in (
        ("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)),
        ("shared_gate", (Is, H)), ("shared_up", (Is, H)), ("shared_down", (H, Is)))}
    f64 = {n: bf16_to_float32(b).astype(np.float64) for n, b in weights.items()}
    T = 300  # about 200 rows (two 128-row chunks) for each of experts 0-2; expert 3 gets 3 (dot products)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.permutation(3)[:k] for _ in range(T)]).astype(np.int32)
    idx[:3, 1] = 3
    gates = rng.random((T, k)).astype(np.float32)
    x64 = x.astype(np.float64)
    g, u = x64 @ f64["shared_gate"].T, x64 @ f64["shared_up"].T
    want = (experts_reference(x64, idx, gates.astype(np.float64), f64, 0, E)
            + (g / (1 + np.exp(-g)) * u) @ f64["shared_down"].T)
    y = np.zeros((T, H), np.float32)
    _aot(lib, "dsms_moe_experts", [x, idx, np.zeros(1, np.int32), gates, *weights.values()], [y])
    err = np.abs(y - want).max() / np.abs(want).max()
    assert err < 1e-6, f"experts: error {err:.2e} of the largest output, not float32 accuracy"


@pytest.mark.parametrize("tokens", [5, 1500])  # 1500: 3000 rows, three work items of the pool
def test_rms_norm_whole_rows_and_leading_columns(kernels, tokens):
    rng = np.random.default_rng(0)
    cell = RMSNorm(48, eps=1e-6)
    weight = rng.standard_normal(48).astype(np.float32)
    cell.weight.set_data(ms.Tensor(weight))
    x = rng.standard_normal((2, tokens, 48)).astype(np.float32) * 3
    native, reference = _both(cell, kernels, ms.Tensor(x))
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * weight
    np.testing.assert_allclose(native.asnumpy(), want, **TOL)
    np.testing.assert_allclose(reference.asnumpy(), want, **TOL)
    # MLA's latent: normalise the first 48 columns, pass the 8 rope columns through
    cell.use_kernels(kernels)
    wide = rng.standard_normal((2, tokens, 56)).astype(np.float32)
    got = cell.leading(ms.Tensor(wide)).asnumpy()
    head = wide[..., :48]
    np.testing.assert_allclose(got[..., :48], head / np.sqrt((head.astype(np.float64) ** 2).mean(-1, keepdims=True)
                                                              + 1e-6) * weight, **TOL)
    np.testing.assert_array_equal(got[..., 48:], wide[..., 48:])


# the last shape is 16000 rows of 4 heads: six work items of the pool, each whole tokens
@pytest.mark.parametrize("shape", [(2, 3, 4, 24), (2, 3, 40), (2, 2000, 4, 24)])
def test_rope_on_trailing_columns(kernels, shape):
    rng = np.random.default_rng(1)
    dr = 8
    x = rng.standard_normal(shape).astype(np.float32)
    cos = rng.standard_normal(shape[:2] + (dr // 2,)).astype(np.float32)
    sin = rng.standard_normal(shape[:2] + (dr // 2,)).astype(np.float32)
    got = kernels.rope()(ms.Tensor(x), ms.Tensor(cos), ms.Tensor(sin)).asnumpy()
    want = apply_rope(ms.Tensor(x[..., -dr:]), ms.Tensor(cos), ms.Tensor(sin)).asnumpy()
    np.testing.assert_array_equal(got[..., :-dr], x[..., :-dr])
    np.testing.assert_allclose(got[..., -dr:], want, **TOL)


def _attention(seed=0, **overrides):
    config = DeepseekConfig.from_pretrained(str(fixture_dir("deepseek_v3_tiny")))
    config = dataclasses.replace(config, **overrides)
    cell = MLAttention(config)
    rng = np.random.default_rng(seed)
    for name, p in cell.parameters_and_names():
        scale = 1.0 if "layernorm" in name else 0.2
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * scale
                             + (1.0 if "layernorm" in name else 0.0)))
    return config, cell, rng


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("shape", [{}, {"num_attention_heads": 6, "kv_lora_rank": 40}],
                         ids=["4heads", "6heads-r40"])
def test_absorbed_decode_attention(kernels, S, paged, shape):
    """The fused absorbed-MLA kernel against the BatchMatMul form, with padded past slots
    (a visible slot after a masked one too) and a causal mask among the new tokens; over a
    contiguous cache and over a paged pool read through a shuffled block table. The second
    shape has a head group and latent columns that do not fill the kernel's tiles. The
    projections, latent norms and rope before it run as one mla_project call."""
    config, cell, rng = _attention(S, **shape)
    use_kernels(cell, kernels)
    assert cell.native_project is not None
    B, block, MB, L = 3, 4, 3, config.latent_dim
    T = block * MB
    x = rng.standard_normal((B, S, config.hidden_size)).astype(np.float32)
    h = config.qk_rope_head_dim // 2
    cos = rng.standard_normal((B, S, h)).astype(np.float32)
    sin = rng.standard_normal((B, S, h)).astype(np.float32)
    cache = rng.standard_normal((B, T, L)).astype(np.float32)
    past = np.full((B, S, T), -1e30, np.float32)
    for b, n in enumerate((12, 5, 1)):
        past[b, :, :n] = 0
    past[1, :, 2] = -1e30
    causal = np.triu(np.full((S, S), -1e30, np.float32), 1)
    self_mask = np.broadcast_to(causal, (B, S, S)).copy()
    args = [ms.Tensor(a) for a in (x, cos, sin)]
    if paged:
        tables = rng.permutation(B * MB).reshape(B, MB).astype(np.int32) + 1
        pool = rng.standard_normal((B * MB + 1, block, L)).astype(np.float32)
        for b in range(B):
            for j in range(MB):
                pool[tables[b, j]] = cache[b, j * block:(j + 1) * block]
        args += [ms.Tensor(a) for a in (pool, past, self_mask, tables)]
    else:
        args += [ms.Tensor(a) for a in (cache, past, self_mask)]
    native, reference = _both(cell, kernels, *args, method="cached")
    for got, want in zip(_numpy(native), _numpy(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if paged:  # the paged reference itself equals attention over the contiguous cache
        use_kernels(cell, None)
        contiguous = ms.jit(_Call(cell, "cached"))(*args[:3], *[ms.Tensor(a) for a in (cache, past, self_mask)])
        for got, want in zip(_numpy(native), _numpy(contiguous)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [{}, {"qk_nope_head_dim": 13, "v_head_dim": 76}], ids=["tiny", "odd-dims"])
def test_expanded_prefill_attention(kernels, shape):
    """Fused prefill attention (and native rope / latent norm) against MindSpore's ops, with a
    causal mask (whose masked tails the kernel skips), padded rows and a wholly masked row.
    S = 7 leaves a 3-row tail after the kernel's groups of 4 query rows; the second shape has
    a query-key width with a scalar tail and value columns past the 64- and 8-wide blocks."""
    config, cell, rng = _attention(3, **shape)
    B, S = 2, 7
    x = rng.standard_normal((B, S, config.hidden_size)).astype(np.float32)
    h = config.qk_rope_head_dim // 2
    cos = rng.standard_normal((B, S, h)).astype(np.float32)
    sin = rng.standard_normal((B, S, h)).astype(np.float32)
    mask = np.broadcast_to(np.triu(np.full((S, S), -1e30, np.float32), 1), (B, S, S)).copy()
    mask[1, :, 4:] = -1e30
    mask[1, 4:, 4:] = np.triu(np.full((3, 3), -1e30, np.float32), 1)  # padded tail still sees itself
    mask[0, S - 1, :] = -1e30  # a wholly masked row: the reference's uniform softmax
    args = [ms.Tensor(a) for a in (x, cos, sin, mask)]
    native, reference = _both(cell, kernels, *args, method="prefill")
    for got, want in zip(_numpy(native), _numpy(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_model_with_and_without_kernels():
    """Prefill logits and cached (absorbed) decode of the whole tiny model agree between the
    native kernels and MindSpore's ops."""
    import deepseek_ms
    native = load_fixture_model("deepseek_v3_tiny")
    plain = deepseek_ms.load_model(str(fixture_dir("deepseek_v3_tiny")), progress=False, kernels="mindspore")
    ids = np.random.default_rng(0).integers(0, native.config.vocab_size, (2, 9))
    np.testing.assert_allclose(native.logits(ids), plain.logits(ids), rtol=1e-4, atol=1e-4)
    got_ids, got_logits = native.generate(ids, max_new_tokens=6, return_logits=True)
    want_ids, want_logits = plain.generate(ids, max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)



def _weight_dtypes(model, folder):
    """(dtype of every stored weight of the routed experts and projections, the dtype each
    should have: bf16 where the checkpoint's tensor is BF16 and the weight may keep it)."""
    from deepseek_ms.checkpoint.hf_loader import _hf_name
    from deepseek_ms.checkpoint.safetensors_io import CheckpointReader
    from deepseek_ms.model.moe import RoutedExperts
    reader = CheckpointReader(str(folder))
    got, want = {}, {}
    for name, cell in model.net.cells_and_names():
        if isinstance(cell, RoutedExperts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                got[f"{name}.{p}"] = str(getattr(cell, p).dtype)
                bf16 = all(reader.dtype(_hf_name(f"{name}.{e}.{p}.weight", model.config)) == "BF16"
                           for e in range(cell.n_routed_experts))
                want[f"{name}.{p}"] = "BFloat16" if bf16 else "Float32"
        elif isinstance(cell, Linear):
            got[name] = str(cell.weight.dtype)
            bf16 = reader.dtype(_hf_name(f"{name}.weight", model.config)) == "BF16"
            want[name] = "BFloat16" if bf16 and not name.endswith("kv_b_proj") else "Float32"
    reader.close()
    return got, want


def test_bf16_checkpoints_keep_their_weights_in_bf16():
    """Under the native kernels a checkpoint's BF16 routed experts and projections stay bf16
    (exact: they are the checkpoint's own values; test_model_with_and_without_kernels compares
    that model's logits with fp32 MindSpore ops), except kv_b_proj, which the absorbed decode
    kernel reads as fp32. F32 tensors, FP8 ones (times their scales), and everything under
    MindSpore's ops are fp32."""
    import deepseek_ms
    for name in ("deepseek_v3_tiny", "deepseek_v2_lite_tiny", "deepseek_v3_fp8_tiny"):
        got, want = _weight_dtypes(load_fixture_model(name), fixture_dir(name))
        assert got == want, name
        if name == "deepseek_v3_tiny":  # all BF16 tensors
            assert {d for n, d in got.items() if not n.endswith("kv_b_proj")} == {"BFloat16"}
        if name == "deepseek_v2_lite_tiny":  # all F32 tensors
            assert set(got.values()) == {"Float32"}
    folder = fixture_dir("deepseek_v3_tiny")
    plain = deepseek_ms.load_model(str(folder), progress=False, kernels="mindspore")
    assert set(_weight_dtypes(plain, folder)[0].values()) == {"Float32"}


def test_kernel_choice_is_validated():
    assert native_kernels("mindspore") is None
    with pytest.raises(ValueError, match="kernels must be one of"):
        native_kernels("fast")


def test_build_failures_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="does not run"):
        cpu.build(compiler=str(tmp_path / "no-such-g++"), out_dir=str(tmp_path))
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'error: broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="broken compiler"):
        cpu.build(compiler=str(broken), out_dir=str(tmp_path))
    assert not list(tmp_path.glob("*.so")), "a failed build must not leave a library behind"


def test_build_is_cached_per_source(tmp_path):
    first = cpu.build(out_dir=str(tmp_path))
    mtime = (tmp_path / first.split("/")[-1]).stat().st_mtime_ns
    assert cpu.build(out_dir=str(tmp_path)) == first
    assert (tmp_path / first.split("/")[-1]).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_router(kernels, method):
    """Every routing method of Router: the same experts and weights as the MindSpore ops."""
    from deepseek_ms.model.moe import Router
    config = DeepseekConfig.from_pretrained(str(fixture_dir("deepseek_v3_tiny")))
    v3 = method == "noaux_tc"
    config = dataclasses.replace(config, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                                 topk_method=method, scoring_func="sigmoid" if v3 else "softmax",
                                 model_type="deepseek_v3" if v3 else "deepseek_v2",
                                 norm_topk_prob=method != "greedy", routed_scaling_factor=2.5)
    rng = np.random.default_rng(5)
    cell = Router(config)
    cell.weight.set_data(ms.Tensor(rng.standard_normal(cell.weight.shape).astype(np.float32)))
    if v3:
        cell.e_score_correction_bias.set_data(ms.Tensor(rng.standard_normal(16).astype(np.float32) * 0.1))
    x = rng.standard_normal((37, config.hidden_size)).astype(np.float32)
    (idx, w), (ref_idx, ref_w) = [_numpy(o) for o in _both(cell, kernels, ms.Tensor(x))]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(w, ref_w, **TOL)


def test_forked_child_gets_its_own_pool_threads(kernels):
    """A child forked after the kernels ran inherits the pool but not its worker threads;
    it must start its own instead of running every work item on the calling thread."""
    import ctypes
    import os

    lib = ctypes.CDLL(kernels.library)
    used = lib.dsms_pool_threads_used
    used.argtypes, used.restype = [ctypes.c_int], ctypes.c_int
    in_parent = used(8)
    if in_parent < 2:
        pytest.skip("one CPU: the pool has no workers")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running pytest's teardown
        try:
            os.write(write, str(used(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    in_child = int(os.read(read, 16) or b"0")
    os.close(read)
    os.waitpid(pid, 0)
    assert in_child == in_parent
