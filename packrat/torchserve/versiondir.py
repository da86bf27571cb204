"""Per-version model directories: one unpacked archive per registered version."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from packrat.errors import ArchiveError, TorchServeError
from packrat.model.archive import extract_archive
from packrat.model.spec import MANIFEST_FILE


def make_version_dir(source: Path, model_store: Path, name: str, version: str) -> str:
    """Make model_store/NAME-vVERSION from a .mar or an unpacked archive directory, with
    MAR-INF/MANIFEST.json's modelVersion set to version; return the url to register.

    From a directory, files are hard-linked (copied where linking fails, e.g. across file
    systems) and the manifest is written anew, so the source's manifest is untouched.
    """
    model_store = Path(model_store)
    dirname = f"{name}-v{version}"
    dest = model_store / dirname
    if dest.exists():
        raise TorchServeError(
            f"{dest} already exists; unregister that version and remove the directory, "
            "or pick another version"
        )
    source = Path(source)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dirname}-", dir=model_store))
        # mkdtemp's 0700 stays: only this user's TorchServe reads it
    except OSError as e:
        raise TorchServeError(f"cannot make {dest}: {e}; check the model store") from None
    try:
        if source.is_dir():
            extract_archive(source, staging)  # checks that it is an archive directory
            _link_tree(source, staging)
        else:
            extract_archive(source, staging)
        manifest_path = staging / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        manifest["model"]["modelVersion"] = str(version)
        manifest_path.unlink()  # may be a hard link to the source's manifest
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(staging, dest)
    except (ArchiveError, OSError, ValueError, KeyError, TypeError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise TorchServeError(f"cannot make {dest} from {source}: {e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dirname


def _link_tree(source: Path, dest: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
