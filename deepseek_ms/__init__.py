"""deepseek-ms: DeepSeek V2 / V2-Lite / V3 / R1 natively in MindSpore.

    import deepseek_ms
    model = deepseek_ms.load_model("path/to/hf_folder")
    logits = model.logits(input_ids)                       # [B,S] -> [B,S,V]
    ids = model.generate(input_ids, max_new_tokens=20)     # cached absorbed-MLA decode

Importing the package is cheap: MindSpore is imported only when a model is built.
"""
__version__ = "0.1.0"

_LAZY = {
    "load_model": "api", "CausalLM": "api",
    "DeepseekConfig": "config", "ParallelConfig": "config", "ConfigError": "config",
    "CheckpointError": "checkpoint.safetensors_io",
    "load_yaml_config": "yaml_config",
    "load_tokenizer": "tokenizer",
    "LLM": "llm",
    "SamplingParams": "engine.sampling",
    "LLMEngine": "engine.llm_engine", "EngineConfig": "engine.llm_engine",
    "AsyncLLMEngine": "engine.async_engine",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deepseek_ms' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
