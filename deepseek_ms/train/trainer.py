"""The training loop: data, model init, compiled step, logging, checkpoints, eval, export.

Layout of ``output_dir``::

    tokenizer/            sentencepiece model + tokenizer_config.json (trained once)
    checkpoints/step_N.npz   model + AdamW state + router biases at step N
    metrics.json          unigram / untrained / trained held-out perplexity, tokens, time
    train_token_counts.npy   training-token counts (the unigram baseline's statistics)
    export/               HF folder: config.json, model.safetensors (bf16), tokenizer, generation_config.json

Resuming (``resume_training: True``) restores the newest checkpoint; since batches are a
function of the step (`data.BatchSchedule`) and nothing else is random, the resumed
run's losses equal the uninterrupted run's.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from ..api import causal_mask
from ..config import DeepseekConfig
from ..yaml_config import RunConfig
from .config import TrainConfig
from .data import BatchSchedule, encode_corpus, eval_batches, train_tokenizer, unigram_perplexity

logger = logging.getLogger(__name__)

_RESIDUAL_OUT = ("o_proj", "down_proj", "eh_proj")  # projections that write into the residual stream


def init_weights(net, std: float, seed: int) -> None:
    """Normal(0, std) matrices (residual-stream outputs scaled by 1/sqrt(2 * layers), as in
    GPT-2/Megatron), ones for norms, zeros for router biases."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    depth = net.config.num_hidden_layers + net.config.num_nextn_predict_layers
    for name, param in net.parameters_and_names():
        if param.ndim < 2:
            continue  # norm weights stay 1, e_score_correction_bias stays 0
        s = std / math.sqrt(2 * depth) if any(k in name for k in _RESIDUAL_OUT) else std
        param.set_data(ms.Tensor(rng.normal(0.0, s, param.shape).astype(np.float32)))


def _inputs(batch: np.ndarray):
    """[B, S+1] window batch -> the six step inputs (ids, labels, positions, mask, MTP positions, MTP mask)."""
    import mindspore as ms

    B, S1 = batch.shape
    S = S1 - 1
    pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
    return (ms.Tensor(batch[:, :-1].astype(np.int32)), ms.Tensor(batch[:, 1:].astype(np.int32)), ms.Tensor(pos),
            ms.Tensor(causal_mask(B, S)), ms.Tensor(pos[:, :-1].copy()), ms.Tensor(causal_mask(B, S - 1)))


def max_violation(loads: np.ndarray) -> float:
    """Mean over MoE layers of (max load - mean load) / mean load (the Loss-Free Balancing paper's MaxVio)."""
    mean = loads.mean(-1)
    return float(((loads.max(-1) - mean) / np.maximum(mean, 1e-9)).mean())


