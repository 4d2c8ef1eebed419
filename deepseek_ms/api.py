"""The public entry point: `load_model(path)` -> a `CausalLM` with numpy in, numpy out.

`CausalLM` owns the MindSpore network and its compiled steps. Prompt processing runs the
expanded-MLA prefill graph; every further token runs the absorbed-MLA cached graph over a
latent cache held in host numpy arrays that the graph reads zero-copy (the graph returns
new latent rows and the host stores them; see shared notes on MindSpore CPU speed).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .config import ConfigError, DeepseekConfig, ParallelConfig

logger = logging.getLogger(__name__)

MASKED = np.float32(-1e30)
CACHE_ALIGN = 64  # cache lengths are rounded up so few distinct decode graphs get compiled


def causal_mask(batch: int, seq_len: int) -> np.ndarray:
    """Additive [B,S,S] mask: query i sees keys j <= i."""
    upper = np.triu(np.ones((seq_len, seq_len), dtype=bool), 1)
    return np.broadcast_to(np.where(upper, MASKED, np.float32(0)), (batch, seq_len, seq_len)).copy()


def _as_ids(input_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids out of range: must be in [0, {vocab_size}), got min {ids.min()} "
                         f"max {ids.max()}")
    return ids.astype(np.int32)


class CausalLM:
    def __init__(self, config: DeepseekConfig, max_seq_len: int = 4096,
                 parallel: Optional[ParallelConfig] = None, device_target: Optional[str] = None,
                 kernels: str = "auto"):
        import mindspore as ms

        from .backend import check_compute_dtype, init_device, ms_dtype, native_kernels
        from .model.transformer import CachedStep, DeepseekForCausalLM, PrefillStep

        self.device_target = init_device(device_target)
        check_compute_dtype(config.compute_dtype)
        self.config = config
        from .parallel.layout import init_parallel
        from .parallel.runtime import DataParallelRows

        self.parallel = parallel or ParallelConfig()
        self.layout = init_parallel(self.parallel)
        self._dp = DataParallelRows(self.layout.dp)  # the identity unless data_parallel > 1
        self.max_seq_len = int(min(max_seq_len, config.max_position_embeddings))
        self.net = DeepseekForCausalLM(config, self.max_seq_len, self.layout.tp, self.layout.experts,
                                       param_dtype=ms_dtype(config.param_dtype),
                                       compute_dtype=ms_dtype(config.compute_dtype))
        self.net.use_kernels(native_kernels(kernels))
        self.net.set_train(False)
        self._ms = ms
        self._prefill = ms.jit(PrefillStep(self.net))
        self._cached = ms.jit(CachedStep(self.net))
        self._mtp = {}
        self._paged = {}
        self.paged_steps_used = False  # an engine has claimed the paged steps (see ModelRunner._warm_up)

    def paged_steps(self, return_hidden: bool = False):
        """(prefill, cached) compiled steps over a paged cache, shared by every engine built on
        this model so that a graph compiled for one shape is never compiled twice. With
        `return_hidden` the steps also return the final hidden states (for the MTP drafter)."""
        self.paged_steps_used = True
        if return_hidden not in self._paged:
            from .model.transformer import PagedCachedStep, PagedPrefillStep
            self._paged[return_hidden] = (self._ms.jit(PagedPrefillStep(self.net, return_hidden)),
                                          self._ms.jit(PagedCachedStep(self.net, return_hidden)))
        return self._paged[return_hidden]

    def paged_mtp_step(self, depth: int = 0):
        """The compiled MTP drafter step over its own paged latent pool (speculative decoding)."""
        if depth >= self.config.num_nextn_predict_layers:
            raise ValueError(f"speculative decoding needs MTP weights: the model has "
                             f"{self.config.num_nextn_predict_layers} MTP layers (num_nextn_predict_layers)")
        key = ("paged", depth)
        if key not in self._mtp:
            from .model.transformer import PagedMTPStep
            self._mtp[key] = self._ms.jit(PagedMTPStep(self.net, depth))
        return self._mtp[key]

    def _check_len(self, total: int) -> None:
        if total > self.max_seq_len:
            raise ValueError(f"sequence of {total} tokens exceeds max_seq_len {self.max_seq_len}")

    def _run_prefill(self, ids: np.ndarray):
        """(logits [B,S,V], latents [L,B,S,D], routing indices, routing weights) as numpy.

        With data parallelism the latents are this rank's rows only; the rest is gathered."""
        B, S = ids.shape
        self._check_len(S)
        ids = self._dp.local(ids)
        T = self._ms.Tensor
        positions = np.broadcast_to(np.arange(S, dtype=np.int32), (ids.shape[0], S)).copy()
        outs = self._prefill(T(ids), T(positions), T(causal_mask(ids.shape[0], S)))
        # read logits before the other outputs (reading a later output first stalls the CPU runtime)
        outs = [o.asnumpy() for o in outs]
        if self._dp.size > 1:
            outs[0] = self._dp.gather(outs[0], B)
            for i in (2, 3)[:len(outs) - 2]:  # routing [n_moe, rows*S, k]
                n_moe, _, k = outs[i].shape
                rows = outs[i].reshape(n_moe, -1, S, k)
                outs[i] = self._dp.gather(rows, B, axis=1).reshape(n_moe, B * S, k)
        return outs

    # ---- public API ----
    def logits(self, input_ids) -> np.ndarray:
        """np.int64 [B,S] -> np.float32 [B,S,V] prompt logits (no cache)."""
        ids = _as_ids(input_ids, self.config.vocab_size)
        return self._run_prefill(ids)[0]

    def routing(self, input_ids) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Per MoE layer: (expert indices [B*S,k], weights [B*S,k]) chosen for the prompt."""
        ids = _as_ids(input_ids, self.config.vocab_size)
        outs = self._run_prefill(ids)
        if len(outs) < 4:
            return []
        idx, weights = outs[2], outs[3]
        return [(idx[i].astype(np.int64), weights[i]) for i in range(idx.shape[0])]

    def mtp_logits(self, input_ids, depth: int = 0) -> np.ndarray:
        """[B,S-1,V]: entry i is the MTP module's prediction of token i+2."""
        from .model.transformer import MTPStep
        if depth >= self.config.num_nextn_predict_layers:
            raise ValueError(f"model has {self.config.num_nextn_predict_layers} MTP layers, asked for depth {depth}")
        ids = _as_ids(input_ids, self.config.vocab_size)
        B, S = ids.shape
        if S < 2:
            raise ValueError("mtp_logits needs at least 2 tokens")
        self._check_len(S)
        if depth not in self._mtp:
            self._mtp[depth] = self._ms.jit(MTPStep(self.net, depth))
        T = self._ms.Tensor
        pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
        ids, pos = self._dp.local(ids), self._dp.local(pos)
        rows = ids.shape[0]
        out = self._mtp[depth](T(ids), T(pos), T(causal_mask(rows, S)), T(pos[:, :-1].copy()),
                               T(causal_mask(rows, S - 1)))
        return self._dp.gather(out.asnumpy(), B)

    def generate(self, input_ids, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None, return_logits: bool = False
                 ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Prompt [B,S] -> [B,S+max_new_tokens] ids using the cached absorbed decode.

        With `eos_token_id`, a row that produced it keeps emitting it, and generation stops
        early once every row has. `return_logits` also returns the logits [B,new,V] that chose
        each new token.
        """
        ids = _as_ids(input_ids, self.config.vocab_size)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        B, S = ids.shape
        total = S + max_new_tokens
        self._check_len(total)
        capacity = min(-(-total // CACHE_ALIGN) * CACHE_ALIGN, self.max_seq_len)
        rng = np.random.default_rng(seed)
        T = self._ms.Tensor
        cfg = self.config

        logits, latents = self._run_prefill(ids)[:2]
        rows = latents.shape[1]  # this data-parallel rank's rows (all B without data parallelism)
        caches = [np.zeros((rows, capacity, cfg.latent_dim), dtype=np.float32)
                  for _ in range(cfg.num_hidden_layers)]
        for layer, cache in enumerate(caches):
            cache[:, :S] = latents[layer]
        cache_inputs = [T.from_numpy(c) for c in caches]  # zero-copy: host writes are seen by the graph

        out = [ids.astype(np.int64)]
        chosen_logits = []
        step_logits = logits[:, -1]
        finished = np.zeros(B, dtype=bool)
        past_mask = np.full((rows, 1, capacity), MASKED, dtype=np.float32)
        self_mask = np.zeros((rows, 1, 1), dtype=np.float32)
        for step in range(max_new_tokens):
            chosen_logits.append(step_logits)
            tok = self._select(step_logits, do_sample, temperature, top_k, top_p, rng)
            if eos_token_id is not None:
                tok = np.where(finished, eos_token_id, tok)
                finished |= tok == eos_token_id
            out.append(tok[:, None].astype(np.int64))
            if step == max_new_tokens - 1 or (eos_token_id is not None and finished.all()):
                break
            cur = S + step
            past_mask[:, :, :cur] = 0
            positions = np.full((rows, 1), cur, dtype=np.int32)
            lg, new_rows = self._cached(T(self._dp.local(tok[:, None].astype(np.int32))), T(positions),
                                        T(past_mask), T(self_mask), *cache_inputs)
            step_logits = self._dp.gather(lg.asnumpy()[:, -1], B)
            new_rows = new_rows.asnumpy()
            for layer, cache in enumerate(caches):
                cache[:, cur] = new_rows[layer][:, 0]
        result = np.concatenate(out, axis=1)
        if return_logits:
            return result, np.stack(chosen_logits, 1)
        return result

    @staticmethod
    def _select(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
                rng: np.random.Generator) -> np.ndarray:
        if not do_sample:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / temperature
        if top_k and top_k < z.shape[-1]:
            kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if top_p < 1.0:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            p = np.where(keep, p, 0)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def load_model(path: str, parallel_config: Optional[Union[dict, ParallelConfig]] = None,
               max_seq_len: Optional[int] = None, device_target: Optional[str] = None,
               overrides: Optional[Dict[str, Any]] = None, progress: bool = True,
               kernels: Optional[str] = None) -> CausalLM:
    """Load a model from an HF folder (config.json + safetensors, FP8 included), a folder
    written by `deepseek-ms convert` (config.json + model.ckpt), or a predict YAML.

    `kernels`: "auto" uses deepseek-ms's native CPU kernels where they help (see
    deepseek_ms.backend.native_kernels); "mindspore" keeps MindSpore's ops only. Default: a
    YAML's `model.model_config.kernels`, else "auto"."""
    from .checkpoint.hf_loader import load_hf_weights

    if os.path.isfile(path) and path.endswith((".yaml", ".yml")):
        from .yaml_config import load_yaml_config
        run = load_yaml_config(path)
        config = run.model
        folder = run.load_checkpoint or run.pretrained_model_dir
        # as in mindformers, parallel_config applies only with use_parallel: True
        parallel_config = parallel_config or (run.parallel if run.use_parallel else None)
        device_target = device_target or run.context.get("device_target")
        kernels = kernels or run.runtime.get("kernels")
        if overrides:
            config = config.replace(**overrides)
        if not folder:
            raise ConfigError(f"{path}: set 'pretrained_model_dir' or 'load_checkpoint' to the weights folder")
    else:
        folder = path
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"model folder not found: {folder}")
        config = DeepseekConfig.from_pretrained(folder, overrides)
    if isinstance(parallel_config, dict):
        parallel_config = ParallelConfig.from_dict(parallel_config)
    model = CausalLM(config, max_seq_len or min(config.max_position_embeddings, 4096), parallel_config,
                     device_target, kernels or "auto")
    ckpt = os.path.join(folder, "model.ckpt")
    if os.path.isfile(ckpt):
        from .checkpoint.convert import load_ms_checkpoint
        load_ms_checkpoint(model.net, ckpt)
    else:
        load_hf_weights(model.net, folder, progress=progress)
    return model
