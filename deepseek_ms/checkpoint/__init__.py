"""Checkpoint file layer: pure-numpy safetensors reading/writing with BF16 and FP8 support."""
from . import safetensors_io
from .safetensors_io import *  # noqa: F401,F403 -- the public names are safetensors_io.__all__

__all__ = list(safetensors_io.__all__)
