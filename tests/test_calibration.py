"""Calibration: the pure scaling (it flips ResNet-50's plan for B = 8 the way serving
measured it) and calibrate() through a real TorchServe."""

import itertools

import pytest

from packrat.core.calibration import (
    Calibration,
    CalibrationPoint,
    calibration_batch,
    scale_profile,
)
from packrat.core.optimizer import Optimizer
from packrat.core.policy import plan_for_batch
from packrat.core.profile import Profile, ProfilePoint, write_profile
from packrat.measure.cpus import usable_cores
from packrat.model.archive import build_zoo_archive, extract_archive
from packrat.model.sample import Sample
from packrat.serving.calibrate import (
    cached_calibration,
    calibrate,
    calibrated_profile,
    calibration_path,
    calibration_sizes,
    load_calibration,
    save_calibration,
)
from packrat.serving.rundir import RunDir
from packrat.torchserve import (
    Ports,
    ServerSettings,
    TorchServeClient,
    find_server,
    start_server,
    stop_server,
)
from tests.conftest import TORCHSERVE, has_torchserve, require

# ResNet-50 on the 2-core VM, measured in isolation (packrat profile, 2026-11-23)
RESNET_2CORE = Profile(tuple(ProfilePoint(t, b, ms) for t, b, ms in [
    (1, 1, 118.38), (1, 2, 253.75), (1, 4, 547.70), (1, 8, 1069.01), (1, 16, 2780.17),
    (2, 1, 69.93), (2, 2, 135.18), (2, 4, 302.19), (2, 8, 536.33), (2, 16, 1458.16),
]))
# what `packrat bench` measured through TorchServe for the two plans of B = 8
SERVED = Calibration((CalibrationPoint(2, 1, 8, 536.33, 656.5),
                      CalibrationPoint(1, 2, 4, 547.70, 578.1)))


def test_scale_profile_multiplies_each_row_by_its_scale():
    scaled = scale_profile(RESNET_2CORE, SERVED)
    t = scaled.table()
    assert t[2][8] == pytest.approx(656.5)
    assert t[1][4] == pytest.approx(578.1)
    assert t[2][1] == pytest.approx(69.93 * 656.5 / 536.33)
    assert t[1][16] == pytest.approx(2780.17 * 578.1 / 547.70)
    one_row = Calibration((SERVED.points[0],))
    assert scale_profile(RESNET_2CORE, one_row).table()[1] == RESNET_2CORE.table()[1]


def test_scale_interpolates_in_log_batch_between_calibrated_batches():
    two = Calibration((CalibrationPoint(2, 1, 8, 100.0, 140.0), CalibrationPoint(2, 1, 1, 10.0, 11.0)))
    assert two.scale(2, 1) == pytest.approx(1.1)
    assert two.scale(2, 8) == pytest.approx(1.4)
    assert two.scale(2, 2) == pytest.approx(1.2)   # a third of the way in log2
    assert two.scale(2, 4) == pytest.approx(1.3)
    assert two.scale(2, 16) == pytest.approx(1.4)  # the nearest outside
    assert two.scale(1, 4) is None
    assert two.describe() == "t=2: x1.10 at b=1, x1.40 at b=8"
    table = scale_profile(RESNET_2CORE, two).table()
    assert table[2][2] == pytest.approx(135.18 * 1.2) and table[1] == RESNET_2CORE.table()[1]


def test_calibration_flips_resnet_plan_for_b8_to_what_serving_measured():
    raw = plan_for_batch(Optimizer(RESNET_2CORE, 2), "r", "1", 8, (0, 1))
    assert raw.describe() == "1x<t=2,b=8>"  # 536 ms predicted, 656 served
    cal = plan_for_batch(Optimizer(scale_profile(RESNET_2CORE, SERVED), 2), "r", "1", 8, (0, 1))
    assert cal.describe() == "2x<t=1,b=4>"  # 578 ms served: the measured oracle
    assert cal.predicted_ms == pytest.approx(578.1)


def test_calibration_batch_sizes_plans_for_the_target():
    assert calibration_batch(RESNET_2CORE, 2, 1, 8) == 8
    assert calibration_batch(RESNET_2CORE, 1, 2, 8) == 4
    assert calibration_batch(RESNET_2CORE, 1, 2, 1) == 1   # at least one per instance
    sparse = Profile((ProfilePoint(1, 4, 1.0), ProfilePoint(1, 8, 2.0)))
    assert calibration_batch(sparse, 1, 16, 16) == 4       # the row's smallest batch


