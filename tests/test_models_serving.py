"""Several models on one core budget, on a real TorchServe (`packrat serve --cores 2` with two
models, --core-split auto): A busy and B idle gives A both cores and B one 1-thread worker on
the shared core, which still answers; B busy and A idle the opposite; both busy, one core
each. A watcher reads every worker's affinity from /proc meanwhile: no two models' dedicated
workers ever share a core. Nothing is lost; bad --slo input is a one-line error."""

import threading
import time

import pytest

from packrat.measure.loadgen import ClosedLoop
from packrat.model.archive import build_zoo_archive
from packrat.serving.ops import cpus_allowed
from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings
from tests.conftest import TORCHSERVE, has_torchserve, require_now
from tests.serving import (
    CORES,
    N_SERVE,
    PROFILE,
    SERVE_CORES,
    packrat,
    start_serve,
    status,
    stop_serve,
    wait_answered,
    wait_for,
)

pytestmark = pytest.mark.integration


class CoreWatch:
    """Samples, until stopped, which model's dedicated workers run on which core (from the
    workers' /proc affinity, every version registered or draining) and records any core two
    models held at once. The shared idle worker is the documented exception."""

    def __init__(self, run, models):
        self.run, self.models = RunDir(run), models
        self.clashes: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            held: dict[int, str] = {}
            for model in self.models:
                for vdir in self.run.model_store.glob(f"{model}-v*"):
                    version = vdir.name.rsplit("-v", 1)[1]
                    plan = self.run.read_plan(model, version)
                    if plan is None or plan.shared:
                        continue
                    for pid in self.run.slot_pids(model, version).values():
                        for core in cpus_allowed(pid):
                            other = held.setdefault(core, model)
                            if other != model:
                                self.clashes.append(f"core {core}: {other} and {model} "
                                                    f"(version {version}, pid {pid})")
            self.samples += 1
            time.sleep(0.1)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)


def _cores(st, model):
    m = st["models"][model]
    return "shared" if m["shared"] else tuple(m["cores"])


def _settled(run, want):
    """status once every model's cores are as wanted and no switch is under way."""
    st = status(run)
    ok = all(_cores(st, name) == cores for name, cores in want.items()) and not any(
        m["switching"] for m in st["models"].values())
    return st if ok else None


def test_cores_follow_the_load_between_two_models_and_never_overlap(tmp_path):
    require_now(has_torchserve(), TORCHSERVE)
    require_now(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")
    mar = build_zoo_archive("small-cnn", tmp_path / "archives").mar_path
    example = (tmp_path / "archives" / "small-cnn.example.json").read_bytes()
    profile = tmp_path / "small.csv"
    profile.write_text(PROFILE)
    run = tmp_path / "run"
    proc = start_serve(run, "b", "--models", f"a={mar},b={mar}", "--profiles",
                       f"a={profile},b={profile}", "--interval", "0.5", "--cores", N_SERVE,
                       "--standby-memory", 0, "--slo", "a=500", log=tmp_path / "serve.log",
                       timeout=120)
    watch = CoreWatch(run, ("a", "b"))
    client = TorchServeClient(load_settings(RunDir(run).torchserve))
    loads = {}
    try:
        first = status(run)
        assert first["core_split"] == "auto" and first["models"]["a"]["slo_ms"] == 500
        # no traffic yet: neither model holds a core of its own
        wait_for(lambda: _settled(run, {"a": "shared", "b": "shared"}), timeout=60,
                 what="both idle models on the shared core")

        def loaded(model):
            return ClosedLoop(lambda: client.predict(model, example, timeout_s=60), timeout_s=60)

        # A busy, B idle: A gets both cores, B a 1-thread worker on the shared core
        loads["a"] = loaded("a")
        loads["a"].set_concurrency(4)
        st = wait_for(lambda: _settled(run, {"a": tuple(SERVE_CORES), "b": "shared"}),
                      timeout=120, what="a to get both cores and b the shared one")
        b = st["models"]["b"]
        assert [(i["threads"], i["cores"]) for i in b["plan"]["instances"]] == [
            (1, [st["allocation"]["shared_core"]])]
        assert "a busy" in st["allocation"]["reason"] and st["allocation"]["inputs"]["a"]["rate_rps"] > 0
        assert st["models"]["a"]["slo_met"] is True
        # the idle model answers from its shared core
        assert client.predict("b", example, timeout_s=60)
        # B busy, A idle: the opposite
        loads["a"].set_concurrency(0)
        loads["b"] = loaded("b")
        loads["b"].set_concurrency(4)
        wait_for(lambda: _settled(run, {"a": "shared", "b": tuple(SERVE_CORES)}), timeout=120,
                 what="b to get both cores and a the shared one")
        # both busy: one core each
        loads["a"].set_concurrency(4)
        st = wait_for(lambda: (lambda s: s if s and "shared" not in (_cores(s, "a"), _cores(s, "b"))
                               and len(_cores(s, "a")) == len(_cores(s, "b")) == 1 else None)(
                                   _settled(run, {})), timeout=120, what="one core each")
        for model in ("a", "b"):
            wait_answered(loads[model], loads[model].result.answered + 20)
        log = (tmp_path / "serve.log").read_text()
        assert "reallocating" in (RunDir(run).log_file.read_text()), log[-2000:]
    finally:
        results = {name: load.stop() for name, load in loads.items()}
        watch.stop()
        stop_serve(proc, run)
    assert watch.samples > 50 and watch.clashes == [], watch.clashes[:5]
    for name, r in results.items():
        assert r.failures == [] and r.unanswered == [], (name, r.failures[:3], r.unanswered[:3])


def test_bad_slo_input_is_a_one_line_error(tmp_path):
    mar = build_zoo_archive("small-cnn", tmp_path / "archives").mar_path
    for slo, said in (("c=100", "--slo names models not in --models: c"),
                      ("a=-5", "--slo a=-5: the SLO must be a positive number of ms"),
                      ("a=fast", "--slo a=fast: the SLO must be a positive number of ms"),
                      ("a", "--slo: 'a' is not NAME=MS")):
        out = packrat("serve", "--run-dir", tmp_path / "run", "--models", f"a={mar},b={mar}",
                      "--slo", slo)
        assert out.returncode != 0 and said in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
