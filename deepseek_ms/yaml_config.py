"""mindformers-style run YAML -> typed `RunConfig`.

The YAML schema is mindformers' (top-level ``seed``, ``run_mode``, ``use_parallel``,
``pretrained_model_dir``, ``load_checkpoint``, ``context``, ``parallel_config``,
``model.model_config`` ...), so one file runs under both deepseek-ms and
``mindformers.tools.register.MindFormerConfig`` unchanged. This module reads it with
its own small ``yaml.safe_load``-based loader: mindformers is never imported at run
time (its import costs ~3 s and writes ``./output/log`` into the current directory).

Semantics follow mindformers where it defines them:

* ``base_config: other.yaml`` (or a list of files), relative to the YAML's folder:
  the bases are combined top-level key by key (a later base wins), then this file
  is merged over them recursively.
* ``overrides={"parallel_config.model_parallel": 2}`` are dotted keys merged over
  the file like ``MindFormerConfig.merge_from_dict`` (use `parse_cli_overrides` to
  turn ``["a.b=2"]`` strings into values).
* The model is HF ``config.json`` from ``pretrained_model_dir`` with the keys of
  ``model.model_config`` replacing it top-level key by key (a YAML ``rope_scaling``
  replaces the whole json ``rope_scaling``). Without a config.json the
  ``model.model_config`` section alone must define the model, ``model_type``
  included.
* ``model.model_config`` also carries mindformers runtime keys (``seq_length``,
  ``block_size`` ...): those in `RUNTIME_KEYS` go to ``RunConfig.runtime``;
  ``compute_dtype`` / ``params_dtype`` become ``DeepseekConfig.compute_dtype`` /
  ``param_dtype``.

Deliberately stricter than mindformers: an unknown top-level section, an unknown
``model`` / ``model.model_config`` / ``parallel_config`` key, a duplicate key or a
value of the wrong type is a `ConfigError` whose message names the file and the key.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import yaml

from . import config as _config_mod
from .config import KERNEL_CHOICES, ConfigError, DeepseekConfig, ParallelConfig

logger = logging.getLogger(__name__)

__all__ = ["RunConfig", "load_yaml_config", "parse_cli_overrides", "read_yaml_dict",
           "KNOWN_TOP_LEVEL_KEYS", "RUNTIME_KEYS", "ConfigError"]

# ---------------------------------------------------------------------------------------------
# schema tables
# ---------------------------------------------------------------------------------------------

# mindformers' scalar "general" keys (GeneralConfig in mindformers/tools/register/template.py, 1.9.0)
_GENERAL_KEYS = frozenset({
    "seed", "output_dir", "run_mode", "use_parallel", "resume_training", "print_separate_loss",
    "load_checkpoint", "load_ckpt_format", "auto_trans_ckpt", "transform_process_num",
    "src_strategy_path_or_dir", "only_save_strategy", "load_ckpt_async", "use_legacy",
    "use_legacy_format", "pretrained_model_dir", "balanced_load", "reshard_worker_num",
    "do_eval", "eval_step_interval", "eval_epoch_interval", "ignore_data_skip", "data_skip_steps",
    "mstx", "layer_scale", "layer_decay", "lr_scale", "lr_scale_factor",
    "micro_batch_interleave_num", "remote_save_url", "save_file", "input_data",
    "predict_batch_size", "adapter_id", "exclude_cann_cpu", "train_precision_sync",
    "infer_precision_sync", "postprocess_use_numpy",
})
# mindformers' sections, plus `generation_config` (legacy yamls) and `serve` (ours)
_SECTION_KEYS = frozenset({
    "runner_config", "context", "parallel", "trainer", "model", "moe_config", "parallel_config",
    "recompute_config", "swap_config", "runner_wrapper", "optimizer", "lr_schedule", "metric",
    "train_dataset", "train_dataset_task", "eval_dataset", "eval_dataset_task", "callbacks",
    "eval_callbacks", "monitor_config", "processor", "generation_config", "serve",
})
KNOWN_TOP_LEVEL_KEYS = _GENERAL_KEYS | _SECTION_KEYS
# any `profile*` key is mindformers profiling (profile, profile_level, profile_start_step, ...)
_KNOWN_TOP_LEVEL_PREFIXES = ("profile",)

# mindformers' `parallel_config` is a strict section: these are all the keys it accepts.
_MF_PARALLEL_CONFIG_KEYS = frozenset({
    "data_parallel", "model_parallel", "context_parallel", "expert_parallel", "pipeline_stage",
    "micro_batch_num", "seq_split_num", "use_seq_parallel", "optimizer_shard",
    "gradient_aggregation_group", "vocab_emb_dp", "context_parallel_algo", "ulysses_degree_in_cp",
    "mem_coeff",
})
_PARALLEL_FIELDS = tuple(f.name for f in dataclasses.fields(ParallelConfig))

# keys of `model:` itself (mindformers: model_config is required; arch in legacy yamls)
_MODEL_SECTION_KEYS = frozenset({"model_config", "arch"})

# mindformers keys allowed inside model.model_config that are not architecture keys.
_RUNTIME_INT_KEYS = frozenset({"seq_length", "max_decode_length", "block_size", "num_blocks",
                               "batch_size", "max_length"})
_RUNTIME_DTYPE_KEYS = frozenset({"layernorm_compute_dtype", "softmax_compute_dtype", "rotary_dtype",
                                 "router_dense_type"})
_RUNTIME_BOOL_KEYS = frozenset({"use_past", "is_dynamic", "use_flash_attention", "use_fused_mla",
                                "qk_layernorm", "moe_grouped_gemm", "moe_router_fusion",
                                "mla_qkv_concat"})
_RUNTIME_OTHER_KEYS = frozenset({"type", "checkpoint_name_or_path", "moe_token_dispatcher_type",
                                 "pad_token_id"})
# mindformers' training knobs (TransformerConfig names), read by deepseek_ms.train
_RUNTIME_FLOAT_KEYS = frozenset({"moe_router_bias_update_rate", "moe_aux_loss_coeff",
                                 "mtp_loss_scaling_factor", "init_method_std"})
RUNTIME_KEYS = (_RUNTIME_INT_KEYS | _RUNTIME_DTYPE_KEYS | _RUNTIME_BOOL_KEYS | _RUNTIME_OTHER_KEYS
                | _RUNTIME_FLOAT_KEYS | {"kernels"})  # kernels: ours, beside mindformers' use_flash_attention ...

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
_RUN_MODES = ("train", "finetune", "eval", "predict", "predict_with_train_model")
_DEVICE_TARGETS = ("CPU", "Ascend", "GPU")
_MODES = {0: 0, 1: 1, "GRAPH_MODE": 0, "PYNATIVE_MODE": 1}

# defaults follow mindformers' GeneralConfig / ContextConfig, except device_target (CPU here)
_DEFAULT_CONTEXT = {"mode": 0, "device_target": "CPU", "device_id": 0}
_DEFAULT_SEED = 1
_DEFAULT_OUTPUT_DIR = "./output"
_DEFAULT_RUN_MODE = "predict"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved from one YAML (plus its bases and overrides)."""
    model: DeepseekConfig
    parallel: ParallelConfig
    context: Dict[str, Any]            # for mindspore.set_context (defaults filled in)
    runtime: Dict[str, Any]            # RUNTIME_KEYS found in model.model_config
    pretrained_model_dir: Optional[str]  # absolute, or None
    load_checkpoint: Optional[str]     # absolute, or None ('' in the YAML)
    run_mode: str
    use_parallel: bool
    seed: int
    output_dir: str
    serve: Dict[str, Any]              # our own `serve:` section (empty if absent)
    raw: Dict[str, Any]                # whole parsed YAML: bases merged, overrides applied
    config_path: str                   # absolute path of the YAML given to load_yaml_config
    model_config_json: Optional[str]   # the config.json the model was read from, or None


