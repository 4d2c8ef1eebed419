"""Run the serving engine on several ranks in lockstep.

Only rank 0 owns requests: its scheduler decides each step, its sampler picks the tokens.
Every other rank holds just a model runner -- its share of the weights and of the latent
cache -- and must run the same compiled steps with the same inputs, because the steps
contain collectives. So rank 0's runner broadcasts each call (method name and arguments:
token ids, positions, block tables) before making it, and the followers replay them.

    engine = LLMEngine(model, tokenizer, config)   # same config on every rank
    if lockstep(engine):                            # rank 0: the engine, now broadcasting
        ... add_request / step as usual ...; release(engine)
    # other ranks return from lockstep() once rank 0 calls release(engine)

The channel is MindSpore's Broadcast (it runs on CPU as well as on devices): a length, then
the pickled call as int32 words. On CPU ranks a follower waiting in Broadcast spins a whole
core and gives up after about 30 s ("CollectiveWait failed"); the root's sends, though, are
buffered at the receivers. So an idle rank 0 sends a no-op every KEEPALIVE_SECONDS
(`BroadcastingRunner.keep_alive`, called by AsyncLLMEngine while idle), and a follower sleeps
until the next one is due instead of spinning: idle ranks cost almost no CPU, and the first
call after an idle spell reaches the followers at most KEEPALIVE_SECONDS late.
"""
from __future__ import annotations

import logging
import pickle
import time
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)

_STOP = "__stop__"
_NOOP = "__noop__"
KEEPALIVE_SECONDS = 0.25  # an idle rank 0's no-op period (and the followers' extra latency after idling)


class BroadcastChannel:
    """Rank `root` sends Python objects to every rank of `group` (None = world)."""

    def __init__(self, rank: int, root: int = 0, group: Optional[str] = None):
        from mindspore import ops

        from ..backend import comm_group
        self.rank, self.root = rank, root
        self._bcast = ops.Broadcast(root, comm_group(group))

    def _broadcast(self, array: np.ndarray) -> np.ndarray:
        import mindspore as ms
        return self._bcast((ms.Tensor(array),))[0].asnumpy()

    def send(self, obj: Any = None) -> Any:
        """On root: send `obj` and return it; elsewhere: return what root sent."""
        if self.rank == self.root:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            words = np.frombuffer(payload + b"\0" * (-len(payload) % 4), dtype=np.int32)
            self._broadcast(np.array([len(payload)], dtype=np.int32))
            self._broadcast(words)
            return obj
        n = int(self._broadcast(np.zeros(1, dtype=np.int32))[0])
        words = self._broadcast(np.zeros(-(-n // 4), dtype=np.int32))
        return pickle.loads(words.tobytes()[:n])

    recv = send


class BroadcastingRunner:
    """Rank 0's model runner: every method call is broadcast, then made locally."""

    def __init__(self, runner, channel: BroadcastChannel):
        self._runner, self._channel = runner, channel
        self._last_send = time.monotonic()

    def _send(self, name: str, args=(), kwargs=None) -> None:
        self._channel.send((name, args, kwargs or {}))
        self._last_send = time.monotonic()

    def keep_alive(self) -> None:
        """Call often while idle: every KEEPALIVE_SECONDS a no-op (with its send time) goes out."""
        if time.monotonic() - self._last_send >= KEEPALIVE_SECONDS:
            self._send(_NOOP, (time.time(),))

    def __getattr__(self, name):
        attr = getattr(self._runner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            self._send(name, args, kwargs)
            return attr(*args, **kwargs)
        return call


def follow(runner, channel: BroadcastChannel) -> int:
    """Replay rank 0's runner calls until it releases the followers; returns the call count."""
    calls = 0
    while True:
        name, args, kwargs = channel.recv()
        if name == _STOP:
            return calls
        if name == _NOOP:
            # rank 0 is idle: sleep until its next no-op is due (what it sends meanwhile waits in
            # the buffer); a no-op that is already old -- a backlog -- means no sleep
            time.sleep(min(KEEPALIVE_SECONDS, max(0.0, args[0] + KEEPALIVE_SECONDS - time.time())))
            continue
        getattr(runner, name)(*args, **kwargs)
        calls += 1


def lockstep(engine) -> bool:
    """Put `engine` (an LLMEngine built on a tensor/expert-parallel model) in lockstep.

    Rank 0: its runner starts broadcasting; returns True. Other ranks: replay until rank 0
    calls `release(engine)`, then return False. A single-rank model returns True at once."""
    layout = engine.model.layout
    if layout.is_single:
        return True
    if layout.dp.size > 1:
        raise ValueError("lockstep serving runs tensor/expert parallel layouts; data_parallel > 1 "
                         "needs one engine per data-parallel rank, which is not supported")
    channel = BroadcastChannel(layout.rank)
    if layout.rank == 0:
        engine.runner = BroadcastingRunner(engine.runner, channel)
        return True
    n = follow(engine.runner, channel)
    logger.info("rank %d: released after %d lockstep runner calls", layout.rank, n)
    return False


def release(engine) -> None:
    """Rank 0: let the followers' `lockstep()` return."""
    runner = engine.runner
    if isinstance(runner, BroadcastingRunner):
        runner._send(_STOP)
        engine.runner = runner._runner
