"""MindSpore checkpoint export (`deepseek-ms convert`) and import.

The output folder holds `config.json` (the model's DeepseekConfig) and `model.ckpt`
(MindSpore's format, parameters named like the Cells), and `load_model` reads it back.
"""
from __future__ import annotations

import json
import logging
import os

from .safetensors_io import CheckpointError

logger = logging.getLogger(__name__)


def save_ms_checkpoint(net, folder: str) -> str:
    import mindspore as ms

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(net.config.to_dict(), f, indent=2)
    path = os.path.join(folder, "model.ckpt")
    ms.save_checkpoint([{"name": n, "data": p} for n, p in net.parameters_and_names()], path)
    logger.info("wrote %s", path)
    return path


def load_ms_checkpoint(net, path: str) -> None:
    import mindspore as ms

    try:
        params = ms.load_checkpoint(path)
    except Exception as e:  # MindSpore raises ValueError/RuntimeError with its own wording
        raise CheckpointError(f"{path}: cannot read MindSpore checkpoint ({e})") from None
    expected = dict(net.parameters_and_names())
    for name in params:
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected parameter '{name}'")
    for name, param in expected.items():
        if name not in params:
            raise CheckpointError(f"{path}: missing parameter '{name}'")
        if tuple(params[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: parameter '{name}' has shape {list(params[name].shape)}, "
                                  f"expected {list(param.shape)}")
    # weights the HF loader would keep in bf16 (Linear / RoutedExperts `bf16_storage`) keep a
    # saved bf16 value as it is instead of being widened into the fp32 parameter
    keep_dtype = {id(p) for _, cell in net.cells_and_names() if getattr(cell, "bf16_storage", False)
                  for p in cell.get_parameters(expand=False)}
    for name, param in expected.items():
        value = params[name]
        if id(param) in keep_dtype and value.dtype in (ms.bfloat16, ms.float32) and value.dtype != param.dtype:
            param.set_dtype(value.dtype)
        param.set_data(value)
