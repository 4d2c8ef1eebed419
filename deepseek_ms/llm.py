"""Offline batch generation: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

from .engine.llm_engine import EngineConfig, LLMEngine
from .engine.request import RequestOutput
from .engine.sampling import SamplingParams

Prompt = Union[str, Sequence[int]]


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))


class LLM:
    """A model plus its tokenizer and a continuous-batching engine.

    `model` is a folder (HF or converted), a predict YAML, or an already loaded CausalLM;
    `parallel_config` (mindformers keys) loads this rank's shard under msrun; `kernels` is
    load_model's. Engine settings (block_size, max_num_seqs, ...) are EngineConfig fields."""

    def __init__(self, model, tokenizer=None, progress: bool = True, parallel_config=None,
                 kernels: Optional[str] = None, **engine_kwargs):
        from .api import CausalLM, load_model
        if isinstance(model, CausalLM):
            if kernels is not None:
                raise ValueError("kernels is chosen when the model is loaded: pass it to load_model")
            self.model = model
        else:
            self.model = load_model(model, parallel_config=parallel_config, progress=progress, kernels=kernels)
            if tokenizer is None and os.path.isdir(model) and _has_tokenizer(model):
                from .tokenizer import load_tokenizer
                tokenizer = load_tokenizer(model)
        if isinstance(tokenizer, str):
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(self.model, tokenizer, EngineConfig(**engine_kwargs))

    def generate(self, prompts: Union[Prompt, List[Prompt]],
                 sampling_params: Union[None, SamplingParams, List[SamplingParams]] = None) -> List[RequestOutput]:
        """Run every prompt to completion (batched continuously); outputs in prompt order."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(batch):
                raise ValueError(f"{len(sampling_params)} SamplingParams for {len(batch)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(batch)
        ids = [self.engine.add_request(None, p, sp) for p, sp in zip(batch, params)]
        final = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, **template_kwargs) -> RequestOutput:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    **template_kwargs)
        return self.generate([list(prompt)], sampling_params)[0]
