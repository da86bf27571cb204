"""What a model takes as input, and how requests and archives turn into tensors.

An archive built by Packrat holds `model.py` (one `torch.nn.Module` class), its `state_dict`
and `packrat.json`, a `ModelSpec`: the class name and each input's name, per-example shape
and dtype. The profiler uses the spec to make synthetic batches; the handler uses it to
validate requests.

A request body is a JSON object mapping every input name to either a nested list or, for large
inputs, the compact form `{"dtype": "float32", "shape": [3, 224, 224], "b64": "..."}` holding
base64 of the raw little-endian bytes. Bad bodies raise `RequestError`, whose message is sent
back to the client with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from packrat.errors import ArchiveError, RequestError

logger = logging.getLogger(__name__)

SPEC_FILE = "packrat.json"
DEFAULT_WEIGHTS_FILE = "weights.pt"
MODEL_FILE = "model.py"
MANIFEST_FILE = "MAR-INF/MANIFEST.json"

# A 3x224x224 float32 image is 0.8 MB in the compact form and ~4 MB as a JSON list; 64 MiB
# leaves room for big inputs while keeping one bad client from exhausting a worker's memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Float inputs with more elements than this go in the compact b64 form in examples.
B64_THRESHOLD = 1000
# Ids drawn for an int64 input without `high`: 0 or 1 fit any embedding table.
DEFAULT_INT_HIGH = 2

_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


@dataclass(frozen=True)
class InputSpec:
    """One model input, per example (no batch dimension).

    `high` (int64 only) is the exclusive upper bound of valid ids, e.g. the vocabulary size;
    requests with ids outside [0, high) are rejected instead of crashing the model.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    high: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ArchiveError(
                f"input name {self.name!r} is not a Python identifier; "
                "it is passed to forward() as a keyword argument"
            )
        if (
            not isinstance(self.shape, tuple)
            or not self.shape
            or not all(type(d) is int and d > 0 for d in self.shape)
        ):
            raise ArchiveError(
                f"input {self.name!r}: shape {self.shape!r} must be a non-empty tuple of "
                "positive integers (per example, without the batch dimension)"
            )
        if self.dtype not in _DTYPES:
            raise ArchiveError(
                f"input {self.name!r}: dtype {self.dtype!r} is not supported; "
                f"use one of {sorted(_DTYPES)}"
            )
        if self.high is not None:
            if self.dtype != "int64":
                raise ArchiveError(
                    f"input {self.name!r}: high={self.high!r} only applies to int64 inputs"
                )
            if type(self.high) is not int or self.high < 1:
                raise ArchiveError(
                    f"input {self.name!r}: high {self.high!r} must be a positive integer "
                    "(the exclusive upper bound of valid ids)"
                )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        """Short text for error messages, e.g. `pixel_values: float32 [3, 224, 224]`."""
        extra = f", ids in [0, {self.high})" if self.high is not None else ""
        return f"{self.name}: {self.dtype} {list(self.shape)}{extra}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.high is not None:
            out["high"] = self.high
        return out