class Trainer:
    def __init__(self, rc: RunConfig, tc: TrainConfig, progress: bool = True):
        import mindspore as ms

        from ..backend import init_device
        from ..model.transformer import DeepseekForCausalLM
        from ..tokenizer import load_tokenizer
        from .step import EvalNLL, TrainForward, TrainStep, WarmupCosineLR, build_optimizer

        self.rc, self.tc, self.progress = rc, tc, progress
        self.config: DeepseekConfig = rc.model
        if self.config.compute_dtype != "float32" or self.config.param_dtype != "float32":
            raise ValueError("training runs in float32: set compute_dtype and params_dtype to float32")
        init_device(rc.context.get("device_target"))
        os.makedirs(tc.output_dir, exist_ok=True)
        self.ckpt_dir = os.path.join(tc.output_dir, "checkpoints")

        self.tokenizer_dir = tc.tokenizer_dir or os.path.join(tc.output_dir, "tokenizer")
        if not os.path.isfile(os.path.join(self.tokenizer_dir, "tokenizer.model")):
            if tc.tokenizer_dir:
                raise FileNotFoundError(f"train_dataset.tokenizer.tokenizer_dir {tc.tokenizer_dir} has no tokenizer.model")
            train_tokenizer(tc.train_file, self.tokenizer_dir, self.config.vocab_size, tc.tokenizer_type,
                            self.config.max_position_embeddings)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if len(self.tokenizer) > self.config.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer_dir} has {len(self.tokenizer)} tokens, more than the "
                             f"model's vocab_size {self.config.vocab_size}")
        self.train_stream = encode_corpus(self.tokenizer, tc.train_file)
        self.eval_stream = encode_corpus(self.tokenizer, tc.eval_file) if tc.eval_file else None
        self.schedule = BatchSchedule(self.train_stream, tc.seq_length, tc.batch_size, tc.seed)
        logger.info("corpus: %d training tokens (%d steps per epoch of %d x %d), %s held-out tokens",
                    len(self.train_stream), self.schedule.steps_per_epoch, tc.batch_size, tc.seq_length,
                    len(self.eval_stream) if self.eval_stream is not None else "no")

        ms.set_seed(tc.seed)
        self.net = DeepseekForCausalLM(self.config, tc.seq_length)
        self.net.set_train(True)  # training takes the dense expert path (no data-dependent branches)
        if self.rc.pretrained_model_dir and glob.glob(os.path.join(self.rc.pretrained_model_dir, "*.safetensors")):
            from ..checkpoint.hf_loader import load_hf_weights
            load_hf_weights(self.net, self.rc.pretrained_model_dir, progress=progress)  # fine-tuning
        else:
            init_weights(self.net, tc.init_std, tc.seed)
        self.lr = WarmupCosineLR(tc.learning_rate, tc.warmup_steps, tc.steps, tc.lr_end)
        self.optimizer = build_optimizer(self.net, self.lr, tc.betas, tc.eps, tc.weight_decay)
        self.forward = TrainForward(self.net, tc.mtp_loss_weight, tc.aux_loss_coeff)
        clip = tc.clip_norm if tc.clip_norm > 0 else float("inf")
        self.step_fn = ms.jit(TrainStep(self.forward, self.optimizer, clip, tc.bias_update_rate))
        self._eval_fn = ms.jit(EvalNLL(self.net))
        self.step = 0

    # ---- state ----
    def _state(self) -> Dict[str, object]:
        state = {f"net/{name}": p for name, p in self.net.parameters_and_names()}
        for p in list(self.optimizer.moments1) + list(self.optimizer.moments2):
            state[f"opt/{p.name}"] = p
        state["opt/global_step"] = self.optimizer.global_step
        return state

    def save_checkpoint(self) -> str:
        os.makedirs(self.ckpt_dir, exist_ok=True)
        path = os.path.join(self.ckpt_dir, f"step_{self.step}.npz")
        arrays = {name: p.asnumpy() for name, p in self._state().items()}
        arrays["meta/step"] = np.array(self.step)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        for old in self.checkpoints()[:-self.tc.keep_checkpoints]:
            os.remove(old)
        logger.info("saved checkpoint %s", path)
        return path

    def checkpoints(self) -> List[str]:
        paths = glob.glob(os.path.join(self.ckpt_dir, "step_*.npz"))
        return sorted(paths, key=lambda p: int(os.path.basename(p)[5:-4]))

    def load_checkpoint(self, path: str) -> None:
        import mindspore as ms

        with np.load(path) as data:
            state = self._state()
            missing = sorted(set(state) - set(data.files))
            if missing:
                raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
            for name, param in state.items():
                array = data[name]
                if tuple(array.shape) != tuple(param.shape):
                    raise ValueError(f"checkpoint {path}: {name} has shape {array.shape}, expected {tuple(param.shape)}")
                param.set_data(ms.Tensor(array.astype(np.float32) if name != "opt/global_step" else array))
            self.step = int(data["meta/step"])
        logger.info("resumed from %s at step %d", path, self.step)

    # ---- eval ----
    def evaluate(self, stream: Optional[np.ndarray] = None) -> float:
        """Held-out perplexity (next-token, every token of every full window counted once)."""
        stream = self.eval_stream if stream is None else stream
        total, count = 0.0, 0
        for rows, real in eval_batches(stream, self.tc.seq_length, self.tc.batch_size):
            batch_inputs = _inputs(rows)
            nll = self._eval_fn(batch_inputs[0], batch_inputs[1], batch_inputs[2], batch_inputs[3]).asnumpy()
            total += float(nll[:real].sum())
            count += real * self.tc.seq_length
        return math.exp(total / count)

    # ---- loop ----
    def train(self, steps: Optional[int] = None) -> List[float]:
        """Run until `steps` (default: stop_step). Returns this call's per-step main losses."""
        tc = self.tc
        if tc.resume and self.step == 0 and self.checkpoints():
            self.load_checkpoint(self.checkpoints()[-1])
        stop = tc.steps if steps is None else steps
        metrics = self._read_metrics()
        if self.step == 0 and tc.do_eval and self.eval_stream is not None:
            # the baseline's sufficient statistics, so it can be recomputed without the corpus
            np.save(os.path.join(tc.output_dir, "train_token_counts.npy"),
                    np.bincount(self.train_stream, minlength=self.config.vocab_size).astype(np.int64))
            metrics["unigram_ppl"] = unigram_perplexity(self.train_stream, self.eval_stream, self.config.vocab_size)
            metrics["untrained_ppl"] = self.evaluate()
            logger.info("held-out perplexity: unigram %.1f, untrained model %.1f",
                        metrics["unigram_ppl"], metrics["untrained_ppl"])
        losses: List[float] = []
        tokens = tc.batch_size * tc.seq_length
        bar = tqdm(total=stop, initial=self.step, desc="train", unit="step", disable=not self.progress)
        t_log, n_log = time.time(), 0
        t_start = time.time()
        while self.step < stop:
            out = self.step_fn(*_inputs(self.schedule.batch(self.step)))
            loss = float(out[0].asnumpy())
            parts, loads, norm = out[1].asnumpy(), out[2].asnumpy(), float(out[3].asnumpy())
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}")
            losses.append(float(parts[0]))
            self.step += 1
            n_log += 1
            bar.update(1)
            bar.set_postfix(loss=f"{parts[0]:.3f}")
            if self.step % tc.log_interval == 0 or self.step == stop:
                dt = time.time() - t_log
                logger.info("step %d/%d loss %.4f mtp %.4f lr %.2e grad_norm %.3f tokens/s %.0f "
                            "expert load max-violation %.3f", self.step, stop, parts[0], parts[1],
                            self.lr.at(self.step - 1), norm, n_log * tokens / max(dt, 1e-9), max_violation(loads))
                t_log, n_log = time.time(), 0
            if tc.save_interval and self.step % tc.save_interval == 0 and self.step < stop:
                self.save_checkpoint()
            if tc.do_eval and tc.eval_interval and self.step % tc.eval_interval == 0 and self.step < stop:
                logger.info("step %d held-out perplexity %.2f", self.step, self.evaluate())
        bar.close()
        if steps is None:
            self.save_checkpoint()
            metrics["steps"] = self.step
            metrics["train_tokens"] = self.step * tokens
            metrics["train_seconds"] = metrics.get("train_seconds", 0.0) + time.time() - t_start
            if tc.do_eval and self.eval_stream is not None:
                metrics["trained_ppl"] = self.evaluate()
                logger.info("held-out perplexity after %d steps: %.2f", self.step, metrics["trained_ppl"])
            self._write_metrics(metrics)
        return losses

    def _read_metrics(self) -> dict:
        path = os.path.join(self.tc.output_dir, "metrics.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return {}

    def _write_metrics(self, metrics: dict) -> None:
        with open(os.path.join(self.tc.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")

    # ---- export ----
    def export(self, folder: Optional[str] = None) -> str:
        from .export import export_hf
        folder = folder or os.path.join(self.tc.output_dir, "export")
        export_hf(self.net, folder, self.tokenizer_dir, self.tokenizer)
        return folder


def run(config_path: str, overrides=None, progress: bool = True) -> str:
    """`deepseek-ms train`: train as configured, then export the HF folder. Returns its path."""
    from .config import load_train_config
    rc, tc = load_train_config(config_path, overrides)
    trainer = Trainer(rc, tc, progress)
    trainer.train()
    shutil.copyfile(config_path, os.path.join(tc.output_dir, "train_config.yaml"))
    return trainer.export()
