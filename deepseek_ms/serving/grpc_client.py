"""gRPC client of the MindSpore Serving front end (servable `deepseek`).

    from deepseek_ms.serving.grpc_client import ServingClient
    with ServingClient("127.0.0.1:5500") as client:
        out = client.generate("Hello", max_tokens=32)
        # {"text": ..., "finish_reason": "length", "prompt_tokens": 2, "completion_tokens": 32}
        out = client.chat([{"role": "user", "content": "Hi"}], temperature=0.7)
        outs = client.predict("generate", [instance, ...])   # a failed instance is a ServingError

The client mindspore-serving bundles does not import with protobuf >= 4.21 and calls
``np.bool`` (gone in numpy 1.24), so this one talks to the same RPC through stubs
regenerated from Serving's own descriptor (ms_service_pb2*.py, see
scripts/gen_serving_grpc.py).

Values are sent as Serving tensors: ``str`` as a string, ``bytes`` as bytes, ``bool`` /
``int`` / ``float`` as 0-d bool / int64 / float64 tensors, numpy arrays as they are.
Replies come back as ``str``, ``bytes``, Python scalars for 0-d tensors, else numpy arrays.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Union

import grpc
import numpy as np

from . import ms_service_pb2 as pb
from . import ms_service_pb2_grpc as pb_grpc

SERVABLE_NAME = "deepseek"
# Serving's own server limit is max_msg_mb_size (default 100 MB); let the server decide.
_MAX_MESSAGE_BYTES = 512 * 2 ** 20

_DTYPES = {
    np.dtype(np.bool_): pb.MS_BOOL,
    np.dtype(np.int8): pb.MS_INT8, np.dtype(np.uint8): pb.MS_UINT8,
    np.dtype(np.int16): pb.MS_INT16, np.dtype(np.uint16): pb.MS_UINT16,
    np.dtype(np.int32): pb.MS_INT32, np.dtype(np.uint32): pb.MS_UINT32,
    np.dtype(np.int64): pb.MS_INT64, np.dtype(np.uint64): pb.MS_UINT64,
    np.dtype(np.float16): pb.MS_FLOAT16, np.dtype(np.float32): pb.MS_FLOAT32, np.dtype(np.float64): pb.MS_FLOAT64,
}
_NP_DTYPES = {v: k for k, v in _DTYPES.items()}


class ServingError(RuntimeError):
    """Serving answered with an error (for one instance or the whole request), or could not be reached."""


def _fill_tensor(tensor, name: str, value) -> None:
    if isinstance(value, str):
        tensor.dtype = pb.MS_STRING
        tensor.shape.dims.append(1)
        tensor.bytes_val.append(value.encode("utf-8"))
        return
    if isinstance(value, bytes):
        tensor.dtype = pb.MS_BYTES
        tensor.shape.dims.append(1)
        tensor.bytes_val.append(value)
        return
    if isinstance(value, bool):
        array = np.array(value, np.bool_)
    elif isinstance(value, int):
        array = np.array(value, np.int64)
    elif isinstance(value, float):
        array = np.array(value, np.float64)
    elif isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
    else:
        raise TypeError(f"input {name!r}: cannot send a {type(value).__name__}; "
                        f"use str, bytes, bool, int, float or a numpy array")
    if array.dtype not in _DTYPES:
        raise TypeError(f"input {name!r}: numpy dtype {array.dtype} has no Serving tensor type")
    tensor.dtype = _DTYPES[array.dtype]
    tensor.shape.dims.extend(array.shape)
    tensor.data = np.ascontiguousarray(array).tobytes()


def _read_tensor(tensor) -> Any:
    if tensor.dtype in (pb.MS_STRING, pb.MS_BYTES):
        values = [v.decode("utf-8") if tensor.dtype == pb.MS_STRING else v for v in tensor.bytes_val]
        return values[0] if len(values) == 1 else values
    if tensor.dtype not in _NP_DTYPES:
        raise ServingError(f"reply holds a tensor of unknown type {tensor.dtype}")
    array = np.frombuffer(tensor.data, _NP_DTYPES[tensor.dtype]).reshape(tuple(tensor.shape.dims))
    return array.item() if array.ndim == 0 else array


class ServingClient:
    """Blocking client for one Serving gRPC address ("HOST:PORT"); thread-safe like a gRPC channel."""

    def __init__(self, address: str = "127.0.0.1:5500", servable: str = SERVABLE_NAME,
                 timeout: Optional[float] = None):
        self.address = address
        self.servable = servable
        self.timeout = timeout
        options = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._predict = pb_grpc.MSServiceStub(self._channel).Predict

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def predict(self, method: str, instances: Sequence[Dict[str, Any]],
                timeout: Optional[float] = None) -> List[Union[Dict[str, Any], ServingError]]:
        """One Predict call: a result dict per instance, in order, or a ServingError for an instance
        that failed. Raises ServingError when the whole request fails."""
        request = pb.PredictRequest()
        request.servable_spec.name = self.servable
        request.servable_spec.method_name = method
        for instance in instances:
            item = request.instances.add()
            for name, value in instance.items():
                _fill_tensor(item.items[name], name, value)
        try:
            reply = self._predict(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise ServingError(f"MindSpore Serving at {self.address}: {e.code().name}: {e.details()}") from None
        errors = list(reply.error_msg)
        if len(errors) == 1 and errors[0].error_code != 0 and len(reply.instances) <= 1:
            raise ServingError(errors[0].error_msg.decode("utf-8", "replace"))
        if errors and len(errors) != len(reply.instances):
            raise ServingError(f"malformed reply: {len(errors)} errors for {len(reply.instances)} instances")
        results: List[Union[Dict[str, Any], ServingError]] = []
        for i, instance in enumerate(reply.instances):
            if errors and errors[i].error_code != 0:
                results.append(ServingError(errors[i].error_msg.decode("utf-8", "replace")))
            else:
                results.append({name: _read_tensor(t) for name, t in instance.items.items()})
        if len(results) != len(instances):
            raise ServingError(f"sent {len(instances)} instances, got {len(results)} results")
        return results

    def _one(self, method: str, instance: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
        result = self.predict(method, [instance], timeout)[0]
        if isinstance(result, ServingError):
            raise result
        return result

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 timeout: Optional[float] = None) -> Dict[str, Any]:
        """Complete a text prompt (tokenized as is, no chat template)."""
        return self._one("generate", {"prompt": prompt, "max_tokens": max_tokens, "temperature": float(temperature),
                                      "top_p": float(top_p)}, timeout)

    def chat(self, messages: Union[str, List[Dict[str, Any]]], max_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Reply to OpenAI-style messages (a list, or its JSON text) through the model's chat template."""
        if not isinstance(messages, str):
            messages = json.dumps(messages, ensure_ascii=False)
        return self._one("chat", {"messages": messages, "max_tokens": max_tokens, "temperature": float(temperature),
                                  "top_p": float(top_p)}, timeout)
