"""DeepseekConfig: every key of the official configs, derived sizes, and errors that name the key."""
import json

import pytest

from deepseek_ms.config import ConfigError, DeepseekConfig, ParallelConfig
from helpers import FIXTURES

CONFIGS = FIXTURES / "configs"


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_r1", "deepseek_v3_1", "deepseek_v2", "deepseek_v2_lite"])
def test_official_configs_load(name):
    cfg = DeepseekConfig.from_json(str(CONFIGS / f"{name}.json"))
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "num_experts_per_tok", "first_k_dense_replace", "topk_method", "routed_scaling_factor"):
        assert getattr(cfg, key) == raw[key]
    assert cfg.q_lora_rank == raw["q_lora_rank"]
    assert cfg.latent_dim == raw["kv_lora_rank"] + raw["qk_rope_head_dim"]


def test_v3_details():
    cfg = DeepseekConfig.from_json(str(CONFIGS / "deepseek_v3.json"))
    assert cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid" and cfg.norm_topk_prob
    assert cfg.quantization_config.weight_block_size == (128, 128)
    assert cfg.quantization_config.scale_fmt is None
    assert cfg.num_nextn_predict_layers == 1
    # (nope+rope)^-0.5 * mscale(40, 1.0)^2
    m = 0.1 * 1.0 * __import__("math").log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]


def test_v31_ue8m0_and_v2_lite_plain_query():
    assert DeepseekConfig.from_json(str(CONFIGS / "deepseek_v3_1.json")).quantization_config.scale_fmt == "ue8m0"
    lite = DeepseekConfig.from_json(str(CONFIGS / "deepseek_v2_lite.json"))
    assert lite.q_lora_rank is None and lite.topk_method == "greedy"
    m = 0.1 * 0.707 * __import__("math").log(40) + 1
    assert lite.softmax_scale == pytest.approx(192 ** -0.5 * m * m)  # V2 gets the mscale^2 too


def _v3(**changes):
    raw = json.loads((CONFIGS / "deepseek_v3.json").read_text())
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, key", [
    ({"model_type": "llama"}, "model_type"),
    ({"topk_method": "random"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"scoring_func": "softmax"}, "scoring_func"),          # noaux_tc needs sigmoid
    ({"n_group": 7}, "n_group"),                            # 256 % 7
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"first_k_dense_replace": 99}, "first_k_dense_replace"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_key": 1}, "some_new_key"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "bogus": 1}}, "rope_scaling.bogus"),
    ({"rope_scaling": {"type": "yarn", "factor": "big"}}, "rope_scaling.factor"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
    ({"quantization_config": {"quant_method": "fp8", "scale_fmt": "e5m2"}}, "quantization_config.scale_fmt"),
])
def test_bad_values_name_the_key(changes, key):
    with pytest.raises(ConfigError) as e:
        DeepseekConfig.from_dict(_v3(**changes), source="cfg.json")
    assert f"'{key}'" in str(e.value) and "cfg.json" in str(e.value)


def test_missing_model_type_and_bad_json(tmp_path):
    raw = _v3()
    del raw["model_type"]
    with pytest.raises(ConfigError, match="model_type"):
        DeepseekConfig.from_dict(raw)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekConfig.from_pretrained(str(tmp_path))


def test_round_trip_through_to_dict():
    cfg = DeepseekConfig.from_json(str(CONFIGS / "deepseek_v3_1.json"))
    assert DeepseekConfig.from_dict(cfg.to_dict()) == cfg


def test_parallel_config():
    p = ParallelConfig.from_dict({"data_parallel": 2, "model_parallel": 4, "expert_parallel": 8,
                                  "micro_batch_num": 1})
    assert (p.data_parallel, p.model_parallel, p.expert_parallel, p.world_size) == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match="'model_parallel'"):
        ParallelConfig.from_dict({"model_parallel": 0})
    with pytest.raises(ConfigError, match="'foo_parallel'"):
        ParallelConfig.from_dict({"foo_parallel": 2})


def test_v2_config_without_router_keys_gets_v2_defaults():
    raw = json.loads((CONFIGS / "deepseek_v2_lite.json").read_text())
    for key in ("topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group"):
        raw.pop(key)
    cfg = DeepseekConfig.from_dict(raw)
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor) == \
        ("greedy", "softmax", False, 1.0)
