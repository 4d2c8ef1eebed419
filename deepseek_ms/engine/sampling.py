"""Per-request sampling for the continuous-batching engine (pure numpy).

The model hands back one row of fp32 logits per running request; `Sampler.sample` turns
them into one token per row, each row under its own `SamplingParams` and with its own
random generator held in a `SequenceSamplingState`::

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1234, logprobs=5)
    state = SequenceSamplingState(params, prompt_token_ids, eos_token_id=tok.eos_id)
    out = Sampler().sample(logits, [state, ...])        # logits: [B, V]
    state.append(int(out.token_ids[0]))                  # the caller commits the token

Pipeline, per row, in this order:

1. Input checks. NaN anywhere in a row raises ``ValueError`` (a NaN logit is a model bug;
   sampling around it would hide it). A row holding ``+inf`` entries is treated as certain
   to produce one of them: it becomes uniform over its ``+inf`` entries (0) with every
   other entry at ``-inf``.
2. min_tokens: while ``len(output) < min_tokens`` the row's ``stop_token_ids`` are set to
   ``-inf``, and so is the EOS id unless ``ignore_eos`` (with ``ignore_eos`` EOS never
   ends a request, so it is an ordinary token and is not masked).
3. Penalties, in vLLM's order:
   repetition (HF/vLLM style, over tokens seen in the prompt OR the output: a positive
   logit is divided by the penalty, a negative one multiplied, 0 stays 0), then
   OpenAI frequency/presence over output tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
   Results are clipped to the dtype's largest finite value so a penalty < 1 on a huge
   logit cannot overflow to ``+inf``.
4. Logprobs (when ``params.logprobs`` is not None) come from ``log_softmax`` of the logits
   as they stand here: after min_tokens masking and penalties, before temperature /
   top-k / top-p / min-p ("processed" mode, the default). ``Sampler(logprobs_mode="raw")``
   uses the model's logits before step 2 instead, which is vLLM v1's default
   (``raw_logprobs``). A masked token therefore reports ``-inf`` in processed mode.
5. Greedy rows (``temperature < 1e-5``, vLLM's epsilon, so that tiny temperatures do not
   overflow) take the argmax; ties go to the lowest token id. top-k/top-p/min-p are
   irrelevant to them (none of them can remove the argmax) and they draw no random number.
6. Sampled rows: temperature scaling -> top-k -> top-p -> min-p -> one draw.

   * top-k keeps every token whose logit is >= the k-th largest, so ties at the boundary
     are all kept (HF and vLLM do the same). ``top_k`` of 0 or -1, or >= V, is off.
     ``-inf`` tokens are never candidates.
   * top-p works on the distribution renormalised over the top-k survivors: tokens are
     ordered by probability (ties: lower id first) and kept while the mass strictly
     before them is < top_p, i.e. the smallest prefix reaching top_p, boundary token
     included, at least one token.
   * min-p keeps tokens with ``p >= min_p * p_max``; the ratio does not depend on the
     earlier renormalisations, so this equals the test on the temperature-scaled softmax.
   * The draw: one ``generator.random()`` value u per sampled row per step, mapped through
     the CDF of the surviving tokens in ascending-id order (inverse-CDF sampling).

Reproducibility: every row is computed with 1-D operations on that row only (no batched
reductions whose rounding could depend on the batch shape), and each row consumes exactly
one number from its own generator per sampled step, so a seeded request produces the same
tokens whatever else shares the batch, at any row position. Unseeded requests get a
generator from fresh OS entropy.

`Sampler.sample` does not change any state except advancing generators: the caller decides
which tokens it keeps (a stop string may end the request) and commits each one with
``state.append(token_id)``; min_tokens and the penalties read those committed tokens.

Parameter choices beyond the usual vLLM ones (all checked by `SamplingParams.validate`,
which raises ``ValueError`` naming the field):

* ints reject bools; floats reject bools, NaN and inf; numpy scalars are accepted and
  stored as Python ``int``/``float``;
* ``max_tokens >= 1`` (no ``None`` meaning "until the context is full": the engine caps
  by context length itself), ``0 <= min_tokens <= max_tokens``;
* ``seed`` is None or a non-negative int (numpy generators reject negative seeds);
* ``logprobs`` is None (off) or 0..20; 0 returns only the chosen token's logprob.
  The top list always has ``min(logprobs, V)`` entries, so it may hold ``-inf`` values
  when most of the vocabulary is masked; the API layer decides how to serialise those;
* ``stop`` accepts a single string (stored as a one-element list), a list/tuple of
  non-empty strings, or None (stored as []); ``stop_token_ids`` a list/tuple of
  non-negative ints or None;
* ``n`` must be 1: parallel sampling is not implemented.

Ids outside the vocabulary (stop ids, EOS, prompt or output tokens) are reported with
``ValueError`` when a batch is sampled, because V is only known then.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE_EPS = 1e-5
PENALTY_LIMIT = 2.0
LOGPROBS_MODES = ("processed", "raw")

# How many of the most likely tokens top-p looks at first; the window grows 4x until it
# holds the nucleus, so a peaked distribution never pays for a full-vocabulary sort.
_TOP_P_FIRST_WINDOW = 64
# Below this many entries a k-th-largest search partitions the row directly; above it a
# strided subsample first narrows the row down.
_SUBSAMPLE_MIN = 4096
# Block length of the two-level inverse-CDF search over large candidate sets.
_CDF_BLOCK = 1024
_FINITE_MAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float32, np.float64)}


# ----------------------------------------------------------------------------- params

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value, minimum: Optional[int] = None,
               maximum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise ValueError(f"{name} must be an int{' or None' if allow_none else ''}, "
                         f"got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_float(name: str, value, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def _check_stop(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"stop must be a str or a list of str, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"stop[{i}] must be a str, got {item!r} ({type(item).__name__})")
        if not item:
            raise ValueError(f"stop[{i}] must be a non-empty string")
    return list(value)


def _check_token_ids(name: str, value) -> List[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise ValueError(f"{name} must be a list of int, got {type(value).__name__}")
    return [_check_int(f"{name}[{i}]", item, minimum=0) for i, item in enumerate(value)]


@dataclass
class SamplingParams:
    """How one request picks its tokens. See the module docstring for the semantics."""
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first bad field; canonicalise types in place
        (numpy scalars -> Python, a lone stop string -> [string], tuples -> lists)."""
        self.n = _check_int("n", self.n)
        if self.n != 1:
            raise ValueError(f"n must be 1 (parallel sampling is not supported), got {self.n}")
        self.max_tokens = _check_int("max_tokens", self.max_tokens, minimum=1)
        self.min_tokens = _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")
        self.temperature = _check_float("temperature", self.temperature, 0.0, math.inf,
                                        high_open=True)
        self.top_k = _check_int("top_k", self.top_k, minimum=-1)
        self.top_p = _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.min_p = _check_float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty,
                                               0.0, math.inf, low_open=True, high_open=True)
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty,
                                             -PENALTY_LIMIT, PENALTY_LIMIT)
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty,
                                              -PENALTY_LIMIT, PENALTY_LIMIT)
        self.seed = _check_int("seed", self.seed, minimum=0, allow_none=True)
        self.logprobs = _check_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS,
                                   allow_none=True)
        self.stop = _check_stop(self.stop)
        self.stop_token_ids = _check_token_ids("stop_token_ids", self.stop_token_ids)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_output_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# ----------------------------------------------------------------------------- state

