"""One model version's life in TorchServe: make its directory, register it, check that every
worker runs where its plan says, warm it, and remove it. Used by the controller's switches, the
calibration and the benchmark.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from packrat.core.plan import Layout, ServedPlan
from packrat.errors import PackratError
from packrat.jsonfile import write_json
from packrat.model.sample import Sample
from packrat.model.spec import (
    ENTRY_FILE,
    ENTRY_HANDLER,
    HANDLER_FILE,
    HANDLER_PACKAGE,
    IDLE_START_FILE,
    WARM_UP_HEADER,
    WORKER_FILE,
)
from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, make_version_dir
from packrat.torchserve.versiondir import (
    read_manifest,
    write_manifest,
    write_model_config,
)
from packrat.worker.slots import WorkerConfig, read_failure

# From registering a version (without waiting: TorchServeClient.register) to every worker up
# and pinned on its slot. A version loaded ahead of need starts at idle priority, so on busy
# cores it takes as long as the live plan leaves CPU idle; a worker that fails to start says
# so at once (read_failure), so only a hung start waits this long.
STARTUP_TIMEOUT_S = 300.0


def deploy_version(run: RunDir, client: TorchServeClient, base_dir: Path, name: str,
                   version: str, layout: Layout, *, max_batch_delay_ms: int, warm: Sample,
                   response_timeout_s: int = 120, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> None:
    """Prepare, register, check and warm a version, blocking until it is ready to be the
    default (it does not become it). The caller cleans up a failure (retire_version). The
    controller runs the same steps one at a time without blocking (packrat.serving.switch)."""
    url = prepare_version(run, base_dir, name, version, layout,
                          max_batch_delay_ms=max_batch_delay_ms)
    # An unpinned version runs TorchServe's own worker code, which cannot report a failed
    # start: wait for TorchServe's answer then (benchmarks register those before measuring).
    client.register(url, model_name=name, batch_size=layout.batch_size,
                    max_batch_delay_ms=max_batch_delay_ms, initial_workers=layout.instances,
                    response_timeout_s=response_timeout_s,
                    wait=not isinstance(layout, ServedPlan))
    deadline = clock() + STARTUP_TIMEOUT_S
    while not (check := check_workers(run, client, name, version, layout)).ready:
        if check.failed or clock() > deadline:
            raise check.error(run, STARTUP_TIMEOUT_S)
        sleep(0.1)
    warm_version(client, name, version, layout.instances * layout.batch_size, warm)


def prepare_version(run: RunDir, base_dir: Path, name: str, version: str, layout: Layout, *,
                    max_batch_delay_ms: int, background: bool = False) -> str:
    """Make the version's directory in the model store from the extracted archive, never
    touching the archive: its own model-config.yaml with the layout's workers and batching,
    and for a pinned version Packrat's entry point around the archive's handler with the
    plan and slot directory it reads (background: it loads and warms up at idle CPU
    priority, and its workers start at idle priority where they may raise it back). Return
    the url to register."""
    remove_version_files(run, name, version)  # a leftover of an interrupted switch
    url = make_version_dir(base_dir, run.model_store, name, version)
    dest = run.model_store / url
    manifest = read_manifest(dest)
    handler = manifest["model"]["handler"]  # make_version_dir checked that there is one
    if handler.split(":")[0] == HANDLER_FILE:
        # Serve with the handler of this Packrat, whatever version built the archive.
        _copy_package_file(HANDLER_FILE, dest)
    write_model_config(dest, manifest, workers=layout.instances, batch_size=layout.batch_size,
                       max_batch_delay_ms=max_batch_delay_ms)
    if isinstance(layout, ServedPlan):
        # before the workers start: each reads it from its model directory to claim a slot
        run.write_plan(layout)
        config = WorkerConfig(layout, run.slot_dir(name, version), handler, background)
        write_json(dest / WORKER_FILE, config.to_json())
        _copy_package_file(ENTRY_FILE, dest)
        # On the workers' PYTHONPATH, so Python imports it before anything else; an archive's
        # own sitecustomize.py is left as it is (its worker then starts at normal priority).
        if background and not (dest / "sitecustomize.py").exists():
            _copy_package_file(IDLE_START_FILE, dest, as_name="sitecustomize.py")
        manifest["model"]["handler"] = ENTRY_HANDLER
    write_manifest(dest, manifest)
    return url


def _copy_package_file(name: str, dest: Path, as_name: str | None = None) -> None:
    target = dest / (as_name or name)
    target.unlink(missing_ok=True)  # a hard link: never write through to the base
    with resources.as_file(resources.files(HANDLER_PACKAGE) / name) as src:
        shutil.copyfile(src, target)


@dataclass(frozen=True)
class WorkerCheck:
    name: str
    version: str
    workers: int
    slots: int
    expected: int
    ready: bool
    failed: str | None = None  # why a worker could not start (it wrote so in its slot dir)

    def error(self, run: RunDir, waited_s: float) -> PackratError:
        """What went wrong: a worker's failure, or a start not done in waited_s."""
        logs = run.torchserve / "logs"
        if self.failed:
            return PackratError(f"{self.name} version {self.version}: a worker failed to "
                                f"start: {self.failed}; see {logs}")
        return PackratError(
            f"{self.name} version {self.version}: {self.workers} workers and {self.slots} "
            f"claimed slots after {waited_s:.0f} s, {self.expected} expected; see {logs}")


