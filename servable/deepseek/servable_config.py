"""The `deepseek` servable: thin MindSpore Serving workers in front of the engine server.

Methods (every input is required; Serving has no optional inputs):

    generate(prompt: str, max_tokens: int, temperature: float, top_p: float)
    chat(messages: str (JSON list of {"role", "content"}), max_tokens, temperature, top_p)
      -> text: str, finish_reason: str ("stop" | "length" | "abort"), prompt_tokens: int, completion_tokens: int

Stages, all Python with batch_size=None (Serving runs one stage call at a time per worker, so
batching belongs to the engine; concurrency comes from the number of workers):

    preprocess   chat template (chat) + tokenization, parameter checks -> prompt ids, params JSON
    engine       one request to the engine server, blocking until it finishes or times out
    postprocess  detokenization -> text, finish reason, usage

Every stage is total (`_stage`): it returns exactly its declared outputs, with every string
valid UTF-8, or raises RuntimeError, which Serving turns into that instance's ``error_msg``
(other instances and the worker are unaffected). Anything else kills the worker, and Serving
then re-sends the request to the next one: measured, a stage returning None, a dict or the
wrong arity; a returned string or error message holding a lone surrogate ("Unable to cast
Python instance of type str"); and a string input that is not valid UTF-8 (gRPC MS_STRING or
REST {"b64": ..., "type": "str"}), which fails inside Serving's worker loop before any stage
runs. The last one is why `_read_inputs_or_fail` wraps Serving's PyTaskHandler.run_inner.

The settings (engine address, model folder, timeout) come from ``deepseek_serving.json`` in
the working directory, written by ``python -m deepseek_ms.serving.ms_serving``; see there.
"""
import functools
import json
import logging
import os

import numpy as np
from mindspore_serving._mindspore_serving import Worker_
from mindspore_serving.server import register
from mindspore_serving.server.worker.task import PyTaskHandler

from deepseek_ms.engine.sampling import SamplingParams
from deepseek_ms.serving.engine_client import (EngineClient, EngineOverloadedError, EngineRequestError,
                                               EngineTimeoutError, EngineUnavailableError)
from deepseek_ms.serving.ms_serving import DRAINING_FILE, INFLIGHT_DIR, ServingSettings
from deepseek_ms.tokenizer import load_tokenizer

logger = logging.getLogger("deepseek_ms.servable")

RUN_DIR = os.getcwd()
SETTINGS = ServingSettings.read(RUN_DIR)
TOKENIZER = load_tokenizer(SETTINGS.model_dir)
ENGINE = EngineClient(SETTINGS.engine_address)
_MAX_ERROR_CHARS = 2000