def _as_token_array(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D sequence of int token ids")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"{name} must not contain negative token ids")
    return arr


class SequenceSamplingState:
    """One request's sampling state: its params, its generator and the tokens it has
    committed so far (via `append`). Not shared between requests."""

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int],
                 eos_token_id: Union[int, Iterable[int], None] = None):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        # Fields may have been reassigned since construction.
        params.validate()
        self.params = params
        self.generator = np.random.default_rng(params.seed)

        prompt = _as_token_array("prompt_token_ids", prompt_token_ids)
        self.num_prompt_tokens = int(prompt.size)
        self._prompt_unique = np.unique(prompt)

        if eos_token_id is None:
            eos_ids: List[int] = []
        elif _is_int(eos_token_id):
            eos_ids = [_check_int("eos_token_id", eos_token_id, minimum=0)]
        else:
            eos_ids = _check_token_ids("eos_token_id", list(eos_token_id))
        self.eos_token_id = eos_token_id
        self.eos_token_ids: Tuple[int, ...] = tuple(eos_ids)

        blocked = list(params.stop_token_ids)
        if not params.ignore_eos:
            blocked += eos_ids
        self._min_tokens_blocked = np.unique(np.asarray(blocked, dtype=np.int64))

        self._output: List[int] = []
        self._counts: Dict[int, int] = {}
        # Output tokens absent from the prompt, in first-seen order: with the prompt's unique
        # ids they make the repetition-penalty set without re-deduplicating the prompt.
        self._output_only: List[int] = []
        self._seen_cache: Optional[np.ndarray] = None
        self._counts_cache: Optional[Tuple[np.ndarray, np.ndarray]] = None

    # -- committed output

    def append(self, token_id: int) -> None:
        token_id = _check_int("token_id", token_id, minimum=0)
        self._output.append(token_id)
        previous = self._counts.get(token_id, 0)
        self._counts[token_id] = previous + 1
        self._counts_cache = None
        if previous == 0 and not self._in_prompt(token_id):
            self._output_only.append(token_id)
            self._seen_cache = None

    @property
    def output_token_ids(self) -> Tuple[int, ...]:
        return tuple(self._output)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output)

    @property
    def output_token_counts(self) -> Dict[int, int]:
        return dict(self._counts)

    @property
    def min_tokens_pending(self) -> bool:
        return len(self._output) < self.params.min_tokens

    # -- views for the sampler

    def _in_prompt(self, token_id: int) -> bool:
        pos = int(np.searchsorted(self._prompt_unique, token_id))
        return pos < self._prompt_unique.size and int(self._prompt_unique[pos]) == token_id

    def _seen_token_ids(self) -> np.ndarray:
        """Unique ids present in the prompt or the output (not sorted)."""
        if self._seen_cache is None:
            extra = np.asarray(self._output_only, dtype=np.int64)
            self._seen_cache = np.concatenate([self._prompt_unique, extra])
        return self._seen_cache

    def _output_counts(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._counts_cache is None:
            ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float64,
                                 count=len(self._counts))
            self._counts_cache = (ids, counts)
        return self._counts_cache