# ---------------------------------------------------------------------------------------------
# YAML reading
# ---------------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate mapping keys (plain safe_load keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    # only the keys written in this mapping: a key that overrides one merged in by `<<: *anchor`
    # is YAML's merge semantics, not a duplicate
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader.construct_mapping reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml_dict(path: str) -> Dict[str, Any]:
    """Parse one YAML file (no base_config handling); the top level must be a mapping."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read YAML file ({e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}: malformed YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        raise ConfigError(f"{path}: the YAML file is empty; expected a mapping of sections")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"got a {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: top-level key {key!r} is not a string")
    return data


def _merge(over: Mapping[str, Any], base: Mapping[str, Any]) -> Dict[str, Any]:
    """`over` merged into a copy of `base`: mappings recursively, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_bases(path: str, stack: Tuple[str, ...] = ()) -> Dict[str, Any]:
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join(list(stack) + [real])
        raise ConfigError(f"{path}: 'base_config' inheritance loops: {chain}")
    data = read_yaml_dict(path)
    if "base_config" not in data:
        return data
    bases = data.pop("base_config")
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: 'base_config' must be a file name or a list of file names, "
                          f"got {bases!r}")
    combined: Dict[str, Any] = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), os.path.expanduser(base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: 'base_config' file {base!r} not found (looked for {base_path})")
        combined.update(_load_with_bases(base_path, stack + (real,)))  # bases: top-level update
    return _merge(data, combined)


def parse_cli_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["parallel_config.model_parallel=2", "context.device_target=CPU"]`` -> dotted dict.

    Values are read as YAML scalars/flow collections, so ``2`` is an int, ``True`` a bool,
    ``null`` None and ``[1, 2]`` a list; anything unparsable stays a string.
    """
    out: Dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. parallel_config.model_parallel=2")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out[key] = value
    return out


def _apply_overrides(data: Dict[str, Any], overrides: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """Dotted keys merged into `data` (mappings merge recursively, like merge_from_dict)."""
    tree: Dict[str, Any] = {}
    for dotted, value in overrides.items():
        if not isinstance(dotted, str) or not dotted or any(not p for p in dotted.split(".")):
            raise ConfigError(f"{path}: override {dotted!r}: keys must be dotted names like 'parallel_config.model_parallel'")
        parts = dotted.split(".")
        if parts[0] == "base_config":
            raise ConfigError(f"{path}: override {dotted!r}: 'base_config' cannot be overridden")
        # an override must not descend through a value that is not a mapping
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict):
                break
            node = node.get(part)
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"{path}: override {dotted!r}: '{'.'.join(parts[:i + 1])}' is "
                                  f"{type(node).__name__}, not a mapping")
        t = tree
        for part in parts[:-1]:
            nxt = t.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{path}: override {dotted!r} conflicts with another override of '{part}'")
            t = nxt
        t[parts[-1]] = value
    return _merge(tree, data)


# ---------------------------------------------------------------------------------------------
# interpretation
# ---------------------------------------------------------------------------------------------

def _norm_dtype(value: Any, where: str) -> str:
    name = _DTYPE_ALIASES.get(value) if isinstance(value, str) else None
    if name is None:
        raise ConfigError(f"{where} is {value!r}; expected one of float32, float16, bfloat16 "
                          f"(or fp32, fp16, bf16)")
    return name


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _section(data: Mapping[str, Any], key: str, src: str) -> Dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: '{key}' must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _resolve_path(value: Any, key: str, src: str, yaml_path: str) -> Optional[str]:
    """'' / None -> None. Relative: the current directory if it exists there, else the
    parent of the YAML's folder (the repo root for our yaml/ files)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{src}: '{key}' must be a path string, got {value!r}")
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    if os.path.exists(value):
        return os.path.abspath(value)
    anchor = os.path.dirname(os.path.dirname(os.path.abspath(yaml_path)))
    return os.path.normpath(os.path.join(anchor, value))


def _check_top_level(data: Mapping[str, Any], src: str) -> None:
    for key in data:
        if key in KNOWN_TOP_LEVEL_KEYS or key.startswith(_KNOWN_TOP_LEVEL_PREFIXES):
            continue
        raise ConfigError(f"{src}: unknown top-level section '{key}' (not a mindformers section; "
                          f"deepseek-ms adds only 'serve')")


def _parse_context(data: Mapping[str, Any], src: str) -> Dict[str, Any]:
    ctx = dict(_DEFAULT_CONTEXT)
    ctx.update(_section(data, "context", src))
    if ctx["device_target"] not in _DEVICE_TARGETS:
        raise ConfigError(f"{src}: 'context.device_target' is {ctx['device_target']!r}; "
                          f"expected one of {', '.join(_DEVICE_TARGETS)}")
    mode = ctx["mode"]
    if isinstance(mode, bool) or mode not in _MODES:
        raise ConfigError(f"{src}: 'context.mode' is {mode!r}; expected 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE)")
    ctx["mode"] = _MODES[mode]
    if isinstance(ctx["device_id"], bool) or not isinstance(ctx["device_id"], int) or ctx["device_id"] < 0:
        raise ConfigError(f"{src}: 'context.device_id' must be a non-negative integer, got {ctx['device_id']!r}")
    return ctx


def _parse_parallel(data: Mapping[str, Any], src: str) -> ParallelConfig:
    section = _section(data, "parallel_config", src)
    ours: Dict[str, Any] = {}
    for key, value in section.items():
        if key not in _MF_PARALLEL_CONFIG_KEYS:
            raise ConfigError(f"{src}: unknown key 'parallel_config.{key}' (mindformers accepts: "
                              f"{', '.join(sorted(_MF_PARALLEL_CONFIG_KEYS))})")
        if key in _PARALLEL_FIELDS:
            ours[key] = value
        elif key == "context_parallel" and value != 1:
            raise ConfigError(f"{src}: 'parallel_config.context_parallel' is {value!r}; "
                              f"deepseek-ms inference supports only 1")
        # the other mindformers keys configure training features: accepted, not used
    return ParallelConfig.from_dict(ours, source=f"{src}: parallel_config")


def _split_model_config(mc: Mapping[str, Any], src: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """model.model_config -> (DeepseekConfig keys, runtime keys)."""
    fields = {f.name for f in dataclasses.fields(DeepseekConfig)}
    hf_ignored = getattr(_config_mod, "_IGNORED_HF_KEYS", frozenset())
    arch: Dict[str, Any] = {}
    runtime: Dict[str, Any] = {}
    where = f"{src}: 'model.model_config.%s'"
    if "param_dtype" in mc and "params_dtype" in mc:
        raise ConfigError(f"{src}: 'model.model_config' sets both 'params_dtype' and 'param_dtype'; keep one")
    for key, value in mc.items():
        if not isinstance(key, str):
            raise ConfigError(f"{src}: 'model.model_config' key {key!r} is not a string")
        if key == "compute_dtype":
            arch["compute_dtype"] = _norm_dtype(value, where % key)
        elif key in ("params_dtype", "param_dtype"):
            arch["param_dtype"] = _norm_dtype(value, where % key)
        elif key in _RUNTIME_INT_KEYS:
            runtime[key] = _positive_int(value, where % key)
        elif key in _RUNTIME_DTYPE_KEYS:
            runtime[key] = _norm_dtype(value, where % key)
        elif key in _RUNTIME_BOOL_KEYS:
            runtime[key] = _bool(value, where % key)
        elif key in _RUNTIME_OTHER_KEYS:
            runtime[key] = value
        elif key == "kernels":
            if value not in KERNEL_CHOICES:
                raise ConfigError(f"{where % key} must be one of {', '.join(KERNEL_CHOICES)}, got {value!r}")
            runtime[key] = value
        elif key in _RUNTIME_FLOAT_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where % key} must be a non-negative number, got {value!r}")
            runtime[key] = float(value)
        elif key in fields or key in hf_ignored:
            arch[key] = value
        else:
            raise ConfigError(f"{src}: unknown key 'model.model_config.{key}' (neither a DeepSeek "
                              f"config.json key nor a known mindformers runtime key)")
    return arch, runtime


def _build_model(data: Mapping[str, Any], src: str, pretrained: Optional[str]
                 ) -> Tuple[DeepseekConfig, Dict[str, Any], Optional[str]]:
    model_section = _section(data, "model", src)
    for key in model_section:
        if key not in _MODEL_SECTION_KEYS:
            raise ConfigError(f"{src}: unknown key 'model.{key}' (expected model_config)")
    mc = model_section.get("model_config")
    if mc is None:
        mc = {}
    if not isinstance(mc, dict):
        raise ConfigError(f"{src}: 'model.model_config' must be a mapping, got {type(mc).__name__}")
    arch, runtime = _split_model_config(mc, src)

    cfg_json = os.path.join(pretrained, "config.json") if pretrained else None
    if cfg_json and os.path.isfile(cfg_json):
        try:
            with open(cfg_json, "r", encoding="utf-8") as f:
                merged = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_json}: not valid JSON ({e})") from None
        if not isinstance(merged, dict):
            raise ConfigError(f"{cfg_json}: expected a JSON object")
        merged.update(arch)  # top-level replacement, like mindformers' merge_model_config
        source = f"{src}: model.model_config over {cfg_json}"
        return DeepseekConfig.from_dict(merged, source=source), runtime, cfg_json

    if pretrained:
        where = "does not exist" if not os.path.exists(pretrained) else "has no config.json"
        logger.warning("%s: pretrained_model_dir %s %s; the model is defined by model.model_config alone",
                       src, pretrained, where)
    if "model_type" not in arch:
        hint = (f"pretrained_model_dir {pretrained} has no config.json" if pretrained
                else "no pretrained_model_dir is set")
        raise ConfigError(f"{src}: 'model.model_config' has no 'model_type' and {hint}; "
                          f"either point pretrained_model_dir at an HF folder or define the whole "
                          f"architecture (model_type: deepseek_v3 / deepseek_v2, ...) in model.model_config")
    return DeepseekConfig.from_dict(arch, source=f"{src}: model.model_config"), runtime, None


