"""The compiled training step: forward, losses, gradients, clipping, AdamW, router-bias update.

`TrainForward` runs the decoder stack itself (instead of `DeepseekForCausalLM.prefill`)
because training needs, per MoE layer, what inference discards: how many tokens each
expert received (for the bias update and the log) and the router's full score matrix
(for the optional sequence-wise balance loss). It calls the model's own Cells, so the
trained parameters are exactly the inference model's.

Losses (DeepSeek-V3 technical report, sections 2.1.2 and 2.2):

* next-token cross entropy;
* ``mtp_loss_scaling_factor`` (lambda) times the MTP module's cross entropy on the token
  after next;
* ``moe_aux_loss_coeff`` (alpha) times the sequence-wise balance loss
  sum_i f_i P_i, per sequence, averaged over sequences and MoE layers.

Auxiliary-loss-free balancing: after each optimizer step, every router's
`e_score_correction_bias` moves by ``moe_router_bias_update_rate`` (gamma) times
sign(mean load - load_e), so under-loaded experts become more likely to be chosen.
"""
from __future__ import annotations

import math

from mindspore import nn, ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

import mindspore as ms

from ..model.transformer import DeepseekForCausalLM


def token_nll(logits, labels):
    """logits [B,S,V] fp32, labels [B,S] int32 -> per-token negative log-likelihood [B,S]."""
    m = ops.stop_gradient(logits.max(-1, keepdims=True))
    lse = ops.log(ops.exp(logits - m).sum(-1)) + m.squeeze(-1)
    picked = ops.gather_elements(logits, 2, labels.expand_dims(-1)).squeeze(-1)
    return lse - picked


def bias_update(bias, load, rate):
    """The aux-loss-free balancing rule: bias_e += rate * sign(mean(load) - load_e)."""
    return bias + rate * ops.sign(load.mean() - load)


class TrainForward(nn.Cell):
    """(loss, (main CE, MTP CE, balance loss), per-MoE-router token counts [n_routers, E])."""

    def __init__(self, net: DeepseekForCausalLM, mtp_weight: float = 0.0, aux_alpha: float = 0.0):
        super().__init__(auto_prefix=False)
        self.net = net
        c = net.config
        self.n_experts = c.n_routed_experts or 1
        self.top_k = c.num_experts_per_tok or 1
        self.mtp_weight = float(mtp_weight)
        self.use_mtp = self.mtp_weight > 0 and len(net.mtp) > 0
        self.aux_alpha = float(aux_alpha)
        self.sigmoid_scores = c.scoring_func == "sigmoid"
        self.n_moe = sum(1 for layer in self.routed_layers())

    def routed_layers(self):
        """Decoder layers with a router, MTP blocks included (in TrainForward's output order)."""
        layers = [layer for layer in self.net.model.layers if layer.is_moe]
        if self.use_mtp and self.net.mtp[0].block.is_moe:
            layers.append(self.net.mtp[0].block)
        return layers

    def _balance_loss(self, gate, x, idx, B, S):
        """Sequence-wise balance loss of one MoE layer (DeepSeek-V3 eq. 17-20)."""
        logits = ops.matmul(x.reshape(B * S, -1), gate.weight.transpose(1, 0))
        scores = ops.sigmoid(logits) if self.sigmoid_scores else ops.softmax(logits, -1)
        p = scores / scores.sum(-1, keepdims=True)
        P = p.reshape(B, S, self.n_experts).mean(1)                                        # [B,E]
        chosen = ops.one_hot(idx, self.n_experts, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))
        f = chosen.sum(1).reshape(B, S, self.n_experts).sum(1) * (self.n_experts / (self.top_k * S))
        return (ops.stop_gradient(f) * P).sum(-1).mean()

    def _layer(self, layer, x, cos, sin, mask):
        """One decoder layer; returns (output, tokens per expert or None, balance loss or None)."""
        B, S, _ = x.shape
        a, _ = layer.self_attn.prefill(layer.input_layernorm(x), cos, sin, mask)
        h = x + a
        xn = layer.post_attention_layernorm(h)
        if not layer.is_moe:
            return h + layer.mlp(xn), None, None
        y, idx, _ = layer.mlp(xn)
        counts = ops.one_hot(idx, self.n_experts, ms.Tensor(1.0, ms.float32),
                             ms.Tensor(0.0, ms.float32)).sum(1).sum(0)
        bal = self._balance_loss(layer.mlp.gate, xn, idx, B, S) if self.aux_alpha > 0 else None
        return h + y, ops.stop_gradient(counts), bal

    def construct(self, ids, labels, positions, mask, mtp_positions, mtp_mask):
        net = self.net
        cos, sin = net.rotary(positions)
        h = net.embed(ids)
        loads = []
        bal = ms.Tensor(0.0, ms.float32)
        for layer in net.model.layers:
            h, counts, b = self._layer(layer, h, cos, sin, mask)
            if layer.is_moe:
                loads.append(counts)
                if self.aux_alpha > 0:
                    bal = bal + b
        hidden = net.model.norm(h)
        main = token_nll(net.head(hidden), labels).mean()
        loss = main
        mtp = ms.Tensor(0.0, ms.float32)
        if self.use_mtp:
            # position i: main hidden h_i + embedding of t_{i+1} -> t_{i+2} (= labels[:, i+1])
            m = net.mtp[0]
            x = m.combine(net.embed(ids[:, 1:]), hidden[:, :-1])
            mcos, msin = net.rotary(mtp_positions)
            x, counts, b = self._layer(m.block, x, mcos, msin, mtp_mask)
            mtp = token_nll(net.head(m.shared_head_norm(x)), labels[:, 1:]).mean()
            loss = loss + self.mtp_weight * mtp
            if m.block.is_moe:
                loads.append(counts)
                if self.aux_alpha > 0:
                    bal = bal + b
        if self.aux_alpha > 0:
            bal = bal / self.n_moe
            loss = loss + self.aux_alpha * bal
        if not loads:  # a dense model: nothing to balance
            loads.append(ops.zeros((self.n_experts,), ms.float32))
        return loss, ops.stack((main, mtp, bal)), ops.stack(loads)


