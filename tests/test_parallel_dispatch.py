"""The AlltoAll expert-parallel dispatch plan, run on CPU against a simulated communicator
(CPU has no AlltoAll kernel), and the layout's rank groups."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from deepseek_ms.config import ConfigError, ParallelConfig  # noqa: E402
from deepseek_ms.parallel.ep_dispatch import dispatch_plan, pack, unpack  # noqa: E402
from deepseek_ms.parallel.layout import build_layout, rank_groups  # noqa: E402
from helpers import fixture_dir  # noqa: E402


def all_to_all(buffers):
    """Equal-split AlltoAll over simulated ranks: rank r receives block r of every sender,
    concatenated in sender order."""
    ep = len(buffers)
    blocks = [np.split(b, ep, axis=0) for b in buffers]
    return [np.concatenate([blocks[s][r] for s in range(ep)], axis=0) for r in range(ep)]


def random_routing(rng, N, k, E):
    return np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32)


@pytest.mark.parametrize("ep,N,k,E", [(2, 5, 2, 8), (4, 7, 3, 8), (4, 1, 2, 16), (1, 4, 2, 4)])
def test_dispatch_is_an_exact_permutation_and_recovers(ep, N, k, E):
    rng = np.random.default_rng(ep * 100 + N)
    n_local = E // ep
    xs = [rng.standard_normal((N, 6)).astype(np.float32) for _ in range(ep)]
    idxs = [random_routing(rng, N, k, E) for _ in range(ep)]
    ws = [rng.random((N, k)).astype(np.float32) for _ in range(ep)]
    plans = [dispatch_plan(ms.Tensor(i), E, ep) for i in idxs]  # (expert_counts, send_counts, slot, source)
    packed = [pack(ms.Tensor(x), ms.Tensor(i), p[3]) for x, i, p in zip(xs, idxs, plans)]
    recv_rows = all_to_all([r.asnumpy() for r, _ in packed])
    recv_ids = all_to_all([e.asnumpy() for _, e in packed])
    cap = N * k
    for r in range(ep):
        for s in range(ep):
            rows = recv_rows[r][s * cap:(s + 1) * cap]
            ids = recv_ids[r][s * cap:(s + 1) * cap]
            flat = idxs[s].reshape(-1)
            # exactly the (token, choice) rows of sender s routed to rank r's experts, by expert then row
            mine = [m for m in range(N * k) if flat[m] // n_local == r]
            mine.sort(key=lambda m: (flat[m], m))
            n = len(mine)
            assert int(plans[s][1].asnumpy()[r]) == n
            np.testing.assert_array_equal(ids[:n], flat[mine])
            np.testing.assert_array_equal(rows[:n], xs[s][np.array(mine, dtype=int) // k])
            assert (ids[n:] == -1).all() and not rows[n:].any()
        np.testing.assert_array_equal(plans[r][0].asnumpy(), np.bincount(idxs[r].reshape(-1), minlength=E))
    # each owner "computes" expert e as a distinct function and sends the rows back
    scale = np.arange(1, E + 1, dtype=np.float32)
    results = [rows * np.where(ids >= 0, scale[np.maximum(ids, 0)], 0)[:, None]
               for rows, ids in zip(recv_rows, recv_ids)]
    back = all_to_all(results)
    for s in range(ep):
        out = unpack(ms.Tensor(back[s]), ms.Tensor(ws[s]), plans[s][2]).asnumpy()
        expected = (ws[s] * scale[idxs[s]]).sum(1, keepdims=True) * xs[s]
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_alltoall_path_matches_replicated_allreduce_path():
    """The device path (dispatch, local experts, combine) and the CPU path (every rank runs
    its experts on all tokens, partial sums added) give the single-rank MoE output."""
    from deepseek_ms.config import DeepseekConfig
    from deepseek_ms.model.moe import RoutedExperts

    config = DeepseekConfig.from_pretrained(str(fixture_dir("deepseek_v2_lite_tiny")))
    E, k, H, I = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
    N, ep = 6, 4
    rng = np.random.default_rng(0)
    weights = {p: rng.standard_normal(s).astype(np.float32) * 0.3
               for p, s in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)))}

    def experts(first, n):
        cell = RoutedExperts(config, first, n)
        for p, w in weights.items():
            getattr(cell, p).set_data(ms.Tensor(w[first:first + n]))
        return cell

    x = rng.standard_normal((N, H)).astype(np.float32)
    idx = random_routing(rng, N, k, E)
    w = rng.random((N, k)).astype(np.float32)
    full = experts(0, E)(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy()

    ranks = [experts(r * E // ep, E // ep) for r in range(ep)]
    replicated = sum(c(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy() for c in ranks)
    np.testing.assert_allclose(replicated, full, rtol=1e-5, atol=1e-6)

    # every simulated rank routes the same tokens here, so each gets the full output back
    _, _, slot, source = dispatch_plan(ms.Tensor(idx), E, ep)
    rows, ids = pack(ms.Tensor(x), ms.Tensor(idx), source)
    recv_rows = all_to_all([rows.asnumpy()] * ep)
    recv_ids = all_to_all([ids.asnumpy()] * ep)
    outs = [c(ms.Tensor(r), ms.Tensor(np.maximum(i, 0)[:, None]), ms.Tensor((i >= 0).astype(np.float32)[:, None]))
            .asnumpy() for c, r, i in zip(ranks, recv_rows, recv_ids)]
    back = all_to_all(outs)
    for b in back:
        np.testing.assert_allclose(unpack(ms.Tensor(b), ms.Tensor(w), slot).asnumpy(), full,
                                   rtol=1e-5, atol=1e-6)


def test_rank_groups_follow_tp_ep_pp_dp_order():
    g = rank_groups(ParallelConfig(data_parallel=2, model_parallel=2, expert_parallel=2))
    assert g["tp"] == [[0, 1], [2, 3]] and g["dp"] == [[0, 2], [1, 3]]
    assert g["moe_tp"] == [[0, 1], [2, 3]] and g["ep"] == [[0, 2], [1, 3]] and g["moe"] == [[0, 1, 2, 3]]
    g = rank_groups(ParallelConfig(model_parallel=4, expert_parallel=4))
    assert g["ep"] == [[0, 1, 2, 3]] and g["moe_tp"] == [[0], [1], [2], [3]]


def test_layout_groups_cover_every_expert_slice_once():
    for cfg in (ParallelConfig(model_parallel=2), ParallelConfig(model_parallel=2, expert_parallel=2),
                ParallelConfig(data_parallel=2, model_parallel=2, expert_parallel=2),
                ParallelConfig(data_parallel=4, model_parallel=2, expert_parallel=4)):
        created = {}
        layouts = [build_layout(cfg, r, cfg.world_size, lambda n, ranks: created.setdefault(n, ranks))
                   for r in range(cfg.world_size)]
        slices = {(lay.experts.ep.rank, lay.experts.moe_tp.rank) for lay in layouts}
        assert len(slices) == cfg.world_size == cfg.expert_parallel * layouts[0].experts.moe_tp.size
        assert all(len(ranks) < cfg.world_size for ranks in created.values())  # the world group is never created
        for name, ranks in created.items():
            assert name.endswith("-".join(map(str, ranks)))


def test_layout_rejects_what_it_cannot_run():
    with pytest.raises(ConfigError, match="expert_parallel"):
        build_layout(ParallelConfig(model_parallel=2, expert_parallel=4), 0, 2)
    with pytest.raises(ConfigError, match="pipeline_stage"):
        build_layout(ParallelConfig(pipeline_stage=2), 0, 2)
    with pytest.raises(ConfigError, match="msrun --worker_num=4"):
        build_layout(ParallelConfig(model_parallel=4), 0, 2)


def test_parallel_model_outside_msrun_says_how_to_launch():
    import deepseek_ms
    with pytest.raises(ConfigError, match="launch under msrun"):
        deepseek_ms.load_model(str(fixture_dir("deepseek_v3_tiny")), parallel_config={"model_parallel": 2},
                               progress=False)


def test_device_path_compiles_in_a_graph():
    """The plan, pack and unpack run inside ms.jit as they would on a device; with one
    expert-parallel rank AlltoAll is the identity, so the result must be the MoE output."""
    from mindspore import nn, ops

    from deepseek_ms.config import DeepseekConfig
    from deepseek_ms.model.moe import RoutedExperts

    config = DeepseekConfig.from_pretrained(str(fixture_dir("deepseek_v2_lite_tiny")))
    E, k, H = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    rng = np.random.default_rng(1)
    experts = RoutedExperts(config)
    for p in ("gate_proj", "up_proj", "down_proj"):
        param = getattr(experts, p)
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def construct(self, x, idx, w):
            _, _, slot, source = dispatch_plan(idx, E, 1)
            rows, ids = pack(x, idx, source)
            valid = ids >= 0
            y = self.experts(rows, ops.select(valid, ids, ops.zeros_like(ids)).expand_dims(-1),
                             valid.astype(ms.float32).expand_dims(-1))
            return unpack(y, w, slot)

    x = rng.standard_normal((5, H)).astype(np.float32)
    idx = random_routing(rng, 5, k, E)
    w = rng.random((5, k)).astype(np.float32)
    out = ms.jit(Step())(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy()
    np.testing.assert_allclose(out, experts(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy(),
                               rtol=1e-5, atol=1e-5)