# ----------------------------------------------------------------------------- sampler

@dataclass
class SamplerOutput:
    """`token_ids[i]` is row i's token. `logprobs[i]` / `top_logprobs[i]` are None unless
    row i asked for logprobs; then they hold the chosen token's logprob and the top-n
    (token_id, logprob) pairs, most likely first (ties: lower id first)."""
    token_ids: np.ndarray
    logprobs: List[Optional[float]]
    top_logprobs: List[Optional[List[Tuple[int, float]]]]


def _kth_largest(values: np.ndarray, k: int):
    """The k-th largest entry of a 1-D array (1 <= k), exact, ties counted."""
    size = values.size
    if k >= size:
        return values.min()
    stride = size // max(_SUBSAMPLE_MIN, 8 * k)
    if stride >= 2:
        # The k-th largest of a subset is a lower bound for the whole array's, so filtering
        # by it keeps at least k entries including the answer; a full-vocabulary introselect
        # costs several times more than this strided pre-pass on a 130k row.
        sub = values[::stride]
        guess = np.partition(sub, sub.size - k)[sub.size - k]
        values = values[values >= guess]
        size = values.size
    return np.partition(values, size - k)[size - k]


def _top_p_keep(logits: np.ndarray, weights: np.ndarray, total: float,
                top_p: float) -> np.ndarray:
    """Ascending positions of the nucleus (see the module docstring). `weights` are
    exp-scaled logits, `total` their sum."""
    size = logits.size
    window = _TOP_P_FIRST_WINDOW
    while True:
        if window >= size:
            pos = np.arange(size)
        else:
            # Every tie of the threshold is taken, so the window's sorted order is exactly the
            # start of the whole row's sorted order.
            pos = np.flatnonzero(logits >= _kth_largest(logits, window))
        # Order by logit, not by weight: distinct logits can round to equal weights.
        order = pos[np.lexsort((pos, -logits[pos]))]
        cumulative = np.cumsum(weights[order], dtype=np.float64) / total
        if cumulative[-1] < top_p and pos.size < size:
            window *= 4
            continue
        mass_before = np.concatenate(([0.0], cumulative[:-1]))
        keep = max(1, int(np.count_nonzero(mass_before < top_p)))
        return np.sort(order[:keep])


def _candidates(row: np.ndarray, params: SamplingParams
                ) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """(ids, weights) for a non-greedy row whose logits carry masking and penalties.

    `ids` are ascending token ids, or None for "the whole vocabulary in order" (saves a
    gather on the common unfiltered path); `weights` are proportional to the sampling
    probabilities. Excluded tokens are either left out or carry weight 0.
    """
    ids = None
    logits = row
    vocab = row.size
    if 0 < params.top_k < vocab:
        kth = _kth_largest(row, params.top_k)
        if kth > -np.inf:
            ids = np.flatnonzero(row >= kth)
            logits = row[ids]
    peak = logits.max()
    # A temperature beyond the dtype's range would turn -inf / inf into NaN.
    temperature = row.dtype.type(min(params.temperature, _FINITE_MAX[row.dtype]))
    with np.errstate(over="ignore", under="ignore"):
        # Subtracting the peak first keeps huge logits finite at small temperatures; -inf
        # entries become weight 0 and can never be drawn.
        weights = np.exp((logits - peak) / temperature)
    if params.top_p < 1.0 and weights.size > 1:
        total = float(weights.sum(dtype=np.float64))
        keep = _top_p_keep(logits, weights, total, params.top_p)
        ids = keep if ids is None else ids[keep]
        weights = weights[keep]
    if params.min_p > 0.0:
        # The peak's weight is exactly 1 and survives top-k/top-p, so p >= min_p * p_max
        # is weight >= min_p whatever renormalisation happened before. (`weights` is always a
        # fresh array here, never a view of the caller's logits.)
        weights[weights < params.min_p] = 0.0
    return ids, weights