def check_workers(run: RunDir, client: TorchServeClient, name: str, version: str,
                  layout: Layout) -> WorkerCheck:
    """Is every worker up, and does a pinned one hold a slot and run on that slot's cores
    only (and if not, did one fail to start)? Raises PackratError if a worker runs
    elsewhere."""
    info = [v for v in client.versions(name) if v.version == version]
    # READY: the model is loaded (a starting worker has a pid, and its slot, before that)
    pids = {w.pid for v in info for w in v.workers if w.pid and w.status == "READY"}
    pinned = isinstance(layout, ServedPlan)
    instances = layout.instances
    slots = run.slot_pids(name, version) if pinned else {}
    ready = len(pids) >= instances and (
        not pinned or (len(slots) >= instances and set(slots.values()) >= pids))
    if ready:
        for k, pid in slots.items():
            try:
                cores = sorted(os.sched_getaffinity(pid))
            except OSError:  # it died meanwhile: look again
                ready = False
                break
            if cores != sorted(layout.slots[k]):
                raise PackratError(f"{name} version {version}: worker {pid} runs on cores "
                                   f"{cores}, its slot {k} is {list(layout.slots[k])}")
    failed = read_failure(run.slot_dir(name, version)) if pinned and not ready else None
    return WorkerCheck(name, version, len(pids), len(slots), instances, ready, failed)


def warm_version(client: TorchServeClient, name: str, version: str, n: int,
                 warm: Sample) -> None:
    """Two rounds of full batches to every worker of the version before it takes traffic,
    marked as warm-up (WARM_UP_HEADER)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 64)) as pool:
        for _ in range(2):
            replies = list(pool.map(
                lambda _: client.predict(name, warm.body, version=version, timeout_s=300,
                                         content_type=warm.content_type,
                                         headers={WARM_UP_HEADER: "1"}), range(n)))
            bad = [r.status_code for r in replies if r.status_code != 200]
            if bad:
                raise PackratError(f"{name} version {version}: warm-up requests failed with "
                                   f"HTTP {bad[:5]}: {replies[0].text[:200]}")


def retire_version(run: RunDir, client: TorchServeClient, name: str, version: str) -> None:
    """Unregister the version if TorchServe has it, and remove its files. Raises
    TorchServeError if TorchServe refuses (the files are kept then)."""
    if any(v.version == version for v in client.versions(name)):
        client.unregister(name, version)
    remove_version_files(run, name, version)


def remove_version_files(run: RunDir, model: str, version: str) -> None:
    shutil.rmtree(run.version_dir(model, version), ignore_errors=True)
    shutil.rmtree(run.slot_dir(model, version), ignore_errors=True)
    run.plan_file(model, version).unlink(missing_ok=True)