@dataclass(frozen=True)
class ModelSpec:
    """The class to instantiate from `model.py` and the inputs its forward() takes."""

    model_class: str
    inputs: tuple[InputSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.model_class, str) or not self.model_class.isidentifier():
            raise ArchiveError(
                f"model_class {self.model_class!r} must be the name of a class in {MODEL_FILE}"
            )
        if not isinstance(self.inputs, tuple) or not self.inputs:
            raise ArchiveError("inputs must list at least one input")
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ArchiveError(f"input names {names} are not unique")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def to_json(self) -> dict[str, Any]:
        return {"model_class": self.model_class, "inputs": [i.to_json() for i in self.inputs]}

    @staticmethod
    def from_json(obj: Any) -> ModelSpec:
        """Build a spec from parsed JSON; every problem is an ArchiveError naming the field."""
        if not isinstance(obj, dict):
            raise ArchiveError(f"the spec must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"model_class", "inputs"}
        if unknown:
            raise ArchiveError(
                f"unknown field(s) {sorted(unknown)}; expected 'model_class' and 'inputs'"
            )
        for field in ("model_class", "inputs"):
            if field not in obj:
                raise ArchiveError(f"field {field!r} is missing")
        raw_inputs = obj["inputs"]
        if not isinstance(raw_inputs, list):
            raise ArchiveError(f"field 'inputs' must be a list, got {raw_inputs!r}")
        inputs = []
        for i, raw in enumerate(raw_inputs):
            if not isinstance(raw, dict):
                raise ArchiveError(f"inputs[{i}] must be an object, got {raw!r}")
            unknown = set(raw) - {"name", "shape", "dtype", "high"}
            missing = {"name", "shape", "dtype"} - set(raw)
            if unknown or missing:
                raise ArchiveError(
                    f"inputs[{i}]: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                    "each input has 'name', 'shape', 'dtype' and, for int64, optional 'high'"
                )
            shape = raw["shape"]
            if not isinstance(shape, list):
                raise ArchiveError(f"inputs[{i}].shape must be a list of ints, got {shape!r}")
            try:
                inputs.append(
                    InputSpec(
                        name=raw["name"],
                        shape=tuple(shape),
                        dtype=raw["dtype"],
                        high=raw.get("high"),
                    )
                )
            except ArchiveError as e:
                raise ArchiveError(f"inputs[{i}]: {e}") from None
        return ModelSpec(model_class=obj["model_class"], inputs=tuple(inputs))

    @staticmethod
    def load(path: str | Path) -> ModelSpec:
        """Read `packrat.json` (a file, or a model directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ArchiveError(
                f"{path} not found: the model directory is not a Packrat archive; "
                "build one with packrat.archive.build_zoo_archive"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ArchiveError(f"cannot read {path}: {e}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArchiveError(f"{path} is not valid JSON ({e}); rebuild the archive") from None
        try:
            return ModelSpec.from_json(obj)
        except ArchiveError as e:
            raise ArchiveError(f"{path}: {e}") from None


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


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Instantiate the archive's model class, load its state_dict and put it in eval mode."""
    model_dir = Path(model_dir)
    spec = ModelSpec.load(model_dir / SPEC_FILE)
    module = import_model_file(model_dir / MODEL_FILE)
    cls = getattr(module, spec.model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        found = sorted(
            name
            for name, obj in vars(module).items()
            if isinstance(obj, type)
            and issubclass(obj, torch.nn.Module)
            and obj.__module__ == module.__name__
        )
        raise ArchiveError(
            f"{model_dir / MODEL_FILE} has no torch.nn.Module class {spec.model_class!r} "
            f"(found {found}); fix model_class in {SPEC_FILE}"
        )
    try:
        model = cls()
    except Exception as e:
        raise ArchiveError(f"{spec.model_class}() failed in {model_dir}: {e!r}") from e

    weights = model_dir / _weights_file_name(model_dir)
    if not weights.is_file():
        raise ArchiveError(f"weights file {weights} not found; rebuild the archive")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's messages run over several lines and advise weights_only=False; say it short.
        raise ArchiveError(
            f"cannot load state_dict from {weights} ({type(e).__name__}): the file is corrupt "
            "or not a torch.save of a state_dict; rebuild the archive"
        ) from e
    if not isinstance(state, dict):
        raise ArchiveError(
            f"{weights} holds a {type(state).__name__}, not a state_dict; "
            "save model.state_dict() instead of the whole model"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # The torch message lists missing and unexpected keys; keep it but bound its length.
        detail = str(e)
        if len(detail) > 2000:
            detail = detail[:2000] + " ..."
        raise ArchiveError(
            f"{weights} does not match {spec.model_class} in {MODEL_FILE}: {detail}"
        ) from None
    model.eval()
    logger.info("loaded %s from %s", spec.model_class, model_dir)
    return model, spec


def _weights_file_name(model_dir: Path) -> str:
    """The manifest's serializedFile if there is a manifest, else weights.pt."""
    manifest = model_dir / MANIFEST_FILE
    if not manifest.is_file():
        return DEFAULT_WEIGHTS_FILE
    try:
        name = json.loads(manifest.read_text(encoding="utf-8"))["model"]["serializedFile"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArchiveError(
            f"{manifest} has no model.serializedFile ({e!r}); rebuild the archive"
        ) from None
    if not isinstance(name, str) or not name:
        raise ArchiveError(f"{manifest}: model.serializedFile {name!r} is not a file name")
    return name


def import_model_file(path: Path) -> ModuleType:
    """Import `model.py` under a name unique to its directory.

    Archives all call their file model.py; a per-directory name keeps two archives loaded
    in one process (tests, the profiler) from replacing each other in sys.modules.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ArchiveError(f"{path} not found; the archive must contain {MODEL_FILE}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"packrat_model_{digest}"
    import_spec = importlib.util.spec_from_file_location(name, path)
    if import_spec is None or import_spec.loader is None:
        raise ArchiveError(f"cannot import {path}")
    module = importlib.util.module_from_spec(import_spec)
    # Registered while it runs so that dataclasses and typing in model.py can find it.
    sys.modules[name] = module
    try:
        import_spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        sys.modules.pop(name, None)
        hint = " (pip install -e '.[models]')" if e.name and "transformers" in e.name else ""
        raise ArchiveError(f"{path} needs the missing package {e.name!r}{hint}") from e
    except Exception as e:
        sys.modules.pop(name, None)
        raise ArchiveError(f"importing {path} failed: {e!r}") from e
    return module
