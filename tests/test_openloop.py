"""The open-loop generator (packrat.measure.openloop): exact schedules under a fake clock, every
outcome counted, the summaries, and one real run against a loopback HTTP server."""

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests

from packrat.measure.openloop import (
    OpenLoop,
    OpenLoopResult,
    Outcome,
    RequestRecord,
    percentile,
    run_open_loop,
)

OK = SimpleNamespace(status_code=200, text="{}")


class FakeTime:
    """A clock that moves only when the generator sleeps. Before it moves, every request due
    by then (at most `cap` of them) must have been picked up by its worker, so that each reads
    the clock at its scheduled time: the schedule checks are exact."""

    def __init__(self, arrivals, cap=10**9):
        self.arrivals, self.cap = arrivals, cap
        self.now, self.started, self.sleeps = 0.0, 0, []
        self.cond = threading.Condition()
        self.before_move = lambda now: None  # a test's hook, run as the clock is about to move

    def clock(self):
        with self.cond:
            return self.now

    def mark_started(self):
        with self.cond:
            self.started += 1
            self.cond.notify_all()

    def sleep(self, d):
        due = min(sum(a <= self.now for a in self.arrivals), self.cap)
        with self.cond:
            assert self.cond.wait_for(lambda: self.started >= due, timeout=5), "worker stuck"
        self.before_move(self.now)
        with self.cond:
            self.sleeps.append(d)
            self.now += d


def test_requests_are_sent_exactly_on_schedule():
    arrivals = [0.0, 0.5, 0.5, 2.0, 3.25]
    ft = FakeTime(arrivals)

    def send():
        ft.mark_started()
        return OK

    r = run_open_loop(send, arrivals, timeout_s=10, max_in_flight=4, clock=ft.clock,
                      sleep=ft.sleep)
    assert ft.sleeps == [0.5, 1.5, 1.25]  # no sleep for a request due at the same time
    assert [x.scheduled_s for x in r.records] == arrivals
    assert [x.index for x in r.records] == [0, 1, 2, 3, 4]
    assert all(x.start_lag_s == 0 and x.latency_ms == 0 for x in r.records)
    assert (r.count, r.answered, r.failed, r.unanswered, r.dropped) == (5, 5, 0, 0, 0)
    assert r.elapsed_s == 3.25


def test_requests_are_sent_while_earlier_ones_are_unanswered():
    arrivals = [0.0, 1.0, 2.0, 3.0]
    ft = FakeTime(arrivals)
    release = threading.Event()

    def send():
        ft.mark_started()
        if ft.started < 4:
            assert release.wait(5)
        else:
            release.set()  # the last one sent, at 3 s, answers everyone
        return OK

    r = run_open_loop(send, arrivals, timeout_s=10, max_in_flight=8, clock=ft.clock,
                      sleep=ft.sleep)
    assert r.answered == 4
    assert [x.latency_ms for x in r.records] == [3000, 2000, 1000, 0]
    assert [x.start_lag_s for x in r.records] == [0, 0, 0, 0]


def test_a_request_is_dropped_when_every_sender_is_busy():
    arrivals = [0.0, 1.0, 2.0, 3.0, 4.0]
    ft = FakeTime(arrivals, cap=2)
    release, done = threading.Event(), threading.Semaphore(0)

    def send():
        ft.mark_started()
        if ft.clock() < 4:
            assert release.wait(5)
            done.release()
        return OK

    def before_move(now):
        if now == 3:  # requests 2 and 3 were due while 0 and 1 were in flight
            release.set()
            assert done.acquire(timeout=5) and done.acquire(timeout=5)

    ft.before_move = before_move
    loop = OpenLoop(send, arrivals, timeout_s=10, max_in_flight=2, clock=ft.clock,
                    sleep=ft.sleep)
    r = loop.run()
    assert [x.outcome for x in r.records] == [Outcome.ANSWERED, Outcome.ANSWERED,
                                              Outcome.DROPPED, Outcome.DROPPED,
                                              Outcome.ANSWERED]
    assert [x.latency_ms for x in r.records] == [3000, 2000, None, None, 0]
    assert r.records[2].start_lag_s is None and "all 2 senders busy" in r.records[2].detail
    assert r.dropped == 2 and r.slo_attainment(10_000) == pytest.approx(3 / 5)


def test_every_outcome_is_counted():
    arrivals = [0.0, 1.0, 2.0, 3.0]
    ft = FakeTime(arrivals)
    replies = iter([
        lambda: OK,
        lambda: SimpleNamespace(status_code=503, text="Service Unavailable: queue full"),
        lambda: (_ for _ in ()).throw(requests.ConnectionError("refused")),
        lambda: (setattr(ft, "now", ft.now + 2.5), OK)[1],  # answered, but 2.5 s late
    ])

    def send():
        ft.mark_started()
        return next(replies)()

    r = run_open_loop(send, arrivals, timeout_s=2, max_in_flight=1, clock=ft.clock,
                      sleep=ft.sleep)
    assert [x.outcome for x in r.records] == [Outcome.ANSWERED, Outcome.FAILED,
                                              Outcome.UNANSWERED, Outcome.UNANSWERED]
    assert r.records[1].detail == "HTTP 503: Service Unavailable: queue full"
    assert r.records[1].latency_ms == 0
    assert r.records[2].detail == "ConnectionError: refused"
    assert r.records[3].detail == "answered after 2.50 s, past the 2 s timeout"
    assert (r.answered, r.failed, r.unanswered, r.dropped) == (1, 1, 2, 0)
    assert r.slo_attainment(1) == 0.25


