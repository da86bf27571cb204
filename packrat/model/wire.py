"""The request wire format: one JSON object per request, mapping every input name to either a
nested list or, for large inputs, the compact form `{"dtype": "float32", "shape": [3, 224,
224], "b64": "..."}` holding base64 of the raw little-endian bytes. Bad bodies raise
`RequestError`, whose message is sent back to the client with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
import torch

from packrat.errors import RequestError
from packrat.model.spec import (
    B64_THRESHOLD,
    DEFAULT_INT_HIGH,
    MAX_BODY_BYTES,
    InputSpec,
    ModelSpec,
)

_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def synthetic_batch(spec: ModelSpec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with a leading batch dimension; the same seed gives the same tensors."""
    if type(batch) is not int or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for inp in spec.inputs:
        size = (batch, *inp.shape)
        if inp.dtype == "float32":
            out[inp.name] = torch.randn(size, generator=gen, dtype=torch.float32)
        else:
            high = inp.high if inp.high is not None else DEFAULT_INT_HIGH
            out[inp.name] = torch.randint(0, high, size, generator=gen, dtype=torch.int64)
    return out


def encode_example(spec: ModelSpec, seed: int = 0) -> dict[str, Any]:
    """A valid, JSON-serializable request body for one example."""
    batch = synthetic_batch(spec, 1, seed)
    body: dict[str, Any] = {}
    for inp in spec.inputs:
        tensor = batch[inp.name][0]
        if inp.dtype == "float32" and inp.numel > B64_THRESHOLD:
            body[inp.name] = encode_b64(tensor)
        else:
            body[inp.name] = tensor.tolist()
    return body


def encode_b64(tensor: torch.Tensor) -> dict[str, Any]:
    """The compact request form of one input: dtype, shape and base64 of the raw bytes."""
    names = {v: k for k, v in _TORCH_DTYPES.items()}
    if tensor.dtype not in names:
        raise ValueError(f"dtype {tensor.dtype} is not supported; use float32 or int64")
    dtype = names[tensor.dtype]
    raw = tensor.detach().cpu().contiguous().numpy().astype(_DTYPES[dtype], copy=False).tobytes()
    return {"dtype": dtype, "shape": list(tensor.shape), "b64": base64.b64encode(raw).decode()}


