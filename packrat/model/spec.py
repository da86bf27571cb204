"""What a model takes as input: `packrat.json` of an archive Packrat built.

An archive built by Packrat holds `model.py` (one `torch.nn.Module` class), its `state_dict`
and `packrat.json`, a `ModelSpec`: the class name and each input's name, per-example shape
and dtype. The profiler uses the spec to make synthetic batches (`packrat.model.wire`); the
handler uses it to validate requests. No torch here: the controller reads specs too.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packrat.errors import ArchiveError

logger = logging.getLogger(__name__)

SPEC_FILE = "packrat.json"
DEFAULT_WEIGHTS_FILE = "weights.pt"
MODEL_FILE = "model.py"
MANIFEST_FILE = "MAR-INF/MANIFEST.json"
# Packrat's handler, shipped in the package `packrat.worker` and copied into each archive.
HANDLER_FILE = "packrat_handler.py"
HANDLER_PACKAGE = "packrat.worker"
# In a version directory Packrat pins: the plan it serves, where its slot locks are and the
# archive's own handler, so a worker finds all from its model directory alone, in any
# TorchServe; and Packrat's entry point (package data of `packrat.worker`) that wraps it.
WORKER_FILE = "packrat-worker.json"
ENTRY_FILE = "packrat_entry.py"
IDLE_START_FILE = "idle_start.py"  # a background version's sitecustomize.py
ENTRY_HANDLER = "packrat_entry:handle"
# Packrat's warm-up requests carry this header; a background version's entry point runs them
# at idle CPU priority, as it ran the load.
WARM_UP_HEADER = "X-Packrat-Warm-Up"
# In every version directory: the archive's model-config.yaml (if any) with the version's
# workers and batching; the manifest's configFile names it, the user's file stays as it was.
VERSION_CONFIG_FILE = "packrat-model-config.yaml"

# A 3x224x224 float32 image is 0.8 MB in the compact form and ~4 MB as a JSON list; 64 MiB
# leaves room for big inputs while keeping one bad client from exhausting a worker's memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Float inputs with more elements than this go in the compact b64 form in examples.
B64_THRESHOLD = 1000
# Ids drawn for an int64 input without `high`: 0 or 1 fit any embedding table.
DEFAULT_INT_HIGH = 2

# The dtypes an input may have; the wire format sends them little-endian.
DTYPES = ("float32", "int64")


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
        if self.dtype not in DTYPES:
            raise ArchiveError(
                f"input {self.name!r}: dtype {self.dtype!r} is not supported; "
                f"use one of {sorted(DTYPES)}"
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
