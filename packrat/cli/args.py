"""Argument types and progress output shared by the commands."""

from __future__ import annotations

import argparse
import sys


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
