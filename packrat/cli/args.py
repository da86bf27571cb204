"""Argument types and progress output shared by the commands."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# More values than anyone plans or profiles at once; `1-100000000` is a typo, not a request.
MAX_LIST_VALUES = 10000


def int_list(text: str) -> list[int]:
    """`1,2,4` or `1-4` or a mix; every value an integer."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise argparse.ArgumentTypeError(f"{part!r} is an empty range; write LOW-HIGH")
                if hi - lo >= MAX_LIST_VALUES:
                    raise argparse.ArgumentTypeError(
                        f"{part!r} has more than {MAX_LIST_VALUES} values")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like 1,2,4") from None
        if len(out) > MAX_LIST_VALUES:
            raise argparse.ArgumentTypeError(f"{text!r} has more than {MAX_LIST_VALUES} values")
    return out


def positive_ms(text: str) -> float:
    """A latency target in ms: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ms") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an SLO must be a positive number of ms")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """One model of `packrat plan --models`: NAME=PROFILE:B[:SLO_MS] (B = 0: idle)."""

    name: str
    profile: str
    batch: int
    slo_ms: float | None


MODELS_FORMAT = "NAME=PROFILE:B[:SLO_MS]"


def model_specs(text: str) -> list[ModelSpec]:
    """`resnet=r.csv:8:60,bert=b.csv:4,gpt2=g.csv:0`; a profile path may hold neither `,`
    nor `:`."""
    out: list[ModelSpec] = []
    for part in text.split(","):
        part = part.strip()
        name, sep, rest = part.partition("=")
        name = name.strip()
        fields = rest.split(":")
        if not sep or not name or len(fields) not in (2, 3) or not fields[0].strip():
            raise argparse.ArgumentTypeError(f"{part!r} is not {MODELS_FORMAT}")
        try:
            batch = int(fields[1])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r}: B is {fields[1]!r}, not an integer (0: idle)") from None
        if batch < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: B must be >= 0 (0: idle), got {batch}")
        slo = None
        if len(fields) == 3:
            try:
                slo = positive_ms(fields[2])
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{part!r}: {e}") from None
        if any(m.name == name for m in out):
            raise argparse.ArgumentTypeError(f"model {name!r} is given twice; name each once")
        out.append(ModelSpec(name, fields[0].strip(), batch, slo))
    return out


class ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, stream=sys.stderr, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self.tty = stream.isatty()
        self._open = False

    def update(self, done: int, total: int, text: str) -> None:
        if self.tty:
            filled = int(self.width * done / max(total, 1))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {text}\x1b[K")
            self._open = True
        else:
            self.stream.write(f"{self.label} {done}/{total} {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