def test_calibration_round_trip(tmp_path):
    path = calibration_path(tmp_path / "m-abc.csv", 2, 10, 8)
    assert path.name == "m-abc.calibration-n2-d10-b8.json"
    assert load_calibration(path) is None
    save_calibration(SERVED, path)
    assert load_calibration(path) == SERVED
    assert SERVED.describe() == "t=2: x1.22 at b=8; t=1: x1.06 at b=4"
    path.write_text("{not json")
    assert load_calibration(path) is None  # a corrupt cache is measured again


def test_calibrated_profile_reads_the_cache_without_torchserve(tmp_path):
    profile_path = tmp_path / "resnet.csv"
    write_profile(RESNET_2CORE, profile_path)
    path = calibration_path(profile_path, 2, 10, 8)
    full = Calibration(SERVED.points + (CalibrationPoint(2, 1, 1, 69.93, 80.0),
                                        CalibrationPoint(1, 2, 1, 118.38, 125.0)))
    save_calibration(full, path)
    found = calibrated_profile(None, None, tmp_path, "r", profile_path, (0, 1), b"{}",
                               iter(()), max_batch_delay_ms=10)  # nothing to serve or measure
    assert found.cached and found.path == path and found.calibration == full
    assert found.optimizer.latency(2, 8) == pytest.approx(656.5)
    save_calibration(SERVED, path)  # an older Packrat's, without every point: measured again
    assert cached_calibration(profile_path, 2, 10) is None


def test_calibration_serves_each_rows_batch_of_most_throughput():
    # ResNet-50's 2-core profile (2026-11-29): per image, t=1 is cheapest at b=8 (2x<t=1,b=8>
    # the plan of most capacity), t=2 at b=2; neither is the row's smallest or sized for B=8
    table = {1: {1: 116.0, 2: 236.5, 4: 480.6, 8: 869.0, 16: 2261.5, 32: 5463.4},
             2: {1: 58.0, 2: 112.3, 4: 244.1, 8: 476.4, 16: 1245.4, 32: 3123.5}}
    profile = Profile(tuple(ProfilePoint(t, b, ms) for t, row in table.items()
                            for b, ms in row.items()))
    assert calibration_sizes(profile, 2, 8) == [(2, 8), (2, 1), (2, 2), (1, 4), (1, 1), (1, 8)]
    assert calibration_sizes(RESNET_2CORE, 2, 8) == [(2, 8), (2, 1), (1, 4), (1, 1)]
    linear = Profile(tuple(ProfilePoint(t, b, b / t) for t in (1, 2) for b in (1, 2, 4, 8)))
    assert calibration_sizes(linear, 2, 8) == [(2, 8), (2, 1), (1, 4), (1, 1)]  # ties: smallest


@pytest.mark.integration
@require(has_torchserve(), TORCHSERVE)
@require(len(usable_cores()) >= 2, "2 usable cores")
def test_calibrate_through_torchserve(tmp_path):
    cores = tuple(usable_cores()[:2])
    run = RunDir(tmp_path / "run").create()
    mar = build_zoo_archive("small-cnn", tmp_path / "archives").mar_path
    body = (tmp_path / "archives" / "small-cnn.example.json").read_bytes()
    base = extract_archive(mar, run.path / "archives" / "small-cnn")
    profile = Profile(tuple(ProfilePoint(t, b, 1.0 * b / t) for t in (1, 2) for b in (1, 2, 4, 8)))
    settings = ServerSettings(workdir=run.torchserve, model_store=run.model_store,
                              ports=Ports.free())
    server = start_server(settings)
    try:
        client = TorchServeClient(settings)
        versions = (str(k) for k in itertools.count(1))
        said = []
        cal = calibrate(run, client, base, "small-cnn", profile, cores,
                        Sample(body, "application/json"), versions,
                        min_seconds=1.0, say=said.append)
        assert [(p.threads, p.instances, p.batch) for p in cal.points] == [
            (2, 1, 8), (2, 1, 1), (1, 2, 4), (1, 2, 1)]
        assert all(p.served_ms > 0 and p.profiled_ms == profile.table()[p.threads][p.batch]
                   for p in cal.points)
        assert any("served in" in s for s in said)
        assert client.versions("small-cnn") == ()  # every calibration version is deleted
        assert not any(run.model_store.iterdir())
        scaled = scale_profile(profile, cal)
        assert scaled.table()[2][8] == pytest.approx(cal.points[0].served_ms)
        assert scaled.table()[2][1] == pytest.approx(cal.points[1].served_ms)
    finally:
        stop_server(server)
    assert find_server(run.torchserve) is None
