"""Loading streams tensor by tensor: peak RSS growth stays within 1.3x the model's size."""
import json
import os
import subprocess
import sys

import numpy as np

from deepseek_ms.checkpoint import write_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(model_type="deepseek_v3", vocab_size=8000, hidden_size=384, intermediate_size=1024,
              moe_intermediate_size=384, num_hidden_layers=8, num_attention_heads=8, q_lora_rank=192,
              kv_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
              n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
              max_position_embeddings=1024)


def _write_random_checkpoint(folder):
    """Every tensor the model expects, random, stored bf16 in two shards."""
    from deepseek_ms.api import CausalLM
    from deepseek_ms.checkpoint.hf_loader import weight_rules
    from deepseek_ms.config import DeepseekConfig

    rules = weight_rules(CausalLM(DeepseekConfig.from_dict(CONFIG), 256).net)
    rng = np.random.default_rng(0)
    names = sorted(rules)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {n: rng.standard_normal(rules[n].shape, dtype=np.float32) * 0.02 for n in shard}
        write_safetensors(os.path.join(folder, file), tensors, dtypes={n: "BF16" for n in shard})
        weight_map.update({n: file for n in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f)


def test_peak_rss_while_loading_is_at_most_1_3x_model_size(tmp_path):
    _write_random_checkpoint(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.join(HERE, "load_memory_probe.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model_bytes"] > 100 * 2 ** 20
    ratio = result["peak_growth"] / result["model_bytes"]
    assert ratio <= 1.3, f"peak RSS grew {ratio:.2f}x the model size while loading"
