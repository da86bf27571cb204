"""One model version's life in TorchServe: make its directory, register it, check that every
worker runs where its plan says, warm it, and remove it. Used by the controller's switches, the
calibration and the benchmark.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from packrat.core.plan import ServedPlan
from packrat.errors import PackratError
from packrat.model.spec import HANDLER_FILE, HANDLER_PACKAGE, WORKER_FILE
from packrat.serving.rundir import RunDir, write_json
from packrat.torchserve import TorchServeClient, make_version_dir


def deploy_version(run: RunDir, client: TorchServeClient, base_dir: Path, name: str,
                   version: str, plan: ServedPlan | None, *, instances: int, batch_size: int,
                   max_batch_delay_ms: int, warm_body: bytes, response_timeout_s: int = 120) -> None:
    """Make the version's directory, write its plan (None: workers run unpinned), register it,
    check that every worker runs (pinned ones on their slot's cores) and warm it with full
    batches sent to it explicitly. It does not become the default. The caller cleans up a
    failure (remove_version_files, unregister)."""
    remove_version_files(run, name, version)  # a leftover of an interrupted switch
    url = make_version_dir(base_dir, run.model_store, name, version)
    dest = run.model_store / url
    manifest = json.loads((dest / "MAR-INF" / "MANIFEST.json").read_text())
    if manifest["model"].get("handler", "").split(":")[0] == HANDLER_FILE:
        # Serve with the handler of this Packrat, whatever version built the archive.
        target = dest / HANDLER_FILE
        target.unlink(missing_ok=True)  # a hard link: never write through to the base
        with resources.as_file(resources.files(HANDLER_PACKAGE) / HANDLER_FILE) as src:
            shutil.copyfile(src, target)
    if plan is not None:
        # before the workers start: each reads it from its model directory to claim a slot
        run.write_plan(plan)
        write_json(dest / WORKER_FILE, {"plan": plan.to_json(),
                                        "slot_dir": str(run.slot_dir(name, version))})
    client.register(url, model_name=name, batch_size=batch_size,
                    max_batch_delay_ms=max_batch_delay_ms, initial_workers=instances,
                    response_timeout_s=response_timeout_s)
    _check_workers(run, client, name, version, plan, instances)
    _warm(client, name, version, instances * batch_size, warm_body)


def remove_version_files(run: RunDir, model: str, version: str) -> None:
    shutil.rmtree(run.version_dir(model, version), ignore_errors=True)
    shutil.rmtree(run.slot_dir(model, version), ignore_errors=True)
    run.plan_file(model, version).unlink(missing_ok=True)


def _check_workers(run, client, name, version, plan, instances, timeout_s: float = 30) -> None:
    """Every worker is up; a pinned one holds a slot and runs on that slot's cores only."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = [v for v in client.versions(name) if v.version == version]
        pids = {w.pid for v in info for w in v.workers if w.pid}
        slots = run.slot_pids(name, version) if plan is not None else {}
        ready = len(pids) >= instances and (
            plan is None or (len(slots) >= instances and set(slots.values()) >= pids))
        if ready:
            for k, pid in slots.items():
                try:
                    cores = sorted(os.sched_getaffinity(pid))
                except OSError:
                    ready = False
                    break
                if cores != sorted(plan.slots[k]):
                    raise PackratError(f"{name} version {version}: worker {pid} runs on cores "
                                       f"{cores}, its slot {k} is {list(plan.slots[k])}")
        if ready:
            return
        if time.monotonic() > deadline:
            raise PackratError(
                f"{name} version {version}: {len(pids)} workers and {len(slots)} claimed slots, "
                f"{instances} expected; see {run.torchserve / 'logs'}"
            )
        time.sleep(0.1)


def _warm(client, name: str, version: str, n: int, body: bytes) -> None:
    """Two rounds of full batches to every worker of the version before it takes traffic."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 64)) as pool:
        for _ in range(2):
            replies = list(pool.map(
                lambda _: client.predict(name, body, version=version, timeout_s=300), range(n)))
            bad = [r.status_code for r in replies if r.status_code != 200]
            if bad:
                raise PackratError(f"{name} version {version}: warm-up requests failed with "
                                   f"HTTP {bad[:5]}: {replies[0].text[:200]}")
