"""Measuring on this machine: usable cores and pinning, the profiler and its pinned workers,
closed-loop load, and other processes' CPU (to repeat disturbed measurements)."""
