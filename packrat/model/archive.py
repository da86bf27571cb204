"""Build TorchServe model archives (.mar) from the zoo, unpack them and fingerprint them.

An archive holds `model.py`, `weights.pt` (a state_dict), `packrat.json` (the ModelSpec)
and Packrat's handler, `packrat_handler.py` (package data of `packrat.worker`). The worker imports `packrat` to load
the model, so TorchServe must run in an environment where packrat is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from packrat.errors import ArchiveError
from packrat.model.spec import (
    DEFAULT_WEIGHTS_FILE,
    HANDLER_FILE,
    HANDLER_PACKAGE,
    MANIFEST_FILE,
    MODEL_FILE,
    SPEC_FILE,
    ModelSpec,
)

# torch, packrat.model.zoo and packrat.model.wire (which import torch) are imported inside
# build_zoo_archive only: the rest of this module (extract, check, digest) is what the
# TorchServe layer and `packrat status/stop/plan` need, and must not cost a torch import.

logger = logging.getLogger(__name__)

ARCHIVE_VERSION = "1.0"
# Writing a 500 MB zip of gpt2's weights takes a while; a hung archiver should still end.
ARCHIVER_TIMEOUT_S = 900


@dataclass(frozen=True)
class ArchiveResult:
    mar_path: Path
    example_path: Path
    model_name: str


def handler_source() -> bytes:
    """The handler file shipped in every archive: package data of `packrat.worker` (read as a
    file, never imported here: it is the worker process's entry point, above this layer)."""
    try:
        return (resources.files(HANDLER_PACKAGE) / HANDLER_FILE).read_bytes()
    except OSError as e:
        raise ArchiveError(f"Packrat's handler {HANDLER_PACKAGE}/{HANDLER_FILE} is missing "
                           f"({e}); reinstall packrat") from None


def _archiver_command() -> str:
    # Prefer the archiver of this interpreter's environment over whatever is first on PATH.
    local = Path(sys.executable).parent / "torch-model-archiver"
    if local.is_file():
        return str(local)
    found = shutil.which("torch-model-archiver")
    if found is None:
        raise ArchiveError(
            "torch-model-archiver not found; pip install torch-model-archiver==0.12.0"
        )
    return found


def build_zoo_archive(
    name: str, out_dir: Path, *, progress: Callable[[str], None] | None = None
) -> ArchiveResult:
    """Write out_dir/NAME.mar and out_dir/NAME.example.json for the zoo model `name`."""
    import torch

    from packrat.model.wire import encode_example
    from packrat.model.zoo import build_model, get_zoo_model, require_dependencies

    entry = get_zoo_model(name)
    require_dependencies(entry)
    handler = handler_source()
    archiver = _archiver_command()
    out_dir = Path(out_dir).resolve()  # the archiver runs in a staging directory
    out_dir.mkdir(parents=True, exist_ok=True)

    def step(message: str) -> None:
        logger.info("%s: %s", name, message)
        if progress is not None:
            progress(message)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"packrat-{name}-") as tmp:
        staging = Path(tmp)
        (staging / MODEL_FILE).write_text(entry.source, encoding="utf-8")
        (staging / HANDLER_FILE).write_bytes(handler)
        (staging / SPEC_FILE).write_text(
            json.dumps(entry.spec.to_json(), indent=2) + "\n", encoding="utf-8"
        )
        step("building the model with random weights")
        model = build_model(entry)
        step("saving the state_dict")
        torch.save(model.state_dict(), staging / DEFAULT_WEIGHTS_FILE)
        del model
        step("packing the archive with torch-model-archiver")
        cmd = [
            archiver,
            "--model-name", name,
            "--version", ARCHIVE_VERSION,
            "--model-file", str(staging / MODEL_FILE),
            "--serialized-file", str(staging / DEFAULT_WEIGHTS_FILE),
            "--handler", str(staging / HANDLER_FILE),
            "--extra-files", str(staging / SPEC_FILE),
            "--export-path", str(out_dir),
            "--force",
        ]  # fmt: skip
        try:
            # The archiver stages files in $TMPDIR/<model name>: two builds of one model at
            # once would collide there, so each gets its own.
            proc = subprocess.run(
                cmd, cwd=staging, capture_output=True, text=True, timeout=ARCHIVER_TIMEOUT_S,
                env={**os.environ, "TMPDIR": str(staging)},
            )
        except subprocess.TimeoutExpired:
            raise ArchiveError(
                f"torch-model-archiver did not finish within {ARCHIVER_TIMEOUT_S} s for {name}"
            ) from None
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            raise ArchiveError(
                f"torch-model-archiver failed for {name} (exit {proc.returncode}): {lines[-1]}"
            )

    mar_path = out_dir / f"{name}.mar"
    if not mar_path.is_file():
        raise ArchiveError(f"torch-model-archiver reported success but {mar_path} is missing")
    example_path = out_dir / f"{name}.example.json"
    example_path.write_text(json.dumps(encode_example(entry.spec)) + "\n", encoding="utf-8")
    step(f"wrote {mar_path} in {time.monotonic() - started:.1f} s")
    return ArchiveResult(mar_path=mar_path, example_path=example_path, model_name=name)


