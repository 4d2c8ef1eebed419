"""Typed model configuration for the DeepSeek V2 / V2-Lite / V3 / V3.1 / R1 family.

One `DeepseekConfig` is built from an HF ``config.json`` (optionally overridden by the
``model.model_config`` section of a mindformers-style YAML) and handed to every Cell.
Field names are DeepSeek's / HF's config keys so a checkpoint's config reads unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional


# which kernels the Cells use (deepseek_ms.backend.native_kernels): "auto" = deepseek-ms's
# native CPU kernels where they help, "mindspore" = MindSpore's ops only
KERNEL_CHOICES = ("auto", "mindspore")


class ConfigError(ValueError):
    """A config value is unknown, malformed or inconsistent. The message names the key."""


SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
DTYPES = ("float32", "float16", "bfloat16")

# Keys HF / DeepSeek write into config.json that carry no meaning for inference here.
# Anything not in this set and not a field of DeepseekConfig is rejected as unknown.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "use_cache", "initializer_range", "attention_dropout", "attention_bias", "mlp_bias",
    "pretraining_tp", "aux_loss_alpha", "seq_aux", "ep_size", "head_dim", "qk_head_dim",
    "rope_interleave", "num_key_value_heads", "output_router_logits", "router_aux_loss_coef",
    "pad_token_id", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "model_name",
})

_V2_ROUTER_DEFAULTS = {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
                       "routed_scaling_factor": 1.0, "n_group": None, "topk_group": None,
                       "num_nextn_predict_layers": 0}

_ROPE_SCALING_KEYS = frozenset({
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor", "truncate",
})
_QUANT_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt"})


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only rope scaling DeepSeek ships)."""
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0  # 0 = absent: HF then uses mscale(factor, 1) for the cos/sin factor


@dataclass(frozen=True)
class QuantizationConfig:
    """DeepSeek's block-wise FP8 checkpoint format (`weight_scale_inv` per 128x128 block)."""
    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple = (128, 128)
    scale_fmt: Optional[str] = None  # V3.1: "ue8m0" (scales are powers of two)