class _InFlight:
    """This worker's count of requests between a successful preprocess and the end of
    postprocess, published in ``inflight/<pid>`` for the launcher's drain."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, INFLIGHT_DIR, str(os.getpid()))
        self.count = 0
        self._publish()

    def add(self, delta: int) -> None:
        self.count = max(0, self.count + delta)
        self._publish()

    def _publish(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(self.count))
        os.replace(tmp, self.path)


INFLIGHT = _InFlight(RUN_DIR)


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _fail(message: str):
    """Fail this instance only, with a message naming the problem."""
    raise ValueError(message)


def _stage(fn):
    """Make a stage total: its exceptions become one clean RuntimeError (the instance's error_msg)
    and its string outputs are valid UTF-8."""
    @functools.wraps(fn)
    def stage(*inputs):
        try:
            outputs = fn(*inputs)
        except Exception as e:
            raise RuntimeError(_utf8(str(e) or type(e).__name__)[:_MAX_ERROR_CHARS]) from None
        return tuple(_utf8(o) if isinstance(o, str) else o for o in outputs)
    return stage


def _read_inputs_or_fail(task):
    """Serving converts a task's inputs to Python objects inside its worker loop, where an
    exception (a string that is not UTF-8) ends the worker. Convert once here first and fail
    just the task instead; with batch_size=None a task holds one instance."""
    try:
        task.instance_list  # the conversion is the check
    except Exception as e:
        Worker_.push_pytask_failed(1, _utf8(f"cannot read the inputs ({e}); strings must be valid UTF-8"))
        return
    _serving_run_inner(task)


_serving_run_inner = PyTaskHandler.run_inner
PyTaskHandler.run_inner = staticmethod(_read_inputs_or_fail)


def _scalar(name: str, value, kind):
    """A Python int/float from what Serving hands a stage for a scalar input: a Python scalar, or a
    0-d / one-element numpy array (REST sends 7 as int32 and 0.5 as float32)."""
    if isinstance(value, (str, bytes)):
        _fail(f"{name} must be a number, got the string {value!r}")
    array = np.asarray(value)
    if array.size != 1:
        _fail(f"{name} must be a single number, got an array of shape {list(array.shape)}")
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == np.bool_ or not numeric:
        _fail(f"{name} must be a number, got {array.dtype} data")
    item = array.reshape(()).item()
    if kind is int:
        if not np.issubdtype(array.dtype, np.integer):
            _fail(f"{name} must be an integer, got {item!r}")
        return int(item)
    return float(item)


def _params_json(max_tokens, temperature, top_p) -> str:
    params = {"max_tokens": _scalar("max_tokens", max_tokens, int),
              "temperature": _scalar("temperature", temperature, float),
              "top_p": _scalar("top_p", top_p, float)}
    try:
        SamplingParams(**params)
    except ValueError as e:
        _fail(str(e))
    return json.dumps(params)


def _admit(prompt_ids, params: str):
    if os.path.exists(os.path.join(RUN_DIR, DRAINING_FILE)):
        _fail("MindSpore Serving is shutting down; request refused")
    if not prompt_ids:
        _fail("the prompt is empty after tokenization")
    INFLIGHT.add(1)
    return np.asarray(prompt_ids, np.int64), params


def _text_input(name: str, value) -> str:
    if not isinstance(value, str):
        if isinstance(value, np.ndarray):  # REST/gRPC bytes arrive as uint8, numbers as 0-d arrays
            kind = "bytes" if value.dtype == np.uint8 else f"{value.dtype} data"
        else:
            kind = type(value).__name__
        _fail(f"{name} must be a string, got {kind}")
    return value


def _messages(text: str):
    try:
        messages = json.loads(text)
    except ValueError as e:
        _fail(f"messages is not valid JSON: {e}")
    if not isinstance(messages, list) or not messages:
        _fail("messages must be a non-empty JSON list of {\"role\": ..., \"content\": ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            _fail(f"messages[{i}] must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            _fail(f"messages[{i}].role must be a non-empty string")
        if not isinstance(message.get("content"), str):
            _fail(f"messages[{i}].content must be a string")
    return messages


# ---- stages ----

@_stage
def preprocess_generate(prompt, max_tokens, temperature, top_p):
    params = _params_json(max_tokens, temperature, top_p)
    return _admit(TOKENIZER.encode(_text_input("prompt", prompt)), params)


@_stage
def preprocess_chat(messages, max_tokens, temperature, top_p):
    params = _params_json(max_tokens, temperature, top_p)
    messages = _messages(_text_input("messages", messages))
    if not TOKENIZER.chat_template:
        _fail(f"the model at {SETTINGS.model_dir} has no chat template; use the generate method")
    try:
        prompt_ids = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # the template rejected the conversation (raise_exception, missing keys, ...)
        _fail(f"cannot apply the chat template to these messages: {e}")
    return _admit(list(prompt_ids), params)


_ENGINE_ERRORS = ((EngineRequestError, "invalid request"), (EngineOverloadedError, "engine overloaded, retry later"),
                  (EngineTimeoutError, "timed out"), (EngineUnavailableError, "engine unavailable"))


@_stage
def call_engine(prompt_ids, params):
    """Forward one request and wait; a request that fails here leaves this worker's in-flight count."""
    try:
        result = ENGINE.generate([int(t) for t in prompt_ids], json.loads(params), timeout=SETTINGS.request_timeout)
        return np.asarray(result["token_ids"], np.int64), str(result["finish_reason"]), int(result["prompt_tokens"])
    except Exception as e:
        INFLIGHT.add(-1)
        kind = next((kind for cls, kind in _ENGINE_ERRORS if isinstance(e, cls)), None)
        if kind is None:
            logger.exception("engine request failed")
            kind = f"engine request failed ({type(e).__name__})"
        _fail(f"{kind}: {e}")


@_stage
def postprocess(token_ids, finish_reason, prompt_tokens):
    try:
        ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        text = TOKENIZER.decode(ids, skip_special_tokens=True)
        return text, str(finish_reason), int(prompt_tokens), len(ids)
    finally:
        INFLIGHT.add(-1)


OUTPUTS = ["text", "finish_reason", "prompt_tokens", "completion_tokens"]


@register.register_method(output_names=OUTPUTS)
def generate(prompt, max_tokens, temperature, top_p):
    prompt_ids, params = register.add_stage(preprocess_generate, prompt, max_tokens, temperature, top_p,
                                            outputs_count=2)
    token_ids, finish_reason, prompt_tokens = register.add_stage(call_engine, prompt_ids, params, outputs_count=3)
    text, finish_reason, prompt_tokens, completion_tokens = register.add_stage(
        postprocess, token_ids, finish_reason, prompt_tokens, outputs_count=4)
    return text, finish_reason, prompt_tokens, completion_tokens


@register.register_method(output_names=OUTPUTS)
def chat(messages, max_tokens, temperature, top_p):
    prompt_ids, params = register.add_stage(preprocess_chat, messages, max_tokens, temperature, top_p,
                                            outputs_count=2)
    token_ids, finish_reason, prompt_tokens = register.add_stage(call_engine, prompt_ids, params, outputs_count=3)
    text, finish_reason, prompt_tokens, completion_tokens = register.add_stage(
        postprocess, token_ids, finish_reason, prompt_tokens, outputs_count=4)
    return text, finish_reason, prompt_tokens, completion_tokens
