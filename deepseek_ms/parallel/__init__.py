"""Tensor, expert and data parallelism (see README, "Parallel inference").

* `layout`: ranks and communication groups from mindformers' `parallel_config`.
* `layers`: vocabulary-parallel embedding, the LM head's gather, MoE token exchange (CPU path).
* `ep_dispatch`: the AlltoAll expert dispatch plan and the device path using it.
* `runtime`: host-side data-parallel batch split and gather.
* `lockstep`: the serving engine across ranks (rank 0 schedules, the others replay).
* `sharding`: semi-auto-parallel `shard()` strategies and their checker (Ascend/GPU training).
"""
