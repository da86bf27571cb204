"""Reading TorchServe's Prometheus metrics and its workers' CPU time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
from prometheus_client.parser import text_string_to_metric_families

from packrat.errors import TorchServeError

if TYPE_CHECKING:
    from packrat.torchserve.client import VersionInfo


def parse_metrics(text: str) -> dict[tuple[str, str, str], float]:
    """(metric, model_name, model_version) -> value for every sample of a Prometheus text
    that has model_name and model_version labels, summed over its other labels (hostname);
    other samples are left out. Metric names are the samples' names as in the text.

    Raises TorchServeError if text is not Prometheus text.
    """
    # prometheus_client renames the samples of a counter typed without "_total" to
    # NAME_total (OpenMetrics style), and strips "_total" from family names: without the
    # TYPE lines every sample keeps the name it has in the text.
    untyped = "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("# TYPE")
    )
    out: dict[tuple[str, str, str], float] = {}
    try:
        for family in text_string_to_metric_families(untyped):
            for sample in family.samples:
                labels = sample.labels
                if "model_name" not in labels or "model_version" not in labels:
                    continue
                key = (sample.name, labels["model_name"], labels["model_version"])
                out[key] = out.get(key, 0.0) + sample.value
    except ValueError as e:
        raise TorchServeError(f"not Prometheus text ({e or 'malformed line'})") from None
    return out


def worker_cpu_seconds(version: VersionInfo) -> float:
    """User plus system CPU seconds used so far by the live worker processes of a version.

    A worker running a batch of a CPU-bound model makes it grow; an idle one does not (the
    drain rule, packrat.core.drain, reads it). Only meaningful on the machine that
    runs TorchServe.
    """
    total = 0.0
    for w in version.workers:
        if w.pid is None:
            continue
        try:
            t = psutil.Process(w.pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total
