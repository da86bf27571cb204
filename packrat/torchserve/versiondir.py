"""Per-version model directories: one unpacked archive per registered version."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from packrat.errors import ArchiveError, TorchServeError
from packrat.model.archive import extract_archive
from packrat.model.spec import MANIFEST_FILE, VERSION_CONFIG_FILE


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
        manifest = read_manifest(staging)
        manifest["model"]["modelVersion"] = str(version)
        write_manifest(staging, manifest)
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


def read_manifest(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / MANIFEST_FILE).read_text())


def write_manifest(version_dir: Path, manifest: dict) -> None:
    path = Path(version_dir) / MANIFEST_FILE
    path.unlink(missing_ok=True)  # may be a hard link to the source's manifest
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def write_model_config(version_dir: Path, manifest: dict, *, workers: int, batch_size: int,
                       max_batch_delay_ms: int) -> None:
    """Give the version its own model-config.yaml: the archive's (if its manifest names one)
    with the workers and batching the version is registered with, since in TorchServe 0.12
    the archive's minWorkers/maxWorkers/batchSize/maxBatchDelay override the register call's.
    Every other key of the user's (responseTimeout, jobQueueSize, handler settings) is kept.
    Sets manifest["model"]["configFile"]; the caller writes the manifest."""
    import yaml

    version_dir = Path(version_dir)
    config: dict = {}
    own = manifest["model"].get("configFile")
    if own:
        path = version_dir / own
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ArchiveError(f"the archive's {own} does not load ({' '.join(str(e).split())[:200]})"
                               "; fix it with torch-model-archiver --config-file") from None
        if not isinstance(config, dict):
            raise ArchiveError(f"the archive's {own} is not a YAML mapping; fix it with "
                               "torch-model-archiver --config-file")
    config.update(minWorkers=workers, maxWorkers=workers, batchSize=batch_size,
                  maxBatchDelay=max_batch_delay_ms)
    target = version_dir / VERSION_CONFIG_FILE
    target.unlink(missing_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    manifest["model"]["configFile"] = VERSION_CONFIG_FILE
