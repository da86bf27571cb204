"""Serving under Packrat: the run directory, one version's life in TorchServe, switches as
non-blocking state machines, the controller loop, `packrat serve` (daemon), the commands
that act on a running serve (ops) and calibration through TorchServe."""
