"""deepseek_ms.yaml_config: mindformers-style YAML -> RunConfig, and interop with mindformers."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from deepseek_ms.config import ConfigError, DeepseekConfig, ParallelConfig
from deepseek_ms.yaml_config import RunConfig, load_yaml_config, parse_cli_overrides
from helpers import load_in_mindformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML_DIR = os.path.join(REPO_ROOT, "yaml")
TINY_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "deepseek_v3_tiny")
SHIPPED = ["predict_deepseek_v3_671b.yaml", "predict_deepseek_r1_671b.yaml",
           "predict_deepseek_v2_lite.yaml", "predict_deepseek_v3_tiny.yaml"]

needs_tiny = pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_DIR, "config.json")),
                                reason="tests/fixtures/deepseek_v3_tiny/config.json not generated yet")


def shipped(name):
    return os.path.join(YAML_DIR, name)


def yarn_mscale(factor, m):
    return 0.1 * m * math.log(factor) + 1.0


# a small, valid DeepSeek-V3-style architecture (what a config.json holds)
SMALL_V3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "bfloat16",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "first_k_dense_replace": 1,
    "max_position_embeddings": 256,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
}


def small_doc(**top):
    """A minimal valid run YAML (as a dict) whose model_config defines the whole model."""
    doc = {
        "seed": 0,
        "run_mode": "predict",
        "use_parallel": False,
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "deepseek_v3"},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "expert_parallel": 1},
        "context": {"mode": 1, "device_target": "CPU"},
        "model": {"model_config": copy.deepcopy(SMALL_V3)},
    }
    doc.update(top)
    return doc


def write_yaml(path, doc):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w", encoding="utf-8") as f:
        if isinstance(doc, str):
            f.write(doc)
        else:
            yaml.safe_dump(doc, f, sort_keys=False)
    return str(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


# ---------------------------------------------------------------------------------------------
# shipped YAMLs
# ---------------------------------------------------------------------------------------------

def test_shipped_yamls_present():
    for name in SHIPPED:
        assert os.path.isfile(shipped(name)), name


def test_v3_671b_yaml():
    rc = load_yaml_config(shipped("predict_deepseek_v3_671b.yaml"))
    assert isinstance(rc, RunConfig)
    m = rc.model
    assert m.model_type == "deepseek_v3"
    assert (m.num_hidden_layers, m.hidden_size, m.intermediate_size, m.moe_intermediate_size) == (61, 7168, 18432, 2048)
    assert (m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank) == (128, 1536, 512)
    assert (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.vocab_size) == (128, 64, 128, 129280)
    assert (m.n_routed_experts, m.n_shared_experts, m.num_experts_per_tok) == (256, 1, 8)
    assert (m.n_group, m.topk_group, m.topk_method, m.scoring_func) == (8, 4, "noaux_tc", "sigmoid")
    assert m.norm_topk_prob is True and m.routed_scaling_factor == 2.5 and m.first_k_dense_replace == 3
    assert m.num_nextn_predict_layers == 1 and m.max_position_embeddings == 163840
    rs = m.rope_scaling
    assert (rs.factor, rs.mscale, rs.mscale_all_dim, rs.original_max_position_embeddings) == (40.0, 1.0, 1.0, 4096)
    assert m.quantization_config.quant_method == "fp8"
    assert m.quantization_config.weight_block_size == (128, 128)
    assert (m.compute_dtype, m.param_dtype) == ("bfloat16", "bfloat16")
    # DeepSeek's softmax scale includes YaRN's mscale(40, mscale_all_dim=1.0) squared
    expected = (128 + 64) ** -0.5 * yarn_mscale(40, 1.0) ** 2
    assert m.softmax_scale == pytest.approx(expected, rel=1e-12)
    assert m.softmax_scale > 1.8 * (192 ** -0.5)
    assert rc.parallel == ParallelConfig(data_parallel=1, model_parallel=32, expert_parallel=32, pipeline_stage=1)
    assert rc.context["device_target"] == "Ascend" and rc.context["mode"] == 0
    assert rc.runtime == {"layernorm_compute_dtype": "float32", "softmax_compute_dtype": "float32",
                          "rotary_dtype": "bfloat16", "seq_length": 4096, "max_decode_length": 1024,
                          "block_size": 128, "num_blocks": 512}
    assert rc.pretrained_model_dir == "/path/to/DeepSeek-V3"
    assert rc.load_checkpoint is None
    assert rc.model_config_json is None  # placeholder folder: model_config alone defines the model
    assert rc.run_mode == "predict" and rc.use_parallel is True and rc.seed == 0
    assert rc.output_dir == "./output"
    assert rc.raw["trainer"]["model_name"] == "deepseek_v3"
    assert rc.config_path == shipped("predict_deepseek_v3_671b.yaml")


def test_r1_yaml_has_the_v3_architecture():
    v3 = load_yaml_config(shipped("predict_deepseek_v3_671b.yaml"))
    r1 = load_yaml_config(shipped("predict_deepseek_r1_671b.yaml"))
    assert r1.model == v3.model
    assert r1.parallel == v3.parallel and r1.runtime == v3.runtime and r1.context == v3.context
    assert r1.pretrained_model_dir == "/path/to/DeepSeek-R1"


def test_v2_lite_yaml():
    rc = load_yaml_config(shipped("predict_deepseek_v2_lite.yaml"))
    m = rc.model
    assert m.model_type == "deepseek_v2"
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads) == (27, 2048, 16)
    assert m.q_lora_rank is None and m.kv_lora_rank == 512
    assert (m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts) == (64, 6, 2)
    assert (m.topk_method, m.scoring_func, m.norm_topk_prob) == ("greedy", "softmax", False)
    assert (m.first_k_dense_replace, m.moe_intermediate_size, m.intermediate_size) == (1, 1408, 10944)
    assert m.vocab_size == 102400 and m.routed_scaling_factor == 1.0
    assert m.max_position_embeddings == 163840
    rs = m.rope_scaling
    assert (rs.factor, rs.mscale, rs.mscale_all_dim, rs.original_max_position_embeddings) == (40.0, 0.707, 0.707, 4096)
    assert m.softmax_scale == pytest.approx(192 ** -0.5 * yarn_mscale(40, 0.707) ** 2, rel=1e-12)
    assert m.quantization_config is None
    assert (m.bos_token_id, m.eos_token_id) == (100000, 100001)
    assert rc.parallel == ParallelConfig()
    assert rc.use_parallel is False


@needs_tiny
def test_tiny_yaml_reads_the_fixture_config_json(tmp_path, monkeypatch):
    path = shipped("predict_deepseek_v3_tiny.yaml")
    expected = DeepseekConfig.from_pretrained(TINY_DIR, overrides={"compute_dtype": "float32",
                                                                   "param_dtype": "float32"})
    for cwd in (REPO_ROOT, str(tmp_path)):  # relative path: cwd first, else the repo root
        monkeypatch.chdir(cwd)
        rc = load_yaml_config(path)
        assert rc.pretrained_model_dir == TINY_DIR
        assert rc.model_config_json == os.path.join(TINY_DIR, "config.json")
        assert rc.model == expected
        assert rc.context["device_target"] == "CPU"
        assert (rc.model.compute_dtype, rc.model.param_dtype) == ("float32", "float32")
        assert rc.runtime["block_size"] == 16
    assert os.listdir(str(tmp_path)) == []  # loading writes nothing


def test_loading_imports_neither_mindspore_nor_mindformers(tmp_path):
    code = ("import sys, json\n"
            "from deepseek_ms.yaml_config import load_yaml_config\n"
            f"load_yaml_config({shipped('predict_deepseek_v2_lite.yaml')!r})\n"
            "print(json.dumps(['mindspore' in sys.modules, 'mindformers' in sys.modules]))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, False]
    assert os.listdir(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------
# precedence: config.json < model.model_config; relative paths
# ---------------------------------------------------------------------------------------------

def test_model_config_overrides_config_json(tmp_path):
    hf = tmp_path / "hf"
    write_json(hf / "config.json", SMALL_V3)
    doc = small_doc(pretrained_model_dir=str(hf))
    doc["model"]["model_config"] = {
        "num_hidden_layers": 2,                       # overrides the json
        "compute_dtype": "bf16", "params_dtype": "fp16",
        "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128},
        "seq_length": 64, "use_past": True,           # runtime keys
    }
    rc = load_yaml_config(write_yaml(tmp_path / "run.yaml", doc))
    assert rc.model_config_json == str(hf / "config.json")
    assert rc.model.num_hidden_layers == 2                   # from the YAML
    assert rc.model.hidden_size == 64 and rc.model.n_routed_experts == 8  # from config.json
    assert (rc.model.compute_dtype, rc.model.param_dtype) == ("bfloat16", "float16")
    # a YAML rope_scaling replaces the json's whole mapping (mindformers: dict.update)
    assert rc.model.rope_scaling.factor == 2.0
    assert rc.model.rope_scaling.original_max_position_embeddings == 128
    assert rc.model.rope_scaling.mscale_all_dim == 0.0
    assert rc.runtime == {"seq_length": 64, "use_past": True}


def test_config_json_alone_and_bad_config_json(tmp_path):
    hf = tmp_path / "hf"
    write_json(hf / "config.json", SMALL_V3)
    doc = small_doc(pretrained_model_dir=str(hf))
    del doc["model"]
    rc = load_yaml_config(write_yaml(tmp_path / "run.yaml", doc))
    assert rc.model == DeepseekConfig.from_pretrained(str(hf))

    write_json(hf / "config.json", dict(SMALL_V3, foo_key=1))
    with pytest.raises(ConfigError) as e:
        load_yaml_config(str(tmp_path / "run.yaml"))
    assert "foo_key" in str(e.value) and "config.json" in str(e.value) and "run.yaml" in str(e.value)

    with open(str(hf / "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_yaml_config(str(tmp_path / "run.yaml"))


def test_missing_pretrained_dir_falls_back_to_model_config(tmp_path):
    doc = small_doc(pretrained_model_dir=str(tmp_path / "absent"))
    rc = load_yaml_config(write_yaml(tmp_path / "run.yaml", doc))
    assert rc.model_config_json is None and rc.model.num_hidden_layers == 3
    assert rc.pretrained_model_dir == str(tmp_path / "absent")

    del doc["model"]["model_config"]["model_type"]
    path = write_yaml(tmp_path / "run.yaml", doc)
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path)
    assert path in str(e.value) and "model_type" in str(e.value) and "config.json" in str(e.value)


def test_relative_paths_resolve_cwd_first_then_yaml_parent(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    write_json(proj / "ckpt" / "m" / "config.json", SMALL_V3)
    doc = small_doc(pretrained_model_dir="ckpt/m", load_checkpoint="ckpt/m/weights")
    del doc["model"]
    path = write_yaml(proj / "yaml" / "run.yaml", doc)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(str(elsewhere))
    rc = load_yaml_config(path)
    assert rc.pretrained_model_dir == str(proj / "ckpt" / "m")  # parent of the yaml's folder
    assert rc.load_checkpoint == str(proj / "ckpt" / "m" / "weights")
    assert rc.model.num_hidden_layers == 3

    write_json(elsewhere / "ckpt" / "m" / "config.json", dict(SMALL_V3, num_hidden_layers=5))
    rc = load_yaml_config(path)
    assert rc.pretrained_model_dir == str(elsewhere / "ckpt" / "m")  # the cwd wins when it exists
    assert rc.model.num_hidden_layers == 5

    rc = load_yaml_config(path, {"load_checkpoint": "", "pretrained_model_dir": str(proj / "ckpt" / "m")})
    assert rc.load_checkpoint is None and rc.model.num_hidden_layers == 3


# ---------------------------------------------------------------------------------------------
# dotted overrides and base_config
# ---------------------------------------------------------------------------------------------

def test_dotted_overrides():
    path = shipped("predict_deepseek_v2_lite.yaml")
    with open(path, "rb") as f:
        before = f.read()
    rc = load_yaml_config(path, {
        "parallel_config.model_parallel": 2, "use_parallel": True,
        "model.model_config.num_hidden_layers": 4, "model.model_config.seq_length": 2048,
        "context.device_target": "CPU", "serve.port": 8500, "model.model_config.kernels": "mindspore",
    })
    assert rc.parallel.model_parallel == 2 and rc.parallel.data_parallel == 1
    assert rc.use_parallel is True
    assert rc.model.num_hidden_layers == 4 and rc.model.hidden_size == 2048
    assert rc.runtime["seq_length"] == 2048 and rc.runtime["block_size"] == 128
    assert rc.runtime["kernels"] == "mindspore"
    assert rc.context["device_target"] == "CPU" and rc.context["max_device_memory"] == "58GB"
    assert rc.serve == {"port": 8500}
    assert rc.raw["parallel_config"]["model_parallel"] == 2 and rc.raw["serve"] == {"port": 8500}
    with open(path, "rb") as f:
        assert f.read() == before


def test_parse_cli_overrides():
    got = parse_cli_overrides(["parallel_config.model_parallel=2", "use_parallel=True", "a.b=null",
                               "l=[1, 2]", "s=abc", "p=/x/y=z", "e="])
    assert got == {"parallel_config.model_parallel": 2, "use_parallel": True, "a.b": None,
                   "l": [1, 2], "s": "abc", "p": "/x/y=z", "e": ""}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_cli_overrides(["model_parallel"])


@pytest.mark.parametrize("overrides,fragments", [
    ({"seed.x": 1}, ["seed.x", "'seed' is int, not a mapping"]),
    ({"foo.bar": 1}, ["with overrides", "unknown top-level section 'foo'"]),
    ({"parallel_config.model_parallel": 0}, ["with overrides", "model_parallel", "positive integer"]),
    ({"base_config": "x.yaml"}, ["base_config"]),
    ({"a..b": 1}, ["a..b"]),
])
def test_bad_overrides(tmp_path, overrides, fragments):
    path = write_yaml(tmp_path / "run.yaml", small_doc())
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path, overrides)
    for frag in fragments:
        assert frag in str(e.value)


def test_base_config_inheritance(tmp_path):
    base = small_doc(seed=7)
    base["parallel_config"] = {"data_parallel": 2, "model_parallel": 1, "expert_parallel": 2}
    write_yaml(tmp_path / "common" / "base.yaml", base)
    child = {"base_config": "common/base.yaml",
             "parallel_config": {"model_parallel": 2},                # merged into the base's mapping
             "model": {"model_config": {"num_hidden_layers": 2}}}
    rc = load_yaml_config(write_yaml(tmp_path / "child.yaml", child))
    assert rc.parallel == ParallelConfig(data_parallel=2, model_parallel=2, expert_parallel=2)
    assert rc.seed == 7 and rc.model.num_hidden_layers == 2 and rc.model.hidden_size == 64
    assert "base_config" not in rc.raw

    # a list of bases combines top-level key by key (a later base replaces a whole section)
    write_yaml(tmp_path / "b1.yaml", small_doc(seed=1, context={"device_target": "CPU", "device_id": 3}))
    write_yaml(tmp_path / "b2.yaml", {"context": {"mode": 0}})
    rc = load_yaml_config(write_yaml(tmp_path / "multi.yaml", {"base_config": ["b1.yaml", "b2.yaml"], "seed": 2}))
    assert rc.seed == 2 and rc.context == {"mode": 0, "device_target": "CPU", "device_id": 0}


def test_base_config_errors(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"base_config": "b.yaml", "seed": 1})
    write_yaml(tmp_path / "b.yaml", {"base_config": "a.yaml", "seed": 2})
    with pytest.raises(ConfigError, match="base_config' inheritance loops"):
        load_yaml_config(str(tmp_path / "a.yaml"))
    path = write_yaml(tmp_path / "c.yaml", {"base_config": "nope.yaml"})
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path)
    assert path in str(e.value) and "'base_config' file 'nope.yaml' not found" in str(e.value)
    path = write_yaml(tmp_path / "d.yaml", {"base_config": 5})
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path)
    assert path in str(e.value) and "'base_config' must be" in str(e.value)
    # an error inside a base names the base file
    write_yaml(tmp_path / "bad_base.yaml", "seed: [1\n")
    path = write_yaml(tmp_path / "e.yaml", {"base_config": "bad_base.yaml"})
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path)
    assert "bad_base.yaml:" in str(e.value) and "malformed YAML" in str(e.value)


# ---------------------------------------------------------------------------------------------
# errors name the file and the key
# ---------------------------------------------------------------------------------------------

def _mutate(fn):
    doc = small_doc()
    fn(doc)
    return doc


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def fn(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return fn


def _del_model_type(doc):
    del doc["model"]["model_config"]["model_type"]


ERROR_CASES = {
    # YAML syntax / shape
    "unclosed_flow": ("seed: 0\nmodel:\n  model_config: {hidden_size: 4\nrun_mode: predict\n",
                      ["malformed YAML"]),
    "bad_indent": ("seed: 0\n  run_mode: predict\n", [":2:", "malformed YAML"]),
    "top_level_list": ("- seed\n- run_mode\n", ["top level must be a mapping", "list"]),
    "top_level_scalar": ("just a string\n", ["top level must be a mapping", "str"]),
    "empty": ("", ["empty"]),
    "duplicate_key": ("seed: 0\nrun_mode: predict\nseed: 1\n", [":3:", "duplicate key 'seed'", "line 1"]),
    # sections
    "unknown_section": (_mutate(_set("foo_section", {"a": 1})), ["unknown top-level section 'foo_section'"]),
    "unknown_model_key": (_mutate(_set("model", "archx", {})), ["'model.archx'"]),
    "model_config_not_mapping": (_mutate(_set("model", "model_config", [1, 2])), ["'model.model_config' must be a mapping"]),
    "model_not_mapping": (_mutate(_set("model", "x")), ["'model' must be a mapping"]),
    "unknown_model_config_key": (_mutate(_set("model", "model_config", "hiden_size", 64)),
                                 ["'model.model_config.hiden_size'"]),
    "no_model_type": (_mutate(_del_model_type), ["model_type"]),
    "arch_value": (_mutate(_set("model", "model_config", "n_group", 3)), ["model.model_config", "'n_group'"]),
    "rope_key": (_mutate(_set("model", "model_config", "rope_scaling", "foo", 1)), ["rope_scaling.foo"]),
    "both_param_dtypes": (_mutate(lambda d: d["model"]["model_config"].update(params_dtype="fp16", param_dtype="fp16")),
                          ["params_dtype", "param_dtype"]),
    "compute_dtype": (_mutate(_set("model", "model_config", "compute_dtype", "int8")),
                      ["'model.model_config.compute_dtype'", "int8"]),
    "runtime_int": (_mutate(_set("model", "model_config", "block_size", -1)), ["'model.model_config.block_size'"]),
    "runtime_bool": (_mutate(_set("model", "model_config", "use_past", "maybe")), ["'model.model_config.use_past'"]),
    "runtime_dtype": (_mutate(_set("model", "model_config", "rotary_dtype", "float64")),
                      ["'model.model_config.rotary_dtype'"]),
    "kernels": (_mutate(_set("model", "model_config", "kernels", "native")),
                ["'model.model_config.kernels'", "auto, mindspore", "native"]),
    # parallel_config
    "parallel_unknown": (_mutate(_set("parallel_config", "foo_parallel", 2)), ["'parallel_config.foo_parallel'"]),
    "parallel_zero": (_mutate(_set("parallel_config", "model_parallel", 0)), ["parallel_config", "'model_parallel'"]),
    "parallel_str": (_mutate(_set("parallel_config", "data_parallel", "2")), ["parallel_config", "'data_parallel'"]),
    "parallel_not_mapping": (_mutate(_set("parallel_config", 4)), ["'parallel_config' must be a mapping"]),
    "mp_vs_heads": (_mutate(_set("parallel_config", "model_parallel", 3)),
                    ["'parallel_config.model_parallel'", "num_attention_heads"]),
    "ep_vs_devices": (_mutate(_set("parallel_config", "expert_parallel", 2)),
                      ["'parallel_config.expert_parallel'", "data_parallel * model_parallel"]),
    "ep_vs_experts": (_mutate(lambda d: d["parallel_config"].update(data_parallel=3, expert_parallel=3)),
                      ["'parallel_config.expert_parallel'", "n_routed_experts"]),
    "context_parallel": (_mutate(_set("parallel_config", "context_parallel", 2)), ["'parallel_config.context_parallel'"]),
    # general keys and context
    "device_target": (_mutate(_set("context", "device_target", "TPU")), ["'context.device_target'", "TPU"]),
    "context_mode": (_mutate(_set("context", "mode", 3)), ["'context.mode'"]),
    "run_mode": (_mutate(_set("run_mode", "serve")), ["'run_mode'", "serve"]),
    "use_parallel": (_mutate(_set("use_parallel", "True")), ["'use_parallel'"]),
    "seed": (_mutate(_set("seed", "abc")), ["'seed'"]),
    "pretrained_type": (_mutate(_set("pretrained_model_dir", 5)), ["'pretrained_model_dir'"]),
    "serve_not_mapping": (_mutate(_set("serve", [1])), ["'serve' must be a mapping"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_file_and_key(tmp_path, case):
    doc, fragments = ERROR_CASES[case]
    path = write_yaml(tmp_path / "bad.yaml", doc)
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path)
    msg = str(e.value)
    assert path in msg, msg
    for frag in fragments:
        assert frag in msg, msg


def test_malformed_yaml_reports_line_and_column(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "seed: 0\nrun_mode: predict\ncontext: [CPU\nmodel: {}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_config(path)
    import re
    assert re.search(re.escape(path) + r":\d+:\d+: malformed YAML", str(e.value)), str(e.value)


def test_missing_yaml_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no such YAML file") as e:
        load_yaml_config(path)
    assert path in str(e.value)


def test_known_mindformers_sections_are_accepted(tmp_path):
    doc = small_doc(
        output_dir="./out", load_ckpt_format="safetensors", auto_trans_ckpt=False, resume_training=False,
        use_legacy=False, runner_config={"batch_size": 1}, moe_config={"expert_num": 8},
        processor={"return_tensors": "ms"}, callbacks=[{"type": "MFLossMonitor"}],
        recompute_config={"recompute": False}, profile=False, profile_start_step=1,
        src_strategy_path_or_dir="", only_save_strategy=False, layer_scale=False, layer_decay=0.65,
        micro_batch_interleave_num=1, generation_config={"max_new_tokens": 8}, do_eval=False,
        parallel={"parallel_mode": "MANUAL_PARALLEL"}, monitor_config={"monitor_on": False},
        serve={"port": 8500, "max_batch_size": 4},
    )
    doc["parallel_config"].update(micro_batch_num=1, use_seq_parallel=False, vocab_emb_dp=True,
                                  context_parallel=1, gradient_aggregation_group=4)
    rc = load_yaml_config(write_yaml(tmp_path / "run.yaml", doc))
    assert rc.serve == {"port": 8500, "max_batch_size": 4}
    assert rc.output_dir == "./out"
    assert rc.parallel == ParallelConfig()


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    text = (yaml.safe_dump(small_doc(), sort_keys=False)
            + "train_dataset: &ds {batch_size: 1, shuffle: true}\n"
            + "train_dataset_task: {type: CausalLanguageModelDataset, dataset_config: *ds}\n"
            + "eval_dataset:\n  <<: *ds\n  batch_size: 2\n")
    rc = load_yaml_config(write_yaml(tmp_path / "run.yaml", text))
    assert rc.raw["train_dataset_task"]["dataset_config"] == {"batch_size": 1, "shuffle": True}
    assert rc.raw["eval_dataset"] == {"batch_size": 2, "shuffle": True}


def test_run_config_is_frozen():
    rc = load_yaml_config(shipped("predict_deepseek_v2_lite.yaml"))
    with pytest.raises(Exception):
        rc.seed = 3


# ---------------------------------------------------------------------------------------------
# interop: the same files in mindformers' MindFormerConfig
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    """Load every shipped YAML (plus override / base_config cases) in MindFormerConfig, once."""
    work = tmp_path_factory.mktemp("mf_interop")
    cwd = work / "cwd"  # mindformers writes ./output/log on import: keep it in a temp dir
    cwd.mkdir()
    jobs = []
    for name in SHIPPED:
        job = {"name": name, "path": shipped(name), "overrides": None}
        if name == "predict_deepseek_v3_tiny.yaml":
            if not os.path.isfile(os.path.join(TINY_DIR, "config.json")):
                continue
            job["merge_dir"] = TINY_DIR
        jobs.append(job)
    jobs.append({"name": "overrides", "path": shipped("predict_deepseek_v2_lite.yaml"),
                 "overrides": {"parallel_config.model_parallel": 2, "model.model_config.seq_length": 2048,
                               "model.model_config.num_hidden_layers": 4, "use_parallel": True}})
    base = yaml.safe_load(open(shipped("predict_deepseek_v2_lite.yaml"), encoding="utf-8"))
    write_yaml(work / "base" / "b1.yaml", base)
    write_yaml(work / "base" / "b2.yaml", {"context": {"mode": 1, "device_target": "CPU"}, "seed": 5})
    child = write_yaml(work / "child.yaml", {"base_config": ["base/b1.yaml", "base/b2.yaml"],
                                             "parallel_config": {"model_parallel": 2},
                                             "model": {"model_config": {"num_hidden_layers": 3}},
                                             "serve": {"port": 8500}})
    jobs.append({"name": "base_config", "path": child, "overrides": None})

    keys = ("parallel_config", "context", "run_mode", "seed", "use_parallel", "pretrained_model_dir",
            "load_checkpoint", "serve", "merged")
    results = [dict({k: d.get(k) for k in keys}, model_config=d.get("model", {}).get("model_config", {}))
               for d in load_in_mindformers(jobs, cwd)]
    return {job["name"]: (job, res) for job, res in zip(jobs, results)}


def _ours(job):
    return load_yaml_config(job["path"], job["overrides"])


def _agree_general(mf, rc):
    for key in ("data_parallel", "model_parallel", "expert_parallel", "pipeline_stage"):
        assert mf["parallel_config"][key] == getattr(rc.parallel, key), key
    assert mf["run_mode"] == rc.run_mode
    assert mf["use_parallel"] == rc.use_parallel
    assert mf["seed"] == rc.seed
    for key in ("mode", "device_target", "device_id"):
        assert mf["context"][key] == rc.context[key], key


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "predict_deepseek_v3_tiny.yaml"])
def test_mindformers_loads_shipped_yaml_and_agrees(interop, name):
    job, mf = interop[name]
    rc = _ours(job)
    _agree_general(mf, rc)
    mc = mf["model_config"]
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "q_lora_rank",
                "kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                "topk_method", "routed_scaling_factor", "first_k_dense_replace", "vocab_size"):
        assert mc[key] == getattr(rc.model, key), key
    assert mc["rope_scaling"]["factor"] == rc.model.rope_scaling.factor
    assert mc["rope_scaling"]["mscale_all_dim"] == rc.model.rope_scaling.mscale_all_dim
    assert mc["compute_dtype"] == rc.model.compute_dtype and mc["params_dtype"] == rc.model.param_dtype
    for key in ("seq_length", "block_size", "num_blocks", "layernorm_compute_dtype", "rotary_dtype"):
        assert mc[key] == rc.runtime[key], key
    assert mf["pretrained_model_dir"] == rc.pretrained_model_dir


@needs_tiny
def test_mindformers_merges_tiny_config_json_like_us(interop):
    job, mf = interop["predict_deepseek_v3_tiny.yaml"]
    rc = _ours(job)
    _agree_general(mf, rc)
    merged = mf["merged"]  # mindformers' merge_model_config(pretrained_model_dir, model_config)
    for key in ("model_type", "num_hidden_layers", "hidden_size", "q_lora_rank", "n_routed_experts",
                "n_group", "topk_group", "num_nextn_predict_layers", "vocab_size"):
        assert merged[key] == getattr(rc.model, key), key
    assert merged["compute_dtype"] == rc.model.compute_dtype == "float32"
    assert merged["params_dtype"] == rc.model.param_dtype == "float32"
    assert merged["block_size"] == rc.runtime["block_size"]


def test_mindformers_agrees_on_dotted_overrides(interop):
    job, mf = interop["overrides"]
    rc = _ours(job)
    _agree_general(mf, rc)
    assert mf["parallel_config"]["model_parallel"] == rc.parallel.model_parallel == 2
    assert mf["model_config"]["num_hidden_layers"] == rc.model.num_hidden_layers == 4
    assert mf["model_config"]["seq_length"] == rc.runtime["seq_length"] == 2048
    assert mf["use_parallel"] is rc.use_parallel is True


def test_mindformers_agrees_on_base_config_and_serve_section(interop):
    job, mf = interop["base_config"]
    rc = _ours(job)
    _agree_general(mf, rc)
    assert rc.parallel.model_parallel == 2 and rc.parallel.data_parallel == 1
    assert rc.seed == 5 and rc.context["device_target"] == "CPU" and rc.context["mode"] == 1
    assert mf["model_config"]["num_hidden_layers"] == rc.model.num_hidden_layers == 3
    assert mf["model_config"]["hidden_size"] == rc.model.hidden_size == 2048
    assert mf["serve"] == rc.serve == {"port": 8500}  # mindformers keeps (and warns about) unknown sections
