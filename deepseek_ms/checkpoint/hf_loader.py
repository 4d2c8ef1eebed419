"""Load an unmodified HF DeepSeek folder into `DeepseekForCausalLM`.

Every Cell parameter gets a rule naming the checkpoint tensor that feeds it. Most names
are identical (the Cells mirror HF's module tree); the exceptions are

* routed experts, stacked per layer: `mlp.experts.{e}.gate_proj.weight` -> row e of
  `mlp.experts.gate_proj` (only this rank's experts; others are skipped);
* the MTP modules, stored by DeepSeek as decoder layer `num_hidden_layers + k`: its
  `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and block tensors load into `mtp.{k}`,
  while its copies of `embed_tokens` and `shared_head.head` are the main model's shared
  tensors (checked, not loaded twice).

Tensors stream one at a time (FP8 ones dequantized block-wise on the way), so peak
memory stays close to the final model size.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..config import DeepseekConfig
from .safetensors_io import CheckpointError, CheckpointReader, bf16_to_float32

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass
class WeightRule:
    param: object                  # mindspore Parameter, or None for shared/skipped tensors
    shape: Tuple[int, ...]         # full checkpoint shape
    shard: Optional[tuple] = None  # (axis, start, stop) this rank reads
    row: Optional[int] = None      # index into a stacked (expert) parameter
    kind: str = "load"             # load | shared | skip
    never_fp8: bool = False        # router weight and bias stay high precision in FP8 checkpoints
    bf16_storage: bool = False     # kept in bfloat16 when the tensor (every one it stacks) is BF16: exact


def _hf_name(ours: str, config: DeepseekConfig) -> str:
    """Our Cell path -> checkpoint name."""
    if ours.startswith("mtp."):
        _, k, rest = ours.split(".", 2)
        prefix = f"model.layers.{config.num_hidden_layers + int(k)}"
        if rest.startswith("block."):
            return f"{prefix}.{rest[len('block.'):]}"
        if rest.startswith("shared_head_norm."):
            return f"{prefix}.shared_head.norm.{rest[len('shared_head_norm.'):]}"
        return f"{prefix}.{rest}"
    return ours


def _store(rule: WeightRule, buf: np.ndarray) -> None:
    """Set a parameter from `buf`: its values, or bf16 bits (uint16) under bf16 storage."""
    import mindspore as ms

    kept_bf16 = buf.dtype == np.uint16
    if rule.bf16_storage and rule.param.dtype != (ms.bfloat16 if kept_bf16 else ms.float32):
        # what was read decides: bf16 bits, or fp32 (a reload of other tensors, too)
        rule.param.set_dtype(ms.bfloat16 if kept_bf16 else ms.float32)
    tensor = ms.Tensor.from_numpy(np.ascontiguousarray(buf))
    rule.param.set_data(tensor.view(ms.bfloat16) if kept_bf16 else tensor)


def weight_rules(net) -> Dict[str, WeightRule]:
    """Checkpoint tensor name -> how it loads into `net` (a DeepseekForCausalLM)."""
    from ..model.linear import Linear
    from ..model.moe import RoutedExperts, Router
    from ..parallel.layers import VocabParallelEmbedding

    config: DeepseekConfig = net.config
    rules: Dict[str, WeightRule] = {}
    owned = set()
    for cell_name, cell in net.cells_and_names():
        if isinstance(cell, (Linear, VocabParallelEmbedding)):
            rules[_hf_name(f"{cell_name}.weight", config)] = WeightRule(
                cell.weight, cell.expected_hf_shape(), cell.shard_of(),
                bf16_storage=getattr(cell, "bf16_storage", False))
            owned.add(id(cell.weight))
        elif isinstance(cell, Router):
            rules[_hf_name(f"{cell_name}.weight", config)] = WeightRule(cell.weight, tuple(cell.weight.shape),
                                                                         never_fp8=True)
            owned.add(id(cell.weight))
            if cell.use_bias:
                b = cell.e_score_correction_bias
                rules[_hf_name(f"{cell_name}.e_score_correction_bias", config)] = WeightRule(
                    b, tuple(b.shape), never_fp8=True)
                owned.add(id(b))
        elif isinstance(cell, RoutedExperts):
            inter, tp = config.moe_intermediate_size, cell.moe_tp
            for proj in ("gate_proj", "up_proj", "down_proj"):
                param = getattr(cell, proj)
                owned.add(id(param))
                # expert tensor parallel splits the intermediate dimension: rows of gate/up, columns of down
                axis = 1 if proj == "down_proj" else 0
                per_expert = [config.hidden_size] * 2
                per_expert[axis] = inter
                shard = None
                if tp.size > 1:
                    local_inter = inter // tp.size
                    shard = (axis, tp.rank * local_inter, (tp.rank + 1) * local_inter)
                for e in range(cell.n_routed_experts):
                    local = e - cell.first_expert
                    name = _hf_name(f"{cell_name}.{e}.{proj}.weight", config)
                    if 0 <= local < cell.n_local_experts:
                        rules[name] = WeightRule(param, tuple(per_expert), shard, row=local,
                                                 bf16_storage=cell.bf16_storage)
                    else:
                        rules[name] = WeightRule(None, tuple(per_expert), kind="skip")
    for name, param in net.parameters_and_names():
        if id(param) not in owned:  # norms and the embedding: plain, unsharded tensors
            rules[_hf_name(name, config)] = WeightRule(param, tuple(param.shape))
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        rules[f"{prefix}.embed_tokens.weight"] = WeightRule(None, (config.vocab_size, config.hidden_size),
                                                            kind="shared")
        rules[f"{prefix}.shared_head.head.weight"] = WeightRule(None, (config.vocab_size, config.hidden_size),
                                                                kind="shared")
    return rules


def _check_tensor(reader: CheckpointReader, name: str, rule: WeightRule, config: DeepseekConfig) -> None:
    where = f"{reader.file_of(name)}: tensor '{name}'"
    shape = tuple(reader.shape(name))
    if shape != tuple(rule.shape):
        raise CheckpointError(f"{where} has shape {list(shape)}, expected {list(rule.shape)}")
    dtype = reader.dtype(name)
    if dtype == "F8_E4M3":
        if config.quantization_config is None:
            raise CheckpointError(f"{where} is FP8 (F8_E4M3) but config.json has no quantization_config")
        if rule.never_fp8 or len(shape) != 2:
            raise CheckpointError(f"{where} is FP8 (F8_E4M3); only 2-D projection weights may be FP8")
    elif dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where} has dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}"
                              + (" or F8_E4M3" if config.quantization_config else ""))


def load_hf_weights(net, folder: str, progress: bool = True) -> None:
    """Validate the whole checkpoint against `net`, then stream every tensor into it."""
    import mindspore as ms

    NP_DTYPES = {ms.float32: np.float32, ms.float16: np.float16}
    config: DeepseekConfig = net.config
    reader = CheckpointReader(folder)
    rules = weight_rules(net)
    present = set(reader.logical_names())
    for name in sorted(present):
        if name not in rules:
            raise CheckpointError(f"{reader.file_of(name)}: unexpected tensor '{name}' "
                                  f"(not part of a {config.model_type} model with this config.json)")
    for name in sorted(rules):
        if name not in present:
            raise CheckpointError(f"{folder}: missing tensor '{name}'")
        _check_tensor(reader, name, rules[name], config)

    block = tuple(config.quantization_config.weight_block_size) if config.quantization_config else (128, 128)
    stacked: Dict[int, np.ndarray] = {}  # uint16 (bf16 bits) while every row read into it was BF16
    loadable = [n for n in sorted(rules, key=lambda n: (reader.file_of(n), n)) if rules[n].kind == "load"]
    bar = tqdm(loadable, desc=f"loading {os.path.basename(os.path.normpath(folder))}", unit="tensor",
               disable=not progress, leave=False)
    for name in bar:
        rule = rules[name]
        target_dtype = NP_DTYPES.get(rule.param.dtype, np.float32)  # bf16 storage: read as fp32
        if rule.row is not None:
            bf16 = rule.bf16_storage and reader.dtype(name) == "BF16"
            buf = stacked.get(id(rule.param))
            if buf is None:
                buf = np.empty(tuple(rule.param.shape), dtype=np.uint16 if bf16 else target_dtype)
            elif buf.dtype == np.uint16 and not bf16:  # one non-BF16 expert: the parameter stays fp32
                buf = bf16_to_float32(buf)
            stacked[id(rule.param)] = buf
            if buf.dtype == np.uint16:  # the tensor's stored bits, not decoded
                buf[rule.row] = (reader.read(name, dtype=None) if rule.shard is None
                                 else reader.read_slice(name, *rule.shard, dtype=None))
            else:
                buf[rule.row] = reader.read_dequantized(name, block_size=block, slice=rule.shard)
            continue
        if rule.bf16_storage and reader.dtype(name) == "BF16":  # the tensor's stored bits
            _store(rule, reader.read(name, dtype=None) if rule.shard is None
                   else reader.read_slice(name, *rule.shard, dtype=None))
            continue
        array = reader.read_dequantized(name, block_size=block, slice=rule.shard)
        _store(rule, np.ascontiguousarray(array, dtype=target_dtype))
    for rule in {id(r.param): r for r in rules.values() if r.row is not None}.values():
        _store(rule, stacked.pop(id(rule.param)))
    reader.close()
    logger.info("loaded %d tensors from %s", len(loadable), folder)
