"""The training sections of a mindformers-style YAML -> a typed `TrainConfig`.

Key names are mindformers' wherever it has one, so a train YAML loads unchanged in
`MindFormerConfig`:

* ``runner_config``: ``batch_size``, ``stop_step`` (number of optimizer steps),
  ``gradient_accumulation_steps`` (must be 1 here);
* ``optimizer``: ``type: AdamW``, ``betas``, ``eps``, ``weight_decay``;
* ``lr_schedule``: ``type: CosineWithWarmUpLR``, ``learning_rate``, ``lr_end``,
  ``warmup_steps`` or ``warmup_ratio``, ``total_steps`` (-1: stop_step);
* ``runner_wrapper``: ``use_clip_grad``, ``max_grad_norm``;
* ``train_dataset.data_loader``: ``dataset_dir`` with ``train_file`` / ``eval_file``
  (one paragraph per line, from scripts/prepare_corpus.py); ``train_dataset.tokenizer``:
  ``model_type`` of the sentencepiece model trained on the corpus with the model's
  ``vocab_size`` (or ``tokenizer_dir`` to reuse an existing tokenizer folder);
* ``callbacks``: ``MFLossMonitor.per_print_times`` (log interval),
  ``CheckpointMonitor.save_checkpoint_steps`` / ``keep_checkpoint_max``;
* top level: ``seed``, ``output_dir`` (relative to the current directory, as in
  mindformers), ``resume_training``, ``do_eval``,
  ``eval_step_interval``;
* ``model.model_config``: ``seq_length``, ``init_method_std``,
  ``moe_router_bias_update_rate`` (gamma), ``moe_aux_loss_coeff`` (alpha),
  ``mtp_loss_scaling_factor`` (lambda).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..config import ConfigError
from ..yaml_config import RunConfig, load_yaml_config

_OPTIMIZERS = ("AdamW", "AdamWeightDecay", "FusedAdamWeightDecay")
_SCHEDULES = ("CosineWithWarmUpLR", "WarmUpCosineLR")
_CALLBACKS = ("MFLossMonitor", "CheckpointMonitor", "TopkBiasBalanceCallback")


@dataclass(frozen=True)
class TrainConfig:
    seq_length: int
    batch_size: int
    steps: int
    learning_rate: float
    lr_end: float
    warmup_steps: int
    betas: tuple
    eps: float
    weight_decay: float
    clip_norm: float            # 0: no clipping
    bias_update_rate: float     # gamma
    aux_loss_coeff: float       # alpha
    mtp_loss_weight: float      # lambda
    init_std: float
    dataset_dir: str
    train_file: str
    eval_file: Optional[str]
    tokenizer_dir: Optional[str]
    tokenizer_type: str
    log_interval: int
    save_interval: int          # 0: only at the end
    keep_checkpoints: int
    do_eval: bool
    eval_interval: int
    resume: bool
    seed: int
    output_dir: str


def _num(section: Mapping[str, Any], key: str, default, where: str, kind=float, minimum=0):
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{where}.{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key} must be >= {minimum}, got {value!r}")
    return kind(value)


def _path(value: Optional[str], rc: RunConfig) -> Optional[str]:
    """Relative paths: the current directory if they exist there, else the repo root (like yaml_config)."""
    if not value:
        return None
    value = os.path.expanduser(value)
    if os.path.isabs(value) or os.path.exists(value):
        return os.path.abspath(value)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.dirname(rc.config_path)), value))


def train_config(rc: RunConfig) -> TrainConfig:
    raw, src = rc.raw, rc.config_path

    def section(name):
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{name}' must be a mapping")
        return value

    runner = section("runner_config")
    if runner.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError(f"{src}: runner_config.gradient_accumulation_steps must be 1 (not supported)")
    batch_size = _num(runner, "batch_size", 1, f"{src}: runner_config", int, 1)
    steps = _num(runner, "stop_step", 0, f"{src}: runner_config", int, 1)

    opt = section("optimizer")
    if opt.get("type", "AdamW") not in _OPTIMIZERS:
        raise ConfigError(f"{src}: optimizer.type {opt.get('type')!r} is not supported; use AdamW")
    betas = opt.get("betas", [0.9, 0.95])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)):
        raise ConfigError(f"{src}: optimizer.betas must be two numbers in [0, 1), got {betas!r}")

    lr = section("lr_schedule")
    if lr.get("type", "CosineWithWarmUpLR") not in _SCHEDULES:
        raise ConfigError(f"{src}: lr_schedule.type {lr.get('type')!r} is not supported; use CosineWithWarmUpLR")
    total = lr.get("total_steps", -1)
    if total not in (-1, None) and total != steps:
        raise ConfigError(f"{src}: lr_schedule.total_steps ({total}) must be -1 or equal runner_config.stop_step")
    if "warmup_steps" in lr:
        warmup = _num(lr, "warmup_steps", 0, f"{src}: lr_schedule", int)
    else:
        warmup = int(_num(lr, "warmup_ratio", 0.0, f"{src}: lr_schedule") * steps)

    wrapper = section("runner_wrapper")
    clip = _num(wrapper, "max_grad_norm", 1.0, f"{src}: runner_wrapper") if wrapper.get("use_clip_grad", True) else 0.0

    ds = section("train_dataset")
    loader = ds.get("data_loader") or {}
    tok = ds.get("tokenizer") or {}
    if not loader.get("dataset_dir"):
        raise ConfigError(f"{src}: train_dataset.data_loader.dataset_dir is required (see scripts/prepare_corpus.py)")
    dataset_dir = _path(loader["dataset_dir"], rc)

    log_interval, save_interval, keep = 10, 0, 2
    callbacks = raw.get("callbacks") or []
    if not isinstance(callbacks, list):
        raise ConfigError(f"{src}: 'callbacks' must be a list of {{type: ...}} mappings")
    for cb in callbacks:
        kind = cb.get("type") if isinstance(cb, dict) else None
        if kind not in _CALLBACKS:
            raise ConfigError(f"{src}: callback {cb!r} is not supported (known: {', '.join(_CALLBACKS)})")
        if kind == "MFLossMonitor":
            log_interval = _num(cb, "per_print_times", 10, f"{src}: callbacks.MFLossMonitor", int, 1)
        elif kind == "CheckpointMonitor":
            save_interval = _num(cb, "save_checkpoint_steps", 0, f"{src}: callbacks.CheckpointMonitor", int)
            keep = _num(cb, "keep_checkpoint_max", 2, f"{src}: callbacks.CheckpointMonitor", int, 1)

    rt = rc.runtime
    if "seq_length" not in rt:
        raise ConfigError(f"{src}: model.model_config.seq_length is required for training")
    eval_file = loader.get("eval_file")
    return TrainConfig(
        seq_length=rt["seq_length"], batch_size=batch_size, steps=steps,
        learning_rate=_num(lr, "learning_rate", 1e-3, f"{src}: lr_schedule"),
        lr_end=_num(lr, "lr_end", 0.0, f"{src}: lr_schedule"), warmup_steps=warmup,
        betas=(float(betas[0]), float(betas[1])), eps=_num(opt, "eps", 1e-8, f"{src}: optimizer"),
        weight_decay=_num(opt, "weight_decay", 0.0, f"{src}: optimizer"), clip_norm=clip,
        bias_update_rate=rt.get("moe_router_bias_update_rate", 1e-3),
        aux_loss_coeff=rt.get("moe_aux_loss_coeff", 0.0),
        mtp_loss_weight=rt.get("mtp_loss_scaling_factor", 0.0),
        init_std=rt.get("init_method_std", 0.02),
        dataset_dir=dataset_dir, train_file=os.path.join(dataset_dir, loader.get("train_file", "train.txt")),
        eval_file=os.path.join(dataset_dir, eval_file) if eval_file else None,
        tokenizer_dir=_path(tok.get("tokenizer_dir"), rc),
        tokenizer_type=str(tok.get("model_type", "bpe")),
        log_interval=log_interval, save_interval=save_interval, keep_checkpoints=keep,
        do_eval=bool(raw.get("do_eval", False)) and bool(eval_file),
        eval_interval=int(raw.get("eval_step_interval", 0) or 0),
        resume=bool(raw.get("resume_training", False)), seed=rc.seed,
        output_dir=os.path.abspath(rc.output_dir))


def load_train_config(path: str, overrides: Optional[Mapping[str, Any]] = None):
    """(RunConfig, TrainConfig) from one YAML."""
    rc = load_yaml_config(path, overrides)
    return rc, train_config(rc)
