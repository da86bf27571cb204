"""Profiles: measured latency of one model instance per (threads, batch), and their files.

A profile is data only. The Packrat format is a CSV whose first three columns are
`threads,batch,latency_ms` (more columns may follow), with a JSON metadata file beside it
(`NAME.meta.json` for `NAME.csv`). The published 16-core profiles of the Packrat authors
(`pytorch_<model>_latency.csv` and `torchserve_<model>_results.csv`) are read as well.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packrat.errors import ProfileError

HEADER = ("threads", "batch", "latency_ms")
EXTRA_COLUMNS = ("p10_ms", "p90_ms", "reps")
FORMATS = ("auto", "packrat", "pytorch", "torchserve")
# Bounds on a profile's thread counts and batch sizes. The optimizer's tables grow with both
# (cores x batch), so a typo like 10000000000 must be an error here, not an allocation there.
MAX_THREADS = 1024
MAX_BATCH = 8192


@dataclass(frozen=True)
class ProfilePoint:
    """One measurement: an instance with `threads` threads serving a batch of `batch` inputs."""

    threads: int
    batch: int
    latency_ms: float  # median of the timed repetitions
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int | None = None


@dataclass(frozen=True)
class ProfileMeta:
    """Where and how a profile was measured; written beside the CSV."""

    model: str = ""
    archive_sha256: str = ""
    cpu_model: str = ""
    cores: tuple[int, ...] = ()
    torch_version: str = ""
    threads_grid: tuple[int, ...] = ()
    max_batch: int = 0
    measured_points: int = 0
    skipped_points: int = 0
    duration_s: float = 0.0
    contended: bool = False  # measured with the other instances of the plan running beside it
    created: str = ""
    source: str = ""
    # The largest batch the handler took when some larger one failed (None: all worked), and
    # the handler's error; no point above it was measured. Absent from older profiles.
    batch_limit: int | None = None
    batch_limit_reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "ProfileMeta":
        known = {k: v for k, v in data.items() if k in ProfileMeta.__dataclass_fields__}
        for key in ("cores", "threads_grid"):
            if key in known:
                known[key] = tuple(known[key])
        return ProfileMeta(**known)


@dataclass(frozen=True)
class Profile:
    """Latency table of one model; points are unique per (threads, batch) and sorted."""

    points: tuple[ProfilePoint, ...]
    meta: ProfileMeta = field(default_factory=ProfileMeta)

    def __post_init__(self) -> None:
        if not self.points:
            raise ProfileError("the profile holds no measurements; profile the model again")
        seen = set()
        for p in self.points:
            where = f"point (threads={p.threads}, batch={p.batch})"
            if not isinstance(p.threads, int) or not 1 <= p.threads <= MAX_THREADS:
                raise ProfileError(f"{where}: threads must be an integer in 1..{MAX_THREADS}")
            if not isinstance(p.batch, int) or not 1 <= p.batch <= MAX_BATCH:
                raise ProfileError(f"{where}: batch must be an integer in 1..{MAX_BATCH}")
            if not math.isfinite(p.latency_ms) or p.latency_ms <= 0:
                raise ProfileError(
                    f"{where}: latency_ms must be a positive finite number, got {p.latency_ms!r}"
                )
            if (p.threads, p.batch) in seen:
                raise ProfileError(f"{where} appears twice; keep one measurement per point")
            seen.add((p.threads, p.batch))
        ordered = tuple(sorted(self.points, key=lambda p: (p.threads, p.batch)))
        object.__setattr__(self, "points", ordered)

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(sorted({p.threads for p in self.points}))

    def table(self) -> dict[int, dict[int, float]]:
        """latency_ms by threads, then batch."""
        out: dict[int, dict[int, float]] = {}
        for p in self.points:
            out.setdefault(p.threads, {})[p.batch] = p.latency_ms
        return out


def meta_path(csv_path: Path) -> Path:
    return Path(csv_path).with_suffix(".meta.json")


def write_profile(profile: Profile, path: Path) -> None:
    """Write the CSV and its metadata beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER + EXTRA_COLUMNS)
        for p in profile.points:
            w.writerow(
                [
                    p.threads,
                    p.batch,
                    f"{p.latency_ms:.4f}",
                    "" if p.p10_ms is None else f"{p.p10_ms:.4f}",
                    "" if p.p90_ms is None else f"{p.p90_ms:.4f}",
                    "" if p.reps is None else p.reps,
                ]
            )
    meta_path(path).write_text(json.dumps(profile.meta.to_json(), indent=2) + "\n")