def extract_archive(mar_path: Path, dest: Path) -> Path:
    """Unzip a .mar into dest and return the model directory (dest).

    A directory (an archive made with `--archive-format no-archive`, or one already
    extracted) is returned as is.
    """
    mar_path = Path(mar_path)
    if mar_path.is_dir():
        if not (mar_path / MANIFEST_FILE).is_file():
            raise ArchiveError(
                f"{mar_path} is a directory without {MANIFEST_FILE}; "
                "pass a .mar file or an unpacked archive directory"
            )
        check_model_dir(mar_path, mar_path)
        return mar_path
    if not mar_path.is_file():
        raise ArchiveError(f"archive {mar_path} not found")
    if not zipfile.is_zipfile(mar_path):
        raise ArchiveError(f"{mar_path} is not a zip file; rebuild it with torch-model-archiver")
    dest = Path(dest)
    try:
        with zipfile.ZipFile(mar_path) as zf:
            names = zf.namelist()
            if MANIFEST_FILE not in names:
                raise ArchiveError(
                    f"{mar_path} has no {MANIFEST_FILE}; it is not a TorchServe model archive"
                )
            for member in names:
                # Refuse members that would land outside dest.
                p = PurePosixPath(member)
                if p.is_absolute() or ".." in p.parts:
                    raise ArchiveError(f"{mar_path} holds an unsafe path {member!r}")
            try:
                dest.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ArchiveError(f"cannot create {dest} to unpack {mar_path}: {e}") from None
            zf.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as e:
        raise ArchiveError(f"{mar_path} is corrupt or unreadable ({e}); rebuild it") from None
    check_model_dir(dest, mar_path)
    return dest


def check_model_dir(model_dir: Path, source: Path) -> None:
    """Cheap checks that an unpacked archive is one TorchServe can serve: a manifest naming a
    handler, and the files it names; for an archive Packrat built also model.py and a valid
    packrat.json. ArchiveError naming `source` (the .mar) otherwise. The weights themselves
    are read only when the model loads."""
    _check_members(source, lambda name: (model_dir / name).is_file(),
                   lambda name: (model_dir / name).read_text(encoding="utf-8"))


def check_archive(path: Path) -> None:
    """check_model_dir for a .mar or an unpacked archive, reading only its small members: a
    command can refuse a bad archive before it starts anything."""
    path = Path(path)
    if path.is_dir():
        extract_archive(path, path)  # a directory is only checked, never copied
        return
    if not path.is_file():
        raise ArchiveError(f"archive {path} not found")
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path} is not a zip file; rebuild it with torch-model-archiver")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if MANIFEST_FILE not in names:
                raise ArchiveError(
                    f"{path} has no {MANIFEST_FILE}; it is not a TorchServe model archive"
                )
            _check_members(path, names.__contains__, lambda name: zf.read(name).decode("utf-8"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as e:
        raise ArchiveError(f"{path} is corrupt or unreadable ({e}); rebuild it") from None


def _check_members(source: Path, exists, read_text) -> None:
    try:
        manifest = json.loads(read_text(MANIFEST_FILE))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ArchiveError(f"{source}: {MANIFEST_FILE} is not valid JSON ({e})") from None
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict):
        raise ArchiveError(f"{source}: {MANIFEST_FILE} has no model section; make the archive "
                           "with torch-model-archiver")
    handler = model.get("handler")
    if not (isinstance(handler, str) and handler):
        raise ArchiveError(f"{source}: {MANIFEST_FILE} names no handler; make the archive with "
                           "torch-model-archiver --handler (a handler file, FILE:FUNCTION or a "
                           "TorchServe default handler name)")
    handler_file = PurePosixPath(handler.split(":")[0])
    if handler_file.suffix != ".py":
        handler_file = handler_file.with_suffix(".py")
    # A handler without its file in the archive is a TorchServe default handler name
    # (image_classifier, base_handler, ...): TorchServe's loader imports it from ts.torch_handler.
    builtin = str(handler_file.with_suffix("")).isidentifier()
    if not exists(str(handler_file)) and not builtin:
        raise ArchiveError(f"{source}: the handler {handler!r} names {handler_file}, which the "
                           "archive does not hold; make it again with torch-model-archiver")
    for key in ("serializedFile", "modelFile"):
        name = model.get(key)
        if isinstance(name, str) and name and not exists(name):
            raise ArchiveError(f"{source} has no {name}, which {MANIFEST_FILE} names as {key}; "
                               "make it again with torch-model-archiver (or `packrat archive`)")
    if str(handler_file) != HANDLER_FILE and not exists(SPEC_FILE):
        return  # the user's own archive: its handler knows what it needs
    weights = model.get("serializedFile")
    for name in (weights or DEFAULT_WEIGHTS_FILE, MODEL_FILE, SPEC_FILE):
        if not exists(name):
            raise ArchiveError(f"{source} has no {name}; rebuild it with `packrat archive`")
    try:
        spec = json.loads(read_text(SPEC_FILE))
    except (OSError, ValueError) as e:
        raise ArchiveError(f"{source}: {SPEC_FILE} is not valid JSON ({e}); rebuild the archive") from None
    try:
        ModelSpec.from_json(spec)
    except ArchiveError as e:
        raise ArchiveError(f"{source}: {SPEC_FILE}: {e}") from None


def archive_digest(path: Path) -> str:
    """sha256 of an archive: the file's bytes, or for a directory every file's path and bytes.

    Files under __pycache__ and *.pyc are left out: TorchServe's worker writes them into an
    unpacked archive when it imports the handler.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(h, path)
        return h.hexdigest()
    if not path.is_dir():
        raise ArchiveError(f"archive {path} not found")
    files = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    for rel, p in files:
        rel_bytes = rel.encode("utf-8")
        # Lengths make the stream unambiguous (a path cannot run into the file's bytes).
        h.update(len(rel_bytes).to_bytes(8, "little") + rel_bytes)
        h.update(p.stat().st_size.to_bytes(8, "little"))
        _hash_file(h, p)
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