class WarmupCosineLR(LearningRateSchedule):
    """Linear warmup to `learning_rate`, then cosine decay to `lr_end` at `total_steps`."""

    def __init__(self, learning_rate: float, warmup_steps: int, total_steps: int, lr_end: float = 0.0):
        super().__init__()
        self.lr = float(learning_rate)
        self.lr_end = float(lr_end)
        self.warmup = float(max(warmup_steps, 1))
        self.decay = float(max(total_steps - warmup_steps, 1))

    def construct(self, global_step):
        step = global_step.astype(ms.float32)
        warm = self.lr * (step + 1.0) / self.warmup
        progress = ops.clip_by_value((step - self.warmup) / self.decay, 0.0, 1.0)
        cosine = self.lr_end + 0.5 * (self.lr - self.lr_end) * (1.0 + ops.cos(math.pi * progress))
        return ops.select(step < self.warmup, warm, cosine)

    def at(self, step: int) -> float:
        """The same schedule on the host (for logging)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(max((step - self.warmup) / self.decay, 0.0), 1.0)
        return self.lr_end + 0.5 * (self.lr - self.lr_end) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(net, lr_schedule, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    """AdamW (decoupled weight decay) over the trainable parameters; matrices decay, norms do not."""
    params = net.trainable_params()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return nn.AdamWeightDecay(groups, learning_rate=lr_schedule, beta1=betas[0], beta2=betas[1], eps=eps)


class TrainStep(nn.Cell):
    """One optimizer step. Returns (loss, loss parts, tokens per expert, gradient norm)."""

    def __init__(self, forward: TrainForward, optimizer, clip_norm: float = 1.0, bias_rate: float = 0.0):
        super().__init__(auto_prefix=False)
        self.forward = forward
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ms.value_and_grad(forward, None, self.weights, has_aux=True)
        self.clip_norm = float(clip_norm)
        self.bias_rate = float(bias_rate)
        self.biases = [layer.mlp.gate.e_score_correction_bias for layer in forward.routed_layers()
                       if layer.mlp.gate.use_bias] if bias_rate > 0 else []

    def construct(self, ids, labels, positions, mask, mtp_positions, mtp_mask):
        (loss, parts, loads), grads = self.grad_fn(ids, labels, positions, mask, mtp_positions, mtp_mask)
        norm = ops.sqrt(ops.addn([ops.square(g).sum() for g in grads]))
        scale = ops.minimum(self.clip_norm / (norm + 1e-6), 1.0)
        grads = tuple(g * scale for g in grads)
        loss = ops.depend(loss, self.optimizer(grads))
        for i, bias in enumerate(self.biases):
            loss = ops.depend(loss, ops.assign(bias, bias_update(bias, loads[i], self.bias_rate)))
        return loss, parts, loads, norm


class EvalNLL(nn.Cell):
    """Per-window summed next-token NLL [B] (no MTP, no gradients)."""

    def __init__(self, net: DeepseekForCausalLM):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, ids, labels, positions, mask):
        hidden, _, _ = self.net.prefill(ids, positions, mask)
        return token_nll(self.net.head(hidden), labels).sum(-1)