@dataclass(frozen=True)
class DeepseekConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: Optional[int] = 1536  # None: plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: Optional[int] = 256  # None: dense model
    n_shared_experts: Optional[int] = 1
    num_experts_per_tok: Optional[int] = 8
    n_group: Optional[int] = 8
    topk_group: Optional[int] = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # positions / norms
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    # heads / tokens
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    quantization_config: Optional[QuantizationConfig] = None
    # runtime dtypes (mindformers' compute_dtype / params_dtype); fp32 on CPU
    compute_dtype: str = "float32"
    param_dtype: str = "float32"

    # ---- derived sizes, named after the paper ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by MLA: compressed kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(dn+dr)^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2 -- DeepSeek's semantics,
        applied to V2 and V3 alike."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim and rs.factor > 1:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return (self.n_routed_experts is not None and layer_id >= self.first_k_dense_replace
                and layer_id % self.moe_layer_freq == 0)

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "DeepseekConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: Dict[str, Any] = {}
        for key, value in raw.items():
            if key in names:
                kwargs[key] = value
            elif key not in _IGNORED_HF_KEYS:
                raise ConfigError(f"{source}: unknown config key '{key}'")
        if "model_type" not in raw:
            raise ConfigError(f"{source}: missing 'model_type' (expected one of {SUPPORTED_MODEL_TYPES})")
        if raw["model_type"] == "deepseek_v2":
            # a V2 config.json may omit router keys; fill them with V2's defaults, not V3's
            for key, value in _V2_ROUTER_DEFAULTS.items():
                kwargs.setdefault(key, value)
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = _parse_rope_scaling(kwargs["rope_scaling"], source)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = _parse_quant(kwargs["quantization_config"], source)
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "DeepseekConfig":
        try:
            with open(path, "r", encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_pretrained(cls, folder: str, overrides: Optional[Dict[str, Any]] = None) -> "DeepseekConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{folder}: no config.json")
        try:
            with open(path, "r", encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if overrides:
            raw = dict(raw)
            raw.update(overrides)
        return cls.from_dict(raw, source=path)

    def replace(self, **changes) -> "DeepseekConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate("config")
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        """HF-style dict (what export writes as config.json)."""
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            rs = out["rope_scaling"]
            if not rs["mscale_all_dim"]:
                rs.pop("mscale_all_dim")
            out["rope_scaling"] = dict(type="yarn", **rs)
        if self.quantization_config is not None:
            q = out["quantization_config"]
            q["weight_block_size"] = list(q["weight_block_size"])
            if q["scale_fmt"] is None:
                q.pop("scale_fmt")
        for k in ("compute_dtype", "param_dtype"):
            out.pop(k)
        out["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                                else "DeepseekV2ForCausalLM"]
        out["num_key_value_heads"] = self.num_attention_heads
        return out

    # ---- validation ----
    def validate(self, source: str = "config") -> None:
        def bad(key, msg):
            raise ConfigError(f"{source}: '{key}' {msg}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad("model_type", f"is {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, f"must be a positive integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", f"must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", f"must be a non-negative integer, got {self.first_k_dense_replace!r}")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", f"must be a non-negative integer, got {self.num_nextn_predict_layers!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            bad("rms_norm_eps", f"must be in (0, 1), got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            bad("rope_theta", f"must be > 1, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"is {self.hidden_act!r}; DeepSeek uses 'silu'")
        for key in ("compute_dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, f"is {getattr(self, key)!r}; supported: {', '.join(DTYPES)}")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"is {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"is {self.scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")
        if self.n_routed_experts is None:
            if self.first_k_dense_replace < self.num_hidden_layers and self.num_experts_per_tok:
                pass  # a dense model simply ignores the MoE keys
            return
        E = self.n_routed_experts
        for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, f"must be a positive integer for an MoE model, got {v!r}")
        if self.n_shared_experts is not None and (not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0):
            bad("n_shared_experts", f"must be a non-negative integer or null, got {self.n_shared_experts!r}")
        if self.num_experts_per_tok > E:
            bad("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds n_routed_experts ({E})")
        n_group = self.n_group or 1
        topk_group = self.topk_group or 1
        if E % n_group:
            bad("n_group", f"({n_group}) must divide n_routed_experts ({E})")
        if topk_group > n_group:
            bad("topk_group", f"({topk_group}) exceeds n_group ({n_group})")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if self.num_experts_per_tok > topk_group * (E // n_group):
                bad("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds the experts in "
                    f"topk_group={topk_group} groups of {E // n_group}")
        if self.topk_method == "noaux_tc":
            if self.scoring_func != "sigmoid":
                bad("scoring_func", "must be 'sigmoid' with topk_method 'noaux_tc'")
            if E // n_group < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts, so every group needs >= 2 experts")
        if self.topk_method == "greedy" and n_group != 1 and topk_group != n_group:
            pass  # greedy ignores groups, as DeepSeek's code does
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            bad("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor!r}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"({self.first_k_dense_replace}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _parse_rope_scaling(raw: Any, source: str) -> Optional[RopeScaling]:
    if isinstance(raw, RopeScaling):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'rope_scaling' must be a mapping or null, got {raw!r}")
    for k in raw:
        if k not in _ROPE_SCALING_KEYS:
            raise ConfigError(f"{source}: unknown key 'rope_scaling.{k}'")
    kind = raw.get("rope_type", raw.get("type"))
    if kind != "yarn":
        raise ConfigError(f"{source}: 'rope_scaling.type' is {kind!r}; only 'yarn' is supported")
    vals = {}
    for f in dataclasses.fields(RopeScaling):
        if f.name in raw and raw[f.name] is not None:
            v = raw[f.name]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{source}: 'rope_scaling.{f.name}' must be a number, got {v!r}")
            vals[f.name] = int(v) if f.name == "original_max_position_embeddings" else float(v)
    rs = RopeScaling(**vals)
    if rs.factor < 1:
        raise ConfigError(f"{source}: 'rope_scaling.factor' must be >= 1, got {rs.factor}")
    if rs.original_max_position_embeddings <= 0:
        raise ConfigError(f"{source}: 'rope_scaling.original_max_position_embeddings' must be > 0")
    return rs


def _parse_quant(raw: Any, source: str) -> QuantizationConfig:
    if isinstance(raw, QuantizationConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'quantization_config' must be a mapping, got {raw!r}")
    for k in raw:
        if k not in _QUANT_KEYS:
            raise ConfigError(f"{source}: unknown key 'quantization_config.{k}'")
    q = QuantizationConfig(
        quant_method=raw.get("quant_method", "fp8"), fmt=raw.get("fmt", "e4m3"),
        activation_scheme=raw.get("activation_scheme", "dynamic"),
        weight_block_size=tuple(raw.get("weight_block_size", (128, 128))),
        scale_fmt=raw.get("scale_fmt"))
    if q.quant_method != "fp8":
        raise ConfigError(f"{source}: 'quantization_config.quant_method' is {q.quant_method!r}; only 'fp8' is supported")
    if q.fmt != "e4m3":
        raise ConfigError(f"{source}: 'quantization_config.fmt' is {q.fmt!r}; only 'e4m3' is supported")
    if len(q.weight_block_size) != 2 or any(not isinstance(b, int) or b <= 0 for b in q.weight_block_size):
        raise ConfigError(f"{source}: 'quantization_config.weight_block_size' must be two positive ints")
    if q.scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"{source}: 'quantization_config.scale_fmt' is {q.scale_fmt!r}; expected 'ue8m0' or absent")
    return q


@dataclass(frozen=True)
class ParallelConfig:
    """mindformers' `parallel_config` keys. Rank order is tp-ep-pp-dp."""
    data_parallel: int = 1
    model_parallel: int = 1
    expert_parallel: int = 1
    pipeline_stage: int = 1

    @classmethod
    def from_dict(cls, raw: Optional[Dict[str, Any]], source: str = "parallel_config") -> "ParallelConfig":
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        # mindformers keys that configure training-only features we accept and ignore here
        passthrough = {"micro_batch_num", "use_seq_parallel", "vocab_emb_dp", "gradient_aggregation_group",
                       "context_parallel", "pp_interleave_num", "micro_batch_interleave_num",
                       "optimizer_shard", "recompute"}
        kwargs = {}
        for k, v in raw.items():
            if k in known:
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"{source}: '{k}' must be a positive integer, got {v!r}")
                kwargs[k] = v
            elif k not in passthrough:
                raise ConfigError(f"{source}: unknown key '{k}'")
        return cls(**kwargs)

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage
