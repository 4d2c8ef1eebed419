"""Write a trained network as an HF DeepSeek folder that `load_model` and transformers read.

Tensor names come from the loader's own rules (`checkpoint.hf_loader.weight_rules`), so
export and load cannot drift apart. Weights are stored in bf16 (as DeepSeek ships them),
except the router's `e_score_correction_bias`, which stays fp32 like in the official
checkpoints: its updates are far below bf16 resolution around the bias values.
"""
from __future__ import annotations

import json
import os
import shutil

from ..checkpoint import write_safetensors
from ..checkpoint.hf_loader import weight_rules

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def export_hf(net, folder: str, tokenizer_dir: str = None, tokenizer=None, dtype: str = "BF16") -> None:
    config = net.config
    os.makedirs(folder, exist_ok=True)
    rules = weight_rules(net)
    main = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
    tensors, dtypes, stacked = {}, {}, {}
    for name, rule in rules.items():
        if rule.kind == "load":
            if rule.row is not None:
                full = stacked.setdefault(id(rule.param), rule.param.asnumpy())
                array = full[rule.row]
            else:
                array = rule.param.asnumpy()
        elif rule.kind == "shared":  # the MTP layer's copies of the embedding and the output head
            array = None
        else:
            raise ValueError(f"cannot export {name}: this rank does not hold it")
        tensors[name] = array
        dtypes[name] = "F32" if name.endswith("e_score_correction_bias") else dtype
    for name in [n for n, a in tensors.items() if a is None]:
        tensors[name] = tensors[main[name.split(".", 3)[3]]]
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, dtypes, metadata={"format": "pt"})

    hf = {k: v for k, v in config.to_dict().items() if v is not None}
    hf["torch_dtype"] = "bfloat16" if dtype == "BF16" else "float32"
    if tokenizer is not None:
        hf["bos_token_id"] = tokenizer.bos_token_id
        hf["eos_token_id"] = tokenizer.eos_token_id
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
           "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, name))

