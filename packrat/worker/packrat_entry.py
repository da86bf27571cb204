"""Packrat's entry point in a pinned version directory (package data, copied there). TorchServe
loads `packrat_entry:handle`; packrat.worker.wrapper pins the worker and delegates to the
archive's own handler. Packrat must be installed in the worker's Python environment."""

from packrat.worker.wrapper import handle  # noqa: F401
