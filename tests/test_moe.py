"""Routed experts: the gathered (decode), slotted (prefill) and dense (training, overloaded
experts) paths all compute the same exact sparse sum, in PyNative and in a compiled graph."""
import dataclasses

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import nn  # noqa: E402

from deepseek_ms.config import DeepseekConfig  # noqa: E402
from deepseek_ms.model.moe import RoutedExperts  # noqa: E402
from helpers import experts_reference, fixture_dir  # noqa: E402


def _config(E=16, k=2):
    config = DeepseekConfig.from_pretrained(str(fixture_dir("deepseek_v3_tiny")))
    return dataclasses.replace(config, n_routed_experts=E, num_experts_per_tok=k)


def _weights(config, rng):
    E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    return {p: rng.standard_normal(s).astype(np.float32) * 0.3
            for p, s in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)))}


def _experts(config, weights, first=0, n=None):
    n = n or config.n_routed_experts
    cell = RoutedExperts(config, first, n)
    for p, w in weights.items():
        getattr(cell, p).set_data(ms.Tensor(w[first:first + n]))
    return cell


def _balanced(rng, N, k, E):
    return np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32)


class _Graph(nn.Cell):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def construct(self, x, idx, w):
        return self.experts(x, idx, w)


@pytest.mark.parametrize("first,n", [(0, 16), (4, 4)])
def test_slotted_path_is_exact(first, n):
    config = _config()
    rng = np.random.default_rng(first)
    weights = _weights(config, rng)
    N, k = 96, 2
    cell = _experts(config, weights, first, n)
    capacity = cell.capacity(N * k)
    assert capacity < N, "this size must take the slotted path"
    x = rng.standard_normal((N, config.hidden_size)).astype(np.float32)
    idx = _balanced(rng, N, k, 16)
    assert np.bincount(idx.ravel(), minlength=16).max() <= capacity  # no fallback: the slots carry it
    w = rng.random((N, k)).astype(np.float32)
    want = experts_reference(x, idx, w, weights, first, n)
    args = (ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w))
    np.testing.assert_allclose(cell._slotted(*args, capacity).asnumpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cell._dense(*args).asnumpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ms.jit(_Graph(cell))(*args).asnumpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overload", ["double_slots", "dense"])
def test_overloaded_expert_stays_exact(overload):
    """An expert with more tokens than slots: twice the slots, or past that the dense path."""
    config = _config()
    rng = np.random.default_rng(7)
    weights = _weights(config, rng)
    N, k = 192, 2
    cell = _experts(config, weights)
    x = rng.standard_normal((N, config.hidden_size)).astype(np.float32)
    idx = _balanced(rng, N, k, 16)
    capacity = cell.capacity(N * k)
    assert 2 * capacity < N
    hot = capacity + 8 if overload == "double_slots" else 2 * capacity + 8
    idx[:hot, 0] = 5
    idx[:hot, 1] = np.where(idx[:hot, 1] == 5, 6, idx[:hot, 1])
    load = np.bincount(idx.ravel()).max()
    assert capacity < load and (load <= 2 * capacity) == (overload == "double_slots")
    w = rng.random((N, k)).astype(np.float32)
    want = experts_reference(x, idx, w, weights, 0, 16)
    got = ms.jit(_Graph(cell))(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_decode_path_reads_only_chosen_experts_exactly():
    config = _config()
    rng = np.random.default_rng(3)
    weights = _weights(config, rng)
    cell = _experts(config, weights, 8, 8)
    x = rng.standard_normal((3, config.hidden_size)).astype(np.float32)
    idx = _balanced(rng, 3, 2, 16)
    w = rng.random((3, 2)).astype(np.float32)
    got = ms.jit(_Graph(cell))(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy()
    np.testing.assert_allclose(got, experts_reference(x, idx, w, weights, 8, 8), rtol=1e-4, atol=1e-4)


def test_capacity_covers_a_balanced_load_with_margin():
    cell = RoutedExperts(_config(), 0, 16)
    for pairs in (32, 256, 1024, 8192):
        mean = pairs / 16
        cap = cell.capacity(pairs)
        assert cap % 8 == 0 and mean + 4 * mean ** 0.5 <= cap <= 2 * mean + 16


@pytest.mark.parametrize("first,n,N", [(0, 16, 1), (0, 16, 37), (4, 4, 96), (12, 4, 5)])
def test_native_cpu_kernel_is_exact(first, n, N):
    """The native CPU kernel (deepseek_ms/kernels): exact for any token count, on a full set
    of experts and on an expert-parallel slice (including tokens none of whose experts are
    local), in PyNative and in a compiled graph."""
    from deepseek_ms.kernels import cpu
    kernels = cpu.load()
    assert kernels is not None, "the CPU kernels must build on the test machines"
    config = _config()
    rng = np.random.default_rng(N)
    weights = _weights(config, rng)
    cell = _experts(config, weights, first, n)
    cell.use_kernels(kernels)
    x = rng.standard_normal((N, config.hidden_size)).astype(np.float32)
    idx = _balanced(rng, N, 2, 16)
    w = rng.random((N, 2)).astype(np.float32)
    want = experts_reference(x, idx, w, weights, first, n)
    args = (ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w))
    np.testing.assert_allclose(cell(*args).asnumpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ms.jit(_Graph(cell))(*args).asnumpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hidden,inter", [(64, 32), (60, 36)])
def test_native_cpu_kernel_reads_bf16_weights_exactly(hidden, inter):
    """bf16 expert weights (as the loader keeps a BF16 checkpoint's) give the result of the same
    values in fp32, each projection independently: bit for bit when the feature counts are
    multiples of the vector width, to rounding in the scalar tails otherwise, and to float32
    rounding where the bf16 products run on the tile unit (AMX: 8+ rows of an expert and
    feature counts that are multiples of 32), which sums them in another order."""
    from deepseek_ms.kernels import cpu
    kernels = cpu.load()
    assert kernels is not None, "the CPU kernels must build on the test machines"
    config = dataclasses.replace(_config(), hidden_size=hidden, moe_intermediate_size=inter)
    rng = np.random.default_rng(7)
    # values a bf16 holds exactly: float32s with their low 16 bits cleared
    weights = {p: (w.view(np.uint32) & 0xFFFF0000).view(np.float32) for p, w in _weights(config, rng).items()}
    N = 37
    x = rng.standard_normal((N, config.hidden_size)).astype(np.float32)
    idx = _balanced(rng, N, 2, 16)
    w = rng.random((N, 2)).astype(np.float32)
    args = (ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w))
    fp32 = _experts(config, weights)
    fp32.use_kernels(kernels)
    want = fp32(*args).asnumpy()
    np.testing.assert_allclose(want, experts_reference(x, idx, w, weights, 0, 16), rtol=1e-4, atol=1e-4)
    for bf16_projections in (("gate_proj", "up_proj", "down_proj"), ("up_proj",)):
        cell = _experts(config, weights)
        for p in bf16_projections:
            getattr(cell, p).set_dtype(ms.bfloat16)
            getattr(cell, p).set_data(ms.Tensor(weights[p]).astype(ms.bfloat16))
        cell.use_kernels(kernels)
        got = ms.jit(_Graph(cell))(*args).asnumpy()
        if hidden % 8 == 0 and inter % 8 == 0 and not (kernels.matrix_unit and hidden % 32 == 0):
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        cell.use_kernels(None)  # MindSpore's ops have no bf16 matmul on CPU: the weights are widened back
        assert {str(getattr(cell, p).dtype) for p in bf16_projections} == {"Float32"}
        np.testing.assert_allclose(cell(*args).asnumpy(), want, rtol=1e-5, atol=1e-5)
