"""Loading the model of an archive Packrat built: `model.py`'s class with its state_dict."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

from packrat.errors import ArchiveError
from packrat.model.spec import (
    DEFAULT_WEIGHTS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SPEC_FILE,
    ModelSpec,
)

logger = logging.getLogger(__name__)


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
