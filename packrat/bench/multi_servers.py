"""The several-models benchmark's servers: a plain TorchServe as it runs out of the box, or a
`packrat serve` with a --core-split, each with both models registered, on loopback. See
packrat.bench.multi for the design.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packrat.bench.multi_load import CORE_SPLIT, ModelLoad, MultiOptions
from packrat.bench.trace import JOB_QUEUE_SIZE, TIMEOUT_S
from packrat.bench.trace_serve import Started, wait_serving
from packrat.core.plan import describe
from packrat.errors import PackratError


class UnknownFlag(PackratError):
    """`packrat serve` does not know a flag this configuration needs (an older Packrat)."""


@dataclass(frozen=True)
class BenchModel:
    name: str
    ready: object   # trace_serve.Prepared of its zoo model
    load: ModelLoad


def config_server(name: str, models: Sequence[BenchModel], options: MultiOptions,
            slos: Mapping[str, float], tell: Callable[[str], None]):
    if name == "torchserve-default":
        return _PlainServer(name, models, options, tell)
    return _packrat_server(name, models, options, slos, tell)


class _PlainServer(Started):
    """`with _PlainServer(...) as s:` TorchServe 0.12 as it runs out of the box, both models
    registered with one unpinned worker per core and batch size 1 (Packrat starts it; its
    versions carry no plan, so the handler pins nothing and keeps torch's threads)."""

    def __init__(self, name: str, models: Sequence[BenchModel], options: MultiOptions,
                 tell: Callable[[str], None]) -> None:
        from packrat.bench.trace_serve import _fresh_run_dir

        self.name, self.models, self.options, self.tell = name, models, options, tell
        out = models[0].ready.out
        self.home = out / "runs" / name
        self.run, self.temp = _fresh_run_dir(self.home)
        self.server = None
        self.describe = (f"TorchServe 0.12 default: {len(models[0].ready.cores)}x<unpinned,b=1> "
                         "per model")

    def _start(self) -> None:
        from packrat.bench.runner import start_on_free_ports
        from packrat.core.plan import Unpinned
        from packrat.model.archive import extract_archive
        from packrat.model.sample import Sample
        from packrat.serving.versions import deploy_version
        from packrat.torchserve import ServerSettings, TorchServeClient

        self.run.create()
        settings, self.server = start_on_free_ports(lambda ports: ServerSettings(
            workdir=self.run.torchserve, model_store=self.run.model_store, ports=ports,
            properties=(("job_queue_size", str(JOB_QUEUE_SIZE)),)))
        self.client = TorchServeClient(settings, timeout_s=60)
        n = len(self.models[0].ready.cores)
        for m in self.models:
            self.tell(f"{self.name}: registering {m.name} as {describe(n, None, 1)}")
            base = extract_archive(m.ready.archive, self.run.path / "archives" / m.name)
            deploy_version(self.run, self.client, base, m.name, "1", Unpinned(n, 1),
                           max_batch_delay_ms=self.options.max_batch_delay_ms,
                           warm=Sample(m.ready.body, "application/json", "the zoo example"),
                           response_timeout_s=int(TIMEOUT_S))

    def stop(self) -> None:
        import shutil

        from packrat.torchserve import stop_server

        if self.server is not None:
            stop_server(self.server)
            self.server = None
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    def watch(self):
        from packrat.measure.foreign import ForeignCpu
        from packrat.torchserve import server_processes

        return ForeignCpu(lambda: server_processes(self.run.torchserve))

    def status_json(self) -> dict | None:
        return None

    def died(self, stopped: bool = False) -> str | None:
        """Why the server is gone before it was stopped; None while it runs."""
        from packrat.torchserve import find_server

        if not stopped and find_server(self.run.torchserve) is None:
            return f"TorchServe died during the run; see {self.run.torchserve / 'logs'}"
        return None

    @property
    def switch_log(self) -> Path | None:
        return None


def _packrat_server(name: str, models: Sequence[BenchModel], options: MultiOptions,
                    slos: Mapping[str, float], tell: Callable[[str], None]):
    """One `packrat serve` of both models for configuration `name`: the trace benchmark's
    Served (fresh run directory, loopback config.properties, start on free ports, stop with
    `packrat stop` whatever happens), with both models on its command line."""
    from packrat.bench.trace import TraceOptions
    from packrat.bench.trace_serve import Served

    class MultiServed(Served):
        describe = f"packrat serve --core-split {CORE_SPLIT[name]}"

        def _spawn(self, conf: Path) -> None:
            o = options
            argv = [sys.executable, "-m", "packrat.cli", "serve", "--run-dir",
                    str(self.run.path), "--models",
                    ",".join(f"{m.name}={m.ready.archive}" for m in models),
                    "--cores", str(len(models[0].ready.cores)), "--max-batch",
                    str(o.max_batch), "--max-batch-delay", str(o.max_batch_delay_ms),
                    "--ts-config", str(conf)]
            if self.core_split:
                argv += ["--core-split", CORE_SPLIT[name]]
            for model, ms in slos.items():
                argv += ["--slo", f"{model}={ms:.1f}"]
            given = [f"{m.name}={Path(o.profiles[m.name]).absolute()}" for m in models
                     if m.name in o.profiles]
            if given:
                argv += ["--profiles", ",".join(given)]
            if not o.calibrate:
                argv.append("--no-calibrate")
            self.tell(f"{self.name}: starting {' '.join(argv[3:6])} ... "
                      f"{' '.join(argv[argv.index('--ts-config') + 2:])}")
            self.log_from = self.log.stat().st_size if self.log.is_file() else 0
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
            self.relay = threading.Thread(target=self._relay, args=(self.proc.stderr,),
                                          daemon=True)
            self.relay.start()

        def _wait_serving(self) -> None:
            def exited() -> Exception:
                self.relay.join(5)
                text = (self.log.read_bytes()[self.log_from:].decode(errors="replace")
                        if self.log.is_file() else "")  # this attempt's lines
                bad = [ln for ln in text.splitlines() if "unrecognized arguments" in ln]
                if self.proc.returncode == 2 and bad:
                    return UnknownFlag(f"packrat serve refused its flags ({bad[-1].strip()})")
                return PackratError(f"{self.name}: packrat serve exited with "
                                    f"{self.proc.returncode}; see {self.log}")

            wait_serving(self.proc, self.run.path, [m.name for m in models], self.name,
                         self.log, exited)

        def watch(self):
            return self._watch()

        def died(self, stopped: bool = False) -> str | None:
            """Why packrat serve is gone before it was stopped (its last error line); None
            while it runs, or once stopped, if it exited cleanly."""
            if self.proc is None or self.proc.poll() is None:
                return None
            if stopped and self.proc.returncode == 0:
                return None
            self.relay.join(5)
            text = (self.log.read_bytes()[self.log_from:].decode(errors="replace")
                    if self.log.is_file() else "")
            errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
            when = ("when stopped (it was on its way out already, or `packrat stop` failed)"
                    if stopped else "during the run")
            return (f"packrat serve exited with {self.proc.returncode} {when}"
                    + (f" ({errors[-1][:300]})" if errors else "") + f"; see {self.log}")

        def status_json(self) -> dict | None:
            from packrat.serving.ops import status

            try:
                return status(self.run.path).to_json()
            except PackratError:
                return None

    ready = models[0].ready
    trace_options = TraceOptions(zoo=ready.zoo, trace="steady", out=ready.out,
                                 cores=len(ready.cores), max_batch=options.max_batch,
                                 max_batch_delay_ms=options.max_batch_delay_ms,
                                 calibrate=options.calibrate,
                                 quiet_wait_s=options.quiet_wait_s)

    class Fallback:
        """overlap on a Packrat without --core-split: plain serve plans the same way."""

        def __init__(self) -> None:
            self.srv = None

        def __enter__(self):
            srv = MultiServed(name, ready, trace_options, tell)
            srv.core_split = True
            try:
                self.srv = srv.__enter__()
            except UnknownFlag as e:
                if name != "overlap" or "--core-split" not in str(e):
                    raise
                tell(f"{name}: {e}; serving without --core-split, which plans each model "
                     "for all the cores: the same overlap")
                srv = MultiServed(name, ready, trace_options, tell)
                srv.core_split = False
                srv.describe = "packrat serve (no --core-split: overlapping plans)"
                self.srv = srv.__enter__()
            return self.srv

        def __exit__(self, *exc) -> None:
            if self.srv is not None:
                self.srv.__exit__(*exc)

    return Fallback()
