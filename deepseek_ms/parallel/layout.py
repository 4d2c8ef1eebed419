"""Which rank does what: the parallel layout and its communication groups.

Follows mindformers' `parallel_config` semantics. The world is
`data_parallel * model_parallel * pipeline_stage` ranks in tp-ep-pp-dp order (tensor
parallel varies fastest). Expert parallelism does not add ranks: the `tp * dp` ranks of a
pipeline stage are re-factored as `expert_parallel` groups of `moe_tp = tp * dp / ep`
ranks, so experts split `ep` ways and each expert's intermediate dimension `moe_tp` ways.

* attention, dense MLP, shared experts, embedding and LM head: tensor parallel over `tp`;
  data parallel over `dp` (each dp rank runs its own batch rows);
* routed experts: the tokens of all dp ranks are gathered, every rank computes its
  experts' slice for all of them, and one sum over the stage's ranks (`moe` group)
  completes the layer.

Groups are created once per layout, named after what they hold and the ranks in them
(`tp-0-1`, `moe-0-1-2-3`), and a group of one rank is never created.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..config import ConfigError, ParallelConfig
from ..model.linear import NO_TP, TPGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertGroups:
    """Everything the MoE layer needs to know about its place in the layout."""
    ep: TPGroup = NO_TP        # which slice of the experts this rank holds
    moe_tp: TPGroup = NO_TP    # which slice of each expert's intermediate dimension
    dp: TPGroup = NO_TP        # the ranks whose tokens are gathered before routing
    reduce: TPGroup = NO_TP    # the ranks whose expert partial sums add up to the output


NO_EP = ExpertGroups()


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    config: ParallelConfig
    tp: TPGroup
    dp: TPGroup
    experts: ExpertGroups

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        c = self.config
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp.rank}/{self.tp.size} dp {self.dp.rank}/{self.dp.size} "
                f"ep {self.experts.ep.rank}/{c.expert_parallel} moe_tp {self.experts.moe_tp.rank}/"
                f"{self.experts.moe_tp.size}")


SINGLE = Layout(0, 1, ParallelConfig(), NO_TP, NO_TP, NO_EP)


def validate(config: ParallelConfig, world_size: Optional[int] = None) -> None:
    """Clear errors for layouts this package cannot run."""
    if config.pipeline_stage != 1:
        raise ConfigError(f"parallel_config: pipeline_stage={config.pipeline_stage} is not supported "
                          "(inference runs tensor/expert/data parallel only)")
    tp_dp = config.model_parallel * config.data_parallel
    if tp_dp % config.expert_parallel:
        raise ConfigError(f"parallel_config: expert_parallel ({config.expert_parallel}) must divide "
                          f"model_parallel * data_parallel ({tp_dp}), as in mindformers")
    if world_size is not None and world_size != config.world_size:
        raise ConfigError(f"parallel_config asks for data_parallel*model_parallel*pipeline_stage = "
                          f"{config.world_size} ranks but {world_size} are running "
                          f"(launch with msrun --worker_num={config.world_size})")


def rank_groups(config: ParallelConfig) -> Dict[str, List[List[int]]]:
    """Every group of each kind, as lists of global ranks (pipeline_stage == 1)."""
    tp, dp, ep = config.model_parallel, config.data_parallel, config.expert_parallel
    moe_tp = tp * dp // ep
    world = tp * dp
    return {
        "tp": [[d * tp + t for t in range(tp)] for d in range(dp)],
        "dp": [[d * tp + t for d in range(dp)] for t in range(tp)],
        # within the stage, moe_tp varies fastest, then ep (tp-ep order)
        "moe_tp": [[e * moe_tp + m for m in range(moe_tp)] for e in range(ep)],
        "ep": [[e * moe_tp + m for e in range(ep)] for m in range(moe_tp)],
        "moe": [list(range(world))],
    }


def _mine(groups: Sequence[List[int]], rank: int) -> List[int]:
    return next(g for g in groups if rank in g)


def build_layout(config: ParallelConfig, rank: int, world_size: int,
                 create_group=None) -> Layout:
    """The layout of `rank`. `create_group(name, ranks)` is called for every group of more
    than one rank that this rank belongs to (MindSpore's create_group under msrun)."""
    validate(config, world_size)
    if world_size == 1:
        return SINGLE
    made = set()

    def group(kind: str) -> TPGroup:
        ranks = _mine(rank_groups(config)[kind], rank)
        if len(ranks) == 1:
            return NO_TP
        if len(ranks) == world_size:
            name = None  # the backend's world group: the one group every CPU collective supports
        else:
            name = f"{kind}-" + "-".join(map(str, ranks))
            if create_group is not None and name not in made:
                create_group(name, ranks)
                made.add(name)
        return TPGroup(len(ranks), ranks.index(rank), name)

    tp, dp = group("tp"), group("dp")
    experts = ExpertGroups(ep=group("ep"), moe_tp=group("moe_tp"), dp=dp, reduce=group("moe"))
    return Layout(rank, world_size, config, tp, dp, experts)


def init_parallel(config: ParallelConfig) -> Layout:
    """Initialise MindSpore communication (under msrun) and build this rank's layout."""
    validate(config)
    if config.world_size == 1:
        return SINGLE
    from mindspore import communication as comm

    if not comm.GlobalComm.INITED:
        try:
            comm.init()
        except RuntimeError as e:
            raise ConfigError(f"parallel_config {config} needs {config.world_size} ranks: launch under msrun "
                              f"(scripts/msrun_launcher.sh); communication init failed: {e}") from e
    rank, world = comm.get_rank(), comm.get_group_size()

    def create_group(name, ranks):
        try:  # another model in this process may have created it already
            comm.get_group_size(name)
        except (RuntimeError, ValueError):
            comm.create_group(name, ranks)

    layout = build_layout(config, rank, world, create_group)
    logger.info("parallel layout %s", layout.describe())
    return layout


def use_alltoall(groups: ExpertGroups) -> bool:
    """AlltoAll dispatch where the device has it and each expert lives whole on one rank
    (as in mindformers); CPU has no AlltoAll kernel, so it keeps tokens replicated."""
    from ..backend import device_target
    return groups.ep.size > 1 and groups.moe_tp.size == 1 and device_target() != "CPU"
