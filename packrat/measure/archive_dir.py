"""Unpacking any TorchServe model archive for the profiler, Packrat's own or a user's.

packrat.model.archive.extract_archive checks that an archive is one Packrat built; an archive
made by torch-model-archiver around a user's handler is profiled too (from a sample request),
so this unpacks with the same safety rules and checks only what TorchServe needs: a manifest
that names a handler. A Packrat archive still gets Packrat's own checks.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from packrat.errors import ArchiveError, ProfilerError
from packrat.model.archive import check_model_dir
from packrat.model.spec import MANIFEST_FILE, SPEC_FILE


@dataclass(frozen=True)
class OpenedArchive:
    model_dir: Path
    model_name: str
    handler: str  # the manifest's model.handler: a file, `file:function` or a default name
    packrat_built: bool


def is_packrat_built(archive: Path) -> bool:
    """Whether the archive holds packrat.json (reads only the zip's directory); ArchiveError
    for one that is missing or no zip."""
    archive = Path(archive)
    if archive.is_dir():
        return (archive / SPEC_FILE).is_file()
    _check_zip(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            return SPEC_FILE in zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive} is corrupt or unreadable ({e}); rebuild it") from None


def open_archive(archive: Path, dest: Path) -> OpenedArchive:
    """Unpack a .mar into dest (a directory is used in place) and read its manifest."""
    archive = Path(archive)
    model_dir = archive if archive.is_dir() else _unzip(archive, Path(dest))
    try:
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArchiveError(f"{archive} has no {MANIFEST_FILE}; it is not a TorchServe model "
                           "archive") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ArchiveError(f"{archive}: {MANIFEST_FILE} is not valid JSON ({e})") from None
    packrat_built = (model_dir / SPEC_FILE).is_file()
    if packrat_built:
        check_model_dir(model_dir, archive)
    model: Any = manifest.get("model") if isinstance(manifest, dict) else None
    handler = model.get("handler") if isinstance(model, dict) else None
    if not (isinstance(handler, str) and handler.strip()):
        raise ProfilerError(
            f"{archive}: its manifest names no handler (model.handler in {MANIFEST_FILE}), so "
            "TorchServe could not serve it either; rebuild it with torch-model-archiver --handler"
        )
    name = model.get("modelName")
    return OpenedArchive(
        model_dir=model_dir,
        model_name=name if isinstance(name, str) and name else archive.stem,
        handler=handler.strip(),
        packrat_built=packrat_built,
    )


def _check_zip(archive: Path) -> None:
    if not archive.is_file():
        raise ArchiveError(f"archive {archive} not found")
    if not zipfile.is_zipfile(archive):
        raise ArchiveError(f"{archive} is not a zip file; rebuild it with torch-model-archiver")


def _unzip(archive: Path, dest: Path) -> Path:
    _check_zip(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                p = PurePosixPath(member)
                if p.is_absolute() or ".." in p.parts:  # would land outside dest
                    raise ArchiveError(f"{archive} holds an unsafe path {member!r}")
            dest.mkdir(parents=True, exist_ok=True)
            zf.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as e:
        raise ArchiveError(f"{archive} is corrupt or unreadable ({e}); rebuild it") from None
    return dest