def _check_parallel_vs_model(par: ParallelConfig, model: DeepseekConfig, src: str) -> None:
    heads = model.num_attention_heads
    if heads % par.model_parallel:
        raise ConfigError(f"{src}: 'parallel_config.model_parallel' ({par.model_parallel}) must divide "
                          f"num_attention_heads ({heads})")
    if (par.data_parallel * par.model_parallel) % par.expert_parallel:
        raise ConfigError(f"{src}: 'parallel_config.expert_parallel' ({par.expert_parallel}) must divide "
                          f"data_parallel * model_parallel ({par.data_parallel * par.model_parallel}); "
                          f"experts are spread over the same devices")
    if model.n_routed_experts is not None and model.n_routed_experts % par.expert_parallel:
        raise ConfigError(f"{src}: 'parallel_config.expert_parallel' ({par.expert_parallel}) must divide "
                          f"n_routed_experts ({model.n_routed_experts})")
    if model.n_routed_experts is None and par.expert_parallel != 1:
        raise ConfigError(f"{src}: 'parallel_config.expert_parallel' is {par.expert_parallel} but the "
                          f"model has no routed experts")
    if par.pipeline_stage > model.num_hidden_layers:
        raise ConfigError(f"{src}: 'parallel_config.pipeline_stage' ({par.pipeline_stage}) exceeds "
                          f"num_hidden_layers ({model.num_hidden_layers})")