def test_a_request_still_in_flight_at_its_deadline_is_unanswered():
    release = threading.Event()

    def send():
        release.wait(5)
        return OK

    try:
        r = run_open_loop(send, [0.0], timeout_s=0.05, max_in_flight=1)
    finally:
        release.set()
    assert r.unanswered == 1
    assert r.records[0].detail == "no answer within the 0.05 s timeout"
    assert r.records[0].start_lag_s is not None and r.records[0].latency_ms is None


def test_a_bug_in_send_is_raised_not_counted():
    def send():
        raise TypeError("predict() got an unexpected keyword argument")

    with pytest.raises(TypeError, match="unexpected keyword"):
        run_open_loop(send, [0.0], timeout_s=1, max_in_flight=1)


def test_stop_ends_the_schedule_early():
    loop = None

    def send():
        loop.stop()  # from the worker thread, while the generator sleeps until 60 s
        return OK

    loop = OpenLoop(send, [0.0, 60.0], timeout_s=1, max_in_flight=1)
    t0 = time.perf_counter()
    r = loop.run()
    assert time.perf_counter() - t0 < 5
    assert r.count == 1 and r.answered == 1  # the request due at 60 s was never due


@pytest.mark.parametrize("kw,message", [
    ({"timeout_s": 0}, "timeout_s"), ({"max_in_flight": 0}, "max_in_flight"),
    ({"arrivals": [1.0, 0.5]}, "non-decreasing"), ({"arrivals": [-1.0]}, ">= 0"),
])
def test_bad_arguments_are_refused(kw, message):
    args = {"arrivals": [0.0], "timeout_s": 1, "max_in_flight": 1} | kw
    with pytest.raises(ValueError, match=message):
        OpenLoop(lambda: OK, args.pop("arrivals"), **args)


# -- summaries


def _result(*records):
    return OpenLoopResult(tuple(records), 10.0, 5.0, 4)


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 99) == 99
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def test_summaries_and_series():
    a, f, u, d = Outcome.ANSWERED, Outcome.FAILED, Outcome.UNANSWERED, Outcome.DROPPED
    r = _result(RequestRecord(0, 0.1, a, 0.0, 10.0), RequestRecord(1, 0.5, a, 0.001, 30.0),
                RequestRecord(2, 1.2, f, 0.0, 5.0, "HTTP 503: x"),
                RequestRecord(3, 1.4, u, 0.002, None, "timeout"),
                RequestRecord(4, 3.3, a, 0.0, 200.0), RequestRecord(5, 3.9, d))
    assert (r.count, r.answered, r.failed, r.unanswered, r.dropped) == (6, 3, 1, 1, 1)
    assert r.mean_ms() == 80 and r.p50_ms() == 30 and r.p99_ms() == pytest.approx(196.6)
    assert r.max_start_lag_s() == 0.002
    assert r.slo_attainment(50) == pytest.approx(2 / 6)
    assert r.slo_attainment(200) == pytest.approx(3 / 6)
    w = r.series(1.0)
    assert [x.start_s for x in w] == [0, 1, 2, 3]
    assert [(x.count, x.answered, x.p50_ms) for x in w] == [
        (2, 2, 20.0), (2, 0, None), (0, 0, None), (2, 1, 200.0)]
    assert len(r.series(1.0, until_s=6)) == 6
    assert r.summary() == ("6 requests: 3 answered (p50 30 ms, p99 197 ms), 1 failed, "
                           "1 unanswered, 1 dropped; max start lag 2 ms")


def test_summaries_of_an_empty_run():
    r = _result()
    assert r.p50_ms() is None and r.mean_ms() is None and r.slo_attainment(1) == 1.0
    assert r.series(1.0) == r.series(1.0)[:1] and r.series(1.0)[0].count == 0
    with pytest.raises(ValueError):
        r.series(0)


# -- real time, against a loopback HTTP server


@pytest.fixture
def slow_server():
    """A server on 127.0.0.1 that holds every request until `hold` of them have arrived (so
    a request is answered only while later ones are in flight), then answers after 20 ms."""
    state = SimpleNamespace(hold=0, arrived=0, cond=threading.Condition())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.cond:
                state.arrived += 1
                state.cond.notify_all()
                held = state.cond.wait_for(lambda: state.arrived >= state.hold, timeout=5)
            time.sleep(0.02)
            self.send_response(200 if held else 500)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/predictions/m"
    yield state
    server.shutdown()
    server.server_close()


def test_open_loop_against_a_loopback_server(slow_server):
    n, gap = 6, 0.05
    slow_server.hold = n  # the first is answered only once all six were sent
    arrivals = [k * gap for k in range(n)]

    def send():
        return requests.post(slow_server.url, data=b"{}", timeout=5)

    r = run_open_loop(send, arrivals, timeout_s=5, max_in_flight=n)
    assert r.answered == n, r.summary()
    assert r.max_start_lag_s() < 0.2, r.summary()  # generous: 2 shared, noisy cores
    first = r.records[0].latency_ms
    assert first >= (n - 1) * gap * 1000 * 0.9, r.summary()  # it waited for the last one


def test_connection_refused_is_unanswered():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    def send():
        return requests.post(f"http://127.0.0.1:{port}/", data=b"{}", timeout=2)

    r = run_open_loop(send, [0.0, 0.01], timeout_s=2, max_in_flight=2)
    assert r.unanswered == 2 and r.records[0].detail.startswith("ConnectionError")
