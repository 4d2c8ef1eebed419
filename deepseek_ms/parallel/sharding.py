"""Semi-auto-parallel `shard()` strategies for training on Ascend/GPU, and their checker.

MindSpore's semi_auto_parallel mode splits each operator by the strategy given to its
primitive and inserts the collectives itself. It runs only on Ascend/GPU (the CPU backend
rejects the mode), so on CPU these strategies are generated and *checked*, never run.

Every strategy is written as a tensor map: for each input, for each dimension, the mesh
axis splitting it (or None). Dense layers use the mesh (dp, mp) = (data_parallel,
model_parallel); routed experts re-factor the same devices as (ep, moe_tp), the layout
`deepseek_ms.parallel.layout` uses for inference:

* column-parallel Linear: x (dp, -) @ W[out,in] (mp, -)  -> y (dp, mp)
* row-parallel Linear:    x (dp, mp) @ W (-, mp)         -> y (dp, -), partial sums over mp
* replicated Linear, router: x (dp, -) @ W (-, -)        -> y (dp, -)
* vocabulary embedding:   table (mp, -), ids (dp, -)     -> rows (dp, -, -), partial over mp
* experts gate/up:        x[E,N,H] (ep, -, -) @ W[E,I,H] (ep, moe_tp, -) -> (ep, -, moe_tp)
* experts down:           (ep, -, moe_tp) @ W[E,H,I] (ep, -, moe_tp)     -> (ep, -, -)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import ParallelConfig

Axes = Tuple[Optional[str], ...]


@dataclass(frozen=True)
class OpStrategy:
    name: str                            # cell path and operation
    inputs: Tuple[Axes, ...]             # tensor map of each input
    shapes: Tuple[Tuple[int, ...], ...]  # the input shapes the op sees
    output: Axes                         # tensor map of the output
    reduced: Tuple[str, ...] = ()        # mesh axes the output is a partial sum over
    consumes: Optional[str] = None       # op whose output is this op's first input

    def shard(self, mesh: Dict[str, int]) -> Tuple[Tuple[int, ...], ...]:
        """The `Primitive.shard()` in_strategy."""
        return tuple(tuple(mesh[a] if a else 1 for a in axes) for axes in self.inputs)


def meshes(config: ParallelConfig) -> Dict[str, int]:
    moe_tp = config.model_parallel * config.data_parallel // config.expert_parallel
    return {"dp": config.data_parallel, "mp": config.model_parallel, "ep": config.expert_parallel, "moe_tp": moe_tp}


def _linear(name, role, n_tokens, in_f, out_f, consumes=None) -> OpStrategy:
    x, w = (n_tokens, in_f), (out_f, in_f)
    if role == "column":
        return OpStrategy(name, (("dp", None), ("mp", None)), (x, w), ("dp", "mp"), consumes=consumes)
    if role == "row":
        return OpStrategy(name, (("dp", "mp"), (None, "mp")), (x, w), ("dp", None), ("mp",), consumes)
    return OpStrategy(name, (("dp", None), (None, None)), (x, w), ("dp", None), consumes=consumes)


def model_strategies(net, n_tokens: int) -> List[OpStrategy]:
    """Strategies for every Linear, the embedding, the routers and the routed experts of a
    DeepseekForCausalLM, for a step of `n_tokens` tokens (batch * sequence)."""
    from ..model.linear import Linear
    from ..model.moe import RoutedExperts, Router
    from ..model.transformer import Embedding
    from ..parallel.layers import VocabParallelEmbedding

    c = net.config
    out: List[OpStrategy] = []
    for name, cell in net.cells_and_names():
        if isinstance(cell, Linear):
            out.append(_linear(f"{name}.matmul", cell.role, n_tokens, cell.in_features, cell.out_features,
                               _producer(name, cell.role)))
        elif isinstance(cell, (Embedding, VocabParallelEmbedding)):
            out.append(OpStrategy(f"{name}.gather", (("mp", None), ("dp",)), ((c.vocab_size, c.hidden_size), (n_tokens,)),
                                  ("dp", None), ("mp",)))
        elif isinstance(cell, Router):
            out.append(OpStrategy(f"{name}.matmul", (("dp", None), (None, None)),
                                  ((n_tokens, c.hidden_size), (c.n_routed_experts, c.hidden_size)), ("dp", None)))
        elif isinstance(cell, RoutedExperts):
            E, H, I = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
            x = (E, n_tokens, H)
            for proj in ("gate_proj", "up_proj"):
                out.append(OpStrategy(f"{name}.{proj}", (("ep", None, None), ("ep", "moe_tp", None)),
                                      (x, (E, I, H)), ("ep", None, "moe_tp")))
            out.append(OpStrategy(f"{name}.down_proj", (("ep", None, "moe_tp"), ("ep", None, "moe_tp")),
                                  ((E, n_tokens, I), (E, H, I)), ("ep", None, None), ("moe_tp",),
                                  f"{name}.gate_proj"))
    return out


def _producer(name: str, role: str) -> Optional[str]:
    """The column-parallel op feeding a row-parallel one (their layouts must agree)."""
    if role != "row":
        return None
    parent, leaf = name.rsplit(".", 1)
    feeds = {"down_proj": "gate_proj", "o_proj": "kv_b_proj"}
    return f"{parent}.{feeds[leaf]}.matmul" if leaf in feeds else None


def check_strategies(strategies: Sequence[OpStrategy], config: ParallelConfig) -> List[str]:
    """Every violation found (empty when consistent):

    * a split that does not divide its dimension;
    * a device matrix (the mesh axes an op uses, times the repeated-calculation factor
      MindSpore prepends) whose product is not the device count;
    * a contraction dimension split differently in the two inputs;
    * a consumer whose input layout differs from its producer's output layout.
    """
    mesh = meshes(config)
    devices = config.world_size
    by_name = {s.name: s for s in strategies}
    problems = []
    for s in strategies:
        used = {a for axes in s.inputs for a in axes if a}
        if {"ep", "moe_tp"} & used and {"dp", "mp"} & used:
            problems.append(f"{s.name}: mixes the dense (dp, mp) and expert (ep, moe_tp) meshes")
        for axes, shape in zip(s.inputs, s.shapes):
            if len(axes) != len(shape):
                problems.append(f"{s.name}: tensor map {axes} does not match shape {shape}")
                continue
            for a, dim in zip(axes, shape):
                if a and dim % mesh[a]:
                    problems.append(f"{s.name}: dimension {dim} does not split {mesh[a]} ways over '{a}'")
        product = 1
        for a in used:
            product *= mesh[a]
        if devices % product:
            problems.append(f"{s.name}: device matrix {sorted(used)} (product {product}) does not tile {devices} devices")
        if len(s.inputs) == 2 and len(s.inputs[0]) >= 2 and s.name.rsplit(".", 1)[-1] != "gather":
            if s.inputs[0][-1] != s.inputs[1][-1]:  # x [.., K] @ W[.., K]^T: K split alike
                problems.append(f"{s.name}: contraction dimension split {s.inputs[0][-1]} vs {s.inputs[1][-1]}")
        if s.consumes:
            producer = by_name.get(s.consumes)
            if producer is None:
                problems.append(f"{s.name}: producer {s.consumes} has no strategy")
            elif producer.output != s.inputs[0]:
                problems.append(f"{s.name}: input layout {s.inputs[0]} differs from {s.consumes}'s output "
                                f"{producer.output}")
    return problems


def apply_strategies(net, strategies: Sequence[OpStrategy], config: ParallelConfig) -> int:
    """Set `shard()` on the primitives that own exactly one strategy (each Linear's and each
    router's matmul). Only meaningful with parallel_mode semi_auto_parallel on Ascend/GPU.
    Returns the number of primitives sharded."""
    mesh = meshes(config)
    cells = dict(net.cells_and_names())
    done = 0
    for s in strategies:
        cell_name, op = s.name.rsplit(".", 1)
        prim = getattr(cells.get(cell_name), op, None)
        if op == "matmul" and prim is not None and hasattr(prim, "shard"):
            prim.shard(s.shard(mesh))
            done += 1
    return done