def load_yaml_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Read a mindformers-style YAML (with base_config and dotted overrides) into a RunConfig.

    Raises `ConfigError` naming the file and the offending key for anything malformed.
    """
    path = os.fspath(path)
    data = _load_with_bases(path)
    src = path
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a mapping of dotted keys, got {type(overrides).__name__}")
        data = _apply_overrides(data, overrides, path)
        src = f"{path} (with overrides {', '.join(sorted(map(str, overrides)))})"
    _check_top_level(data, src)

    run_mode = data.get("run_mode")
    if run_mode is None:
        run_mode = _DEFAULT_RUN_MODE
    if run_mode not in _RUN_MODES:
        raise ConfigError(f"{src}: 'run_mode' is {run_mode!r}; expected one of {', '.join(_RUN_MODES)}")
    use_parallel = _bool(data.get("use_parallel", False), f"{src}: 'use_parallel'")
    seed = data.get("seed", _DEFAULT_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{src}: 'seed' must be a non-negative integer, got {seed!r}")
    output_dir = data.get("output_dir", _DEFAULT_OUTPUT_DIR)
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{src}: 'output_dir' must be a non-empty path string, got {output_dir!r}")

    pretrained = _resolve_path(data.get("pretrained_model_dir"), "pretrained_model_dir", src, path)
    load_checkpoint = _resolve_path(data.get("load_checkpoint"), "load_checkpoint", src, path)
    context = _parse_context(data, src)
    parallel = _parse_parallel(data, src)
    model, runtime, cfg_json = _build_model(data, src, pretrained)
    _check_parallel_vs_model(parallel, model, src)
    serve = _section(data, "serve", src)

    return RunConfig(
        model=model, parallel=parallel, context=context, runtime=runtime,
        pretrained_model_dir=pretrained, load_checkpoint=load_checkpoint, run_mode=run_mode,
        use_parallel=use_parallel, seed=seed, output_dir=output_dir, serve=copy.deepcopy(serve),
        raw=copy.deepcopy(data), config_path=os.path.abspath(path), model_config_json=cfg_json)
