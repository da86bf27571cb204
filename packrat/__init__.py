"""Packrat: pick and serve the multi-instance configuration that minimizes CPU batch latency."""

__version__ = "0.1.0"