def _sampling_distribution(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Dense float64 probabilities over the vocabulary that `Sampler` draws this row from
    (non-greedy params). Used by tests and diagnostics, not on the hot path."""
    ids, weights = _candidates(row, params)
    probs = np.zeros(row.size, dtype=np.float64)
    if ids is None:
        probs[:] = weights
    else:
        probs[ids] = weights
    return probs / probs.sum()


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """Position whose cumulative weight interval contains u * total (never a zero weight)."""
    size = weights.size
    if size <= 4 * _CDF_BLOCK:
        cdf = np.cumsum(weights, dtype=np.float64)
        pos = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        if pos >= size:
            pos = int(np.flatnonzero(weights)[-1])
        return pos
    # Two-level search: block sums, then one block's running sum. A sequential cumsum over
    # the whole vocabulary is the slowest step of an unfiltered 130k-token draw.
    starts = np.arange(0, size, _CDF_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * block_cdf[-1]
    block = min(int(np.searchsorted(block_cdf, target, side="right")), starts.size - 1)
    base = float(block_cdf[block - 1]) if block else 0.0
    while block and block_cdf[block] == base:
        # Only reachable when rounding pushed the target past the end: step back to mass.
        block -= 1
        base = float(block_cdf[block - 1]) if block else 0.0
    lo = int(starts[block])
    chunk = weights[lo:lo + _CDF_BLOCK]
    inner = base + np.cumsum(chunk, dtype=np.float64)
    pos = int(np.searchsorted(inner, target, side="right"))
    if pos >= chunk.size:
        pos = int(np.flatnonzero(chunk)[-1])
    return lo + pos


def _draw(row: np.ndarray, params: SamplingParams, generator: np.random.Generator) -> int:
    ids, weights = _candidates(row, params)
    pos = _inverse_cdf(weights, generator.random())
    return pos if ids is None else int(ids[pos])


def _row_logprobs(row: np.ndarray, token_id: int, top_n: int
                  ) -> Tuple[float, List[Tuple[int, float]]]:
    peak = row.max()
    with np.errstate(over="ignore", under="ignore"):
        log_norm = float(peak) + math.log(float(np.exp(row - peak).sum(dtype=np.float64)))
    chosen = float(row[token_id]) - log_norm
    top_n = min(top_n, row.size)
    if top_n == 0:
        return chosen, []
    ids = np.flatnonzero(row >= _kth_largest(row, top_n))
    ids = ids[np.lexsort((ids, -row[ids]))][:top_n]
    return chosen, [(int(t), float(row[t]) - log_norm) for t in ids]


class Sampler:
    """Stateless apart from the logprobs mode; see the module docstring for the pipeline."""

    def __init__(self, logprobs_mode: str = "processed"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, "
                             f"got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode

    def sample(self, logits: np.ndarray,
               states: Sequence[SequenceSamplingState]) -> SamplerOutput:
        states = list(states)
        x = self._checked_copy(logits, states)
        batch, vocab = x.shape

        logprob_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        raw = None
        if self.logprobs_mode == "raw" and logprob_rows:
            raw = {i: x[i].copy() for i in logprob_rows}

        self._mask_min_tokens(x, states)
        self._apply_penalties(x, states)

        row_max = x.max(axis=1)
        dead = np.flatnonzero(row_max == -np.inf)
        if dead.size:
            raise ValueError(f"every token is masked (-inf) in batch rows {dead.tolist()}")

        token_ids = np.empty(batch, dtype=np.int64)
        greedy = [i for i, s in enumerate(states) if s.params.is_greedy]
        if greedy:
            # argmax returns the first maximum, i.e. the lowest id among ties.
            if len(greedy) == batch:
                token_ids[:] = x.argmax(axis=1)
            else:
                token_ids[greedy] = x[greedy].argmax(axis=1)
        for i, state in enumerate(states):
            if not state.params.is_greedy:
                token_ids[i] = _draw(x[i], state.params, state.generator)

        logprobs: List[Optional[float]] = [None] * batch
        top_logprobs: List[Optional[List[Tuple[int, float]]]] = [None] * batch
        for i in logprob_rows:
            source = raw[i] if raw is not None else x[i]
            logprobs[i], top_logprobs[i] = _row_logprobs(source, int(token_ids[i]),
                                                         states[i].params.logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top_logprobs)

    # -- steps

    @staticmethod
    def _checked_copy(logits, states: List[SequenceSamplingState]) -> np.ndarray:
        for i, state in enumerate(states):
            if not isinstance(state, SequenceSamplingState):
                raise TypeError(f"states[{i}] must be a SequenceSamplingState, "
                                f"got {type(state).__name__}")
        if len({id(s) for s in states}) != len(states):
            # Two rows would draw from one generator and break its reproducibility.
            raise ValueError("the same SequenceSamplingState appears twice in one batch")
        arr = np.asarray(logits)
        if arr.ndim != 2:
            raise ValueError(f"logits must be 2-D [batch, vocab], got shape {arr.shape}")
        if arr.shape[0] != len(states):
            raise ValueError(f"logits have {arr.shape[0]} rows but {len(states)} states "
                             f"were given")
        if arr.shape[1] == 0:
            raise ValueError("logits have an empty vocabulary dimension")
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"logits must be a real numeric array, got dtype {arr.dtype}")
        dtype = np.float64 if arr.dtype == np.float64 else np.float32
        x = np.array(arr, dtype=dtype, copy=True)

        row_max = x.max(axis=1)
        bad = np.flatnonzero(np.isnan(row_max))
        if bad.size:
            raise ValueError(f"logits contain NaN in batch rows {bad.tolist()}")
        for i in np.flatnonzero(row_max == np.inf):
            x[i] = np.where(np.isposinf(x[i]), 0.0, -np.inf)
        return x

    @staticmethod
    def _check_ids(ids: np.ndarray, vocab: int, what: str) -> None:
        if ids.size and int(ids.max()) >= vocab:
            raise ValueError(f"{what} contain token id {int(ids.max())} outside the "
                             f"vocabulary of size {vocab}")

    def _mask_min_tokens(self, x: np.ndarray, states: List[SequenceSamplingState]) -> None:
        rows, cols = [], []
        for i, state in enumerate(states):
            blocked = state._min_tokens_blocked
            if blocked.size and state.min_tokens_pending:
                rows.append(np.full(blocked.size, i, dtype=np.int64))
                cols.append(blocked)
        if not rows:
            return
        cols_all = np.concatenate(cols)
        self._check_ids(cols_all, x.shape[1], "stop_token_ids / eos_token_id")
        x[np.concatenate(rows), cols_all] = -np.inf

    def _apply_penalties(self, x: np.ndarray, states: List[SequenceSamplingState]) -> None:
        vocab = x.shape[1]
        top = _FINITE_MAX[x.dtype]
        rep_rows, rep_cols, rep_vals = [], [], []
        out_rows, out_cols, out_vals = [], [], []
        for i, state in enumerate(states):
            params = state.params
            if params.uses_repetition_penalty:
                seen = state._seen_token_ids()
                if seen.size:
                    rep_rows.append(np.full(seen.size, i, dtype=np.int64))
                    rep_cols.append(seen)
                    rep_vals.append(np.full(seen.size, params.repetition_penalty))
            if params.uses_output_penalties and state.num_output_tokens:
                ids, counts = state._output_counts()
                out_rows.append(np.full(ids.size, i, dtype=np.int64))
                out_cols.append(ids)
                out_vals.append(params.frequency_penalty * counts + params.presence_penalty)

        # (row, id) pairs are unique within each kind, so plain fancy assignment is exact.
        with np.errstate(over="ignore", under="ignore"):
            if rep_rows:
                rows, cols = np.concatenate(rep_rows), np.concatenate(rep_cols)
                self._check_ids(cols, vocab, "prompt or output token ids")
                penalty = np.concatenate(rep_vals).astype(x.dtype)
                current = x[rows, cols]
                updated = np.where(current > 0, current / penalty, current * penalty)
                x[rows, cols] = np.minimum(updated, top)
            if out_rows:
                rows, cols = np.concatenate(out_rows), np.concatenate(out_cols)
                self._check_ids(cols, vocab, "output token ids")
                adjust = np.concatenate(out_vals).astype(x.dtype)
                x[rows, cols] = np.minimum(x[rows, cols] - adjust, top)