def read_profile(
    path: Path, fmt: str = "auto", benchmark: str = "script", allocator: str = "default"
) -> Profile:
    """Read a profile in any supported format.

    fmt: `packrat` (threads,batch,latency_ms...), `pytorch` (the published
    `pytorch_<model>_latency.csv`: rows with `topology == sequential`, the given allocator and
    `benchmark` containing the given word, column `latency(avg)`), `torchserve` (the published
    `torchserve_<model>_results.csv`: one instance, the given allocator, `mean_ts_latency`), or
    `auto` to tell them apart by their header.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ProfileError(f"unknown profile format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist; run `packrat profile` first")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise ProfileError(f"profile file {path} is not a text CSV file (not UTF-8)") from None
    except csv.Error as e:
        raise ProfileError(f"profile file {path} is not a valid CSV file ({e})") from None
    except OSError as e:
        raise ProfileError(f"cannot read profile file {path}: {e.strerror or e}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise ProfileError(f"profile file {path} is empty; run `packrat profile` again")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if fmt == "auto":
        fmt = _detect_format(path, header)
    if fmt == "packrat":
        points = _read_packrat(path, header, body)
    elif fmt == "pytorch":
        points = _read_published(
            path, header, body, "intraop_threads", "batch_size", "latency(avg)",
            lambda r: r["topology"] == "sequential" and r["allocator"] == allocator
            and benchmark in r["benchmark"],
            ("topology", "allocator", "benchmark"),
        )
    else:
        points = _read_published(
            path, header, body, "cores", "batch_size", "mean_ts_latency",
            lambda r: r["allocator"] == allocator and r.get("instances", "1") == "1",
            ("allocator",),
        )
    if not points:
        raise ProfileError(
            f"{path}: no measurements selected (format {fmt}, benchmark {benchmark!r}, "
            f"allocator {allocator!r}); check --benchmark and --allocator"
        )
    meta = ProfileMeta(source=str(path))
    if fmt == "packrat" and meta_path(path).is_file():
        try:
            data = json.loads(meta_path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"a JSON object is expected, not {type(data).__name__}")
            meta = ProfileMeta.from_json(data)
        except (OSError, ValueError, TypeError) as e:
            raise ProfileError(f"{meta_path(path)}: unreadable metadata ({e}); delete it") from None
    try:
        return Profile(tuple(points), meta)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None


def _detect_format(path: Path, header: list[str]) -> str:
    if tuple(header[:3]) == HEADER:
        return "packrat"
    if "intraop_threads" in header and "latency(avg)" in header:
        return "pytorch"
    if "mean_ts_latency" in header and "cores" in header:
        return "torchserve"
    raise ProfileError(
        f"{path}: unrecognized columns {','.join(header[:6])}; a Packrat profile starts with "
        f"the header {','.join(HEADER)}"
    )


def _number(path: Path, line: int, column: str, text: str, kind=float):
    try:
        value = kind(text.strip()) if kind is int else float(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ProfileError(f"{path} line {line}: {column} is {text!r}, not {what}") from None
    if kind is float and not math.isfinite(value):
        raise ProfileError(f"{path} line {line}: {column} is {text!r}; measure it again")
    if value <= 0:
        raise ProfileError(f"{path} line {line}: {column} is {text!r}; it must be > 0")
    return value


def _read_packrat(path: Path, header: list[str], body: list[list[str]]) -> list[ProfilePoint]:
    if tuple(header[:3]) != HEADER:
        raise ProfileError(
            f"{path}: the header must start with {','.join(HEADER)}, found {','.join(header[:3])}"
        )
    extra = {name: header.index(name) for name in EXTRA_COLUMNS if name in header}
    points = []
    for i, row in enumerate(body, start=2):
        if len(row) < 3 or any(not cell.strip() for cell in row[:3]):
            raise ProfileError(f"{path} line {i}: a threads, batch or latency_ms cell is missing")

        def optional(name: str, kind=float):
            j = extra.get(name)
            if j is None or j >= len(row) or not row[j].strip():
                return None
            return _number(path, i, name, row[j], kind)

        points.append(
            ProfilePoint(
                threads=_number(path, i, "threads", row[0], int),
                batch=_number(path, i, "batch", row[1], int),
                latency_ms=_number(path, i, "latency_ms", row[2]),
                p10_ms=optional("p10_ms"),
                p90_ms=optional("p90_ms"),
                reps=optional("reps", int),
            )
        )
    return points


def _read_published(path, header, body, t_col, b_col, lat_col, keep, filter_cols):
    missing = [c for c in (t_col, b_col, lat_col, *filter_cols) if c not in header]
    if missing:
        raise ProfileError(f"{path}: columns {', '.join(missing)} are missing")
    points = []
    for i, row in enumerate(body, start=2):
        record = dict(zip(header, (cell.strip() for cell in row)))
        if not keep(record):
            continue
        points.append(
            ProfilePoint(
                threads=_number(path, i, t_col, record.get(t_col, ""), int),
                batch=_number(path, i, b_col, record.get(b_col, ""), int),
                latency_ms=_number(path, i, lat_col, record.get(lat_col, "")),
            )
        )
    return points
