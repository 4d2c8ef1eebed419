"""Semi-auto-parallel strategies: generated from parallel_config for every sharded op and
proven consistent by the checker (they execute only on Ascend/GPU)."""
import dataclasses

import pytest

ms = pytest.importorskip("mindspore")

from deepseek_ms.config import DeepseekConfig, ParallelConfig  # noqa: E402
from deepseek_ms.parallel.sharding import apply_strategies, check_strategies, model_strategies  # noqa: E402
from helpers import fixture_dir  # noqa: E402

LAYOUTS = [ParallelConfig(), ParallelConfig(model_parallel=2), ParallelConfig(data_parallel=2, expert_parallel=2),
           ParallelConfig(data_parallel=2, model_parallel=2, expert_parallel=4),
           ParallelConfig(data_parallel=4, model_parallel=4, expert_parallel=8)]


@pytest.fixture(scope="module", params=["deepseek_v3_tiny", "deepseek_v2_lite_tiny"])
def net(request):
    from deepseek_ms.model.transformer import DeepseekForCausalLM
    return DeepseekForCausalLM(DeepseekConfig.from_pretrained(str(fixture_dir(request.param))), 64)


@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: f"dp{c.data_parallel}mp{c.model_parallel}ep{c.expert_parallel}")
def test_generated_strategies_are_consistent(net, config):
    strategies = model_strategies(net, n_tokens=64)
    kinds = {s.name.rsplit(".", 2)[-2] for s in strategies}
    assert {"q_b_proj" if net.config.q_lora_rank else "q_proj", "kv_b_proj", "o_proj", "down_proj", "lm_head",
            "embed_tokens", "gate", "experts"} <= kinds
    assert check_strategies(strategies, config) == []


def test_checker_reports_each_kind_of_violation(net):
    strategies = model_strategies(net, n_tokens=64)
    assert any("does not split 3 ways" in p for p in check_strategies(strategies, ParallelConfig(model_parallel=3)))
    assert any("does not split" in p for p in check_strategies(model_strategies(net, n_tokens=6),
                                                                 ParallelConfig(data_parallel=4)))
    row = next(s for s in strategies if s.name.endswith("mlp.down_proj.matmul"))
    broken = [dataclasses.replace(s, inputs=(("dp", None), (None, "mp"))) if s is row else s for s in strategies]
    problems = check_strategies(broken, ParallelConfig(model_parallel=2))
    assert any(row.name in p and "contraction" in p for p in problems)
    assert any(row.name in p and "differs from" in p for p in problems)
    mixed = [dataclasses.replace(row, inputs=(("ep", "mp"), (None, "mp")))]
    assert any("mixes" in p for p in check_strategies(mixed, ParallelConfig(model_parallel=2)))


def test_strategies_set_on_the_primitives(net):
    config = ParallelConfig(data_parallel=2, model_parallel=2)
    strategies = model_strategies(net, n_tokens=64)
    n = apply_strategies(net, strategies, config)
    assert n == sum(s.name.endswith(".matmul") for s in strategies) > 0
    cells = dict(net.cells_and_names())
    assert cells["model.layers.0.mlp.down_proj"].matmul.in_strategy == ((2, 2), (1, 2))
    assert cells["lm_head"].matmul.in_strategy == ((2, 1), (2, 1))