def decode_request(body: Any, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Validate one request body and return its tensors, without a batch dimension.

    `body` is the JSON text (bytes, bytearray or str) or the already-parsed object.
    Raises RequestError with a message the client can act on.
    """
    obj = _parse_body(body, spec)
    expected = set(spec.input_names)
    missing = [n for n in spec.input_names if n not in obj]
    extra = sorted(set(obj) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if extra:
            parts.append(f"unknown input(s) {extra}")
        raise RequestError(f"{' and '.join(parts)}; {_expected_inputs(spec)}")
    return {inp.name: _decode_value(obj[inp.name], inp) for inp in spec.inputs}


def _expected_inputs(spec: ModelSpec) -> str:
    return "expected a JSON object with " + "; ".join(i.describe() for i in spec.inputs)


def _parse_body(body: Any, spec: ModelSpec) -> dict[str, Any]:
    if isinstance(body, (bytes, bytearray, str)):
        size = len(body)
        if size == 0:
            raise RequestError(f"request body is empty; {_expected_inputs(spec)}")
        if size > MAX_BODY_BYTES:
            raise RequestError(
                f"request body is {size} bytes, over the {MAX_BODY_BYTES} byte limit; "
                "send large float inputs in the compact form "
                '{"dtype": "float32", "shape": [...], "b64": "..."}'
            )
        try:
            text = body if isinstance(body, str) else bytes(body).decode("utf-8")
            body = json.loads(text)
        except UnicodeDecodeError:
            raise RequestError("request body is not UTF-8 text; send a JSON object") from None
        except json.JSONDecodeError as e:
            raise RequestError(f"request body is not valid JSON ({e})") from None
        except RecursionError:
            raise RequestError(f"request body is nested too deeply; {_expected_inputs(spec)}") from None
    if not isinstance(body, dict):
        raise RequestError(
            f"request body must be a JSON object, got {type(body).__name__}; "
            f"{_expected_inputs(spec)}"
        )
    return body


def _decode_value(value: Any, inp: InputSpec) -> torch.Tensor:
    if isinstance(value, dict):
        arr = _decode_b64(value, inp)
    elif isinstance(value, list):
        arr = _decode_list(value, inp)
    else:
        raise RequestError(
            f"input {inp.name!r} must be a nested list or a "
            '{"dtype", "shape", "b64"} object, '
            f"got {type(value).__name__}; expected {inp.describe()}"
        )
    if inp.dtype == "float32":
        if not np.isfinite(arr).all():
            raise RequestError(f"input {inp.name!r} holds NaN or infinity; send finite numbers")
    else:
        high = inp.high
        low_ok = bool((arr >= 0).all())
        if not low_ok or (high is not None and bool((arr >= high).any())):
            bound = f"[0, {high})" if high is not None else ">= 0"
            raise RequestError(
                f"input {inp.name!r} holds ids outside {bound} "
                f"(min {int(arr.min())}, max {int(arr.max())})"
            )
    return torch.from_numpy(arr)


def _leading_shape(value: list) -> list[int]:
    """The shape a nested list claims along its first elements (numpy's guess, without
    building the array): [[1, 2, 3], [4]] claims [2, 3]."""
    shape = []
    while isinstance(value, list) and len(shape) < 64:
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _decode_list(value: list, inp: InputSpec) -> np.ndarray:
    claimed = _leading_shape(value)
    if math.prod(claimed) > inp.numel:
        # Too many values: refuse before numpy copies them all (a 6 MB body of zeros is 3
        # million of them).
        raise RequestError(
            f"input {inp.name!r} has shape {claimed}, more values than expected; "
            f"expected {inp.describe()}"
        )
    try:
        arr = np.array(value)
    except (ValueError, TypeError, OverflowError):
        # numpy refuses ragged nesting.
        raise RequestError(
            f"input {inp.name!r} is not a regular nested list of numbers; "
            f"expected {inp.describe()}"
        ) from None
    if arr.size == 0 and arr.shape != inp.shape:
        raise RequestError(f"input {inp.name!r} is empty; expected {inp.describe()}")
    if arr.dtype.kind not in "iuf":
        # bool, str, object (mixed, None, huge ints) are all refused rather than coerced.
        raise RequestError(
            f"input {inp.name!r} must hold only numbers (found {_kind_name(arr.dtype)}); "
            f"expected {inp.describe()}"
        )
    if arr.shape != inp.shape:
        raise RequestError(
            f"input {inp.name!r} has shape {list(arr.shape)}; expected {inp.describe()}"
        )
    if inp.dtype == "int64":
        if arr.dtype.kind == "f":
            raise RequestError(f"input {inp.name!r} must hold integers (ids), not floats")
        if arr.dtype.kind == "u" and arr.max(initial=0) > np.iinfo(np.int64).max:
            raise RequestError(f"input {inp.name!r} holds ids too large for int64")
    # Floats beyond float32's range become inf here; the caller rejects non-finite values.
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(arr, dtype=_DTYPES[inp.dtype])


def _short(value: Any, limit: int = 80) -> str:
    """repr of a client's value, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings", "O": "non-numeric values"}.get(
        dtype.kind, str(dtype)
    )


def _decode_b64(value: dict, inp: InputSpec) -> np.ndarray:
    keys = set(value)
    if keys != {"dtype", "shape", "b64"}:
        raise RequestError(
            f"input {inp.name!r}: the compact form needs exactly the keys "
            f"'dtype', 'shape', 'b64', got {sorted(keys)}"
        )
    if value["dtype"] != inp.dtype:
        raise RequestError(
            f"input {inp.name!r}: dtype {_short(value['dtype'])} does not match; "
            f"expected {inp.describe()}"
        )
    shape = value["shape"]
    if not isinstance(shape, list) or tuple(shape) != inp.shape:
        raise RequestError(
            f"input {inp.name!r}: shape {_short(shape)} does not match; expected {inp.describe()}"
        )
    data = value["b64"]
    if not isinstance(data, str):
        raise RequestError(f"input {inp.name!r}: 'b64' must be a base64 string")
    dtype = _DTYPES[inp.dtype]
    want = inp.numel * dtype.itemsize

    def wrong_size(size: int) -> RequestError:
        return RequestError(
            f"input {inp.name!r}: 'b64' decodes to {size} bytes; {inp.describe()} "
            f"needs {want} bytes of little-endian {inp.dtype}"
        )

    if len(data) > 4 * -(-want // 3):
        # Too long for `want` bytes: refused from its length, before decoding it.
        if len(data) % 4:
            raise RequestError(f"input {inp.name!r}: 'b64' is not valid base64")
        raise wrong_size(len(data) // 4 * 3 - len(data[-2:]) + len(data[-2:].rstrip("=")))
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"input {inp.name!r}: 'b64' is not valid base64") from None
    if len(raw) != want:
        raise wrong_size(len(raw))
    # copy(): frombuffer is read-only and torch.from_numpy wants a writable array.
    return np.frombuffer(raw, dtype=dtype).reshape(inp.shape).copy()
