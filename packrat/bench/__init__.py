"""`packrat bench` (Packrat against the baseline, TorchServe's default and the measured best
configuration, end to end) and `packrat demo`."""
