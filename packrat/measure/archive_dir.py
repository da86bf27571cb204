"""Unpacking any TorchServe model archive for the profiler, Packrat's own or a user's
(packrat.model.archive.extract_archive checks what TorchServe needs, and Packrat's own
files where the archive is one Packrat built), and reading what the profiler needs of it."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packrat.errors import ArchiveError
from packrat.model.archive import extract_archive
from packrat.model.spec import MANIFEST_FILE, SPEC_FILE


@dataclass(frozen=True)
class OpenedArchive:
    model_dir: Path
    model_name: str
    handler: str  # the manifest's model.handler: a file, `file:function` or a default name
    packrat_built: bool


def is_packrat_built(archive: Path) -> bool:
    """Whether the archive holds packrat.json (reads only the zip's directory)."""
    archive = Path(archive)
    if archive.is_dir():
        return (archive / SPEC_FILE).is_file()
    try:
        with zipfile.ZipFile(archive) as zf:
            return SPEC_FILE in zf.namelist()
    except FileNotFoundError:
        raise ArchiveError(f"archive {archive} not found") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive} is not a readable zip file ({e}); make it again with "
                           "torch-model-archiver") from None


def open_archive(archive: Path, dest: Path) -> OpenedArchive:
    """Unpack a .mar into dest (a directory is used in place) and read its manifest."""
    archive = Path(archive)
    model_dir = extract_archive(archive, Path(dest))  # checks that it names a handler
    model = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))["model"]
    name = model.get("modelName")
    return OpenedArchive(
        model_dir=model_dir,
        model_name=name if isinstance(name, str) and name else archive.stem,
        handler=model["handler"].strip(),
        packrat_built=(model_dir / SPEC_FILE).is_file(),
    )
