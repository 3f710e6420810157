"""The worker queue: one job at a time, supersede by key, cancel while queued, close."""
from __future__ import annotations

import threading
import time

import pytest

from stablelm_lsp.inference.errors import EngineClosed
from stablelm_lsp.inference.scheduler import Job, Scheduler


@pytest.fixture
def scheduler():
    s = Scheduler()
    yield s
    s.close()


def dropped(reason: str) -> str:
    return reason


def blocking_job(release: threading.Event, started: threading.Event):
    """A job that runs until released or told to stop, like a decode loop."""
    def run(job: Job) -> str:
        started.set()
        while not release.wait(0.005):
            if job.stop_reason():
                return job.stop_reason()
        return "done"
    return run


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def test_jobs_run_on_one_worker_thread_in_order(scheduler):
    threads = []
    results = [scheduler.run(lambda job, i=i: (threads.append(threading.current_thread()), i)[1],
                             dropped) for i in range(3)]
    assert results == [0, 1, 2]
    assert len(set(threads)) == 1 and threads[0] is not threading.current_thread()


def test_newer_request_supersedes_the_running_one(scheduler):
    release, started = threading.Event(), threading.Event()
    t1, out1 = in_thread(lambda: scheduler.run(blocking_job(release, started), dropped, key="doc"))
    assert started.wait(5)
    assert scheduler.run(lambda job: "new", dropped, key="doc") == "new"
    t1.join(5)
    assert out1 == ["superseded"]


def test_newer_request_supersedes_a_queued_one_at_once(scheduler):
    release, started = threading.Event(), threading.Event()
    t_busy, out_busy = in_thread(lambda: scheduler.run(blocking_job(release, started), dropped, key="a"))
    assert started.wait(5)
    ran = []
    t_old, out_old = in_thread(lambda: scheduler.run(lambda job: ran.append("old"), dropped, key="b"))
    wait_until(lambda: scheduler.pending == 2)
    t_new, out_new = in_thread(lambda: scheduler.run(lambda job: "new", dropped, key="b"))
    t_old.join(5)
    assert out_old == ["superseded"] and not ran  # answered while "a" still runs
    assert t_busy.is_alive()
    release.set()
    for t in (t_busy, t_new):
        t.join(5)
    assert out_busy == ["done"] and out_new == ["new"]


def test_other_keys_do_not_supersede(scheduler):
    release, started = threading.Event(), threading.Event()
    t1, out1 = in_thread(lambda: scheduler.run(blocking_job(release, started), dropped, key="a"))
    assert started.wait(5)
    t2, out2 = in_thread(lambda: scheduler.run(lambda job: "b", dropped, key="b"))
    t3, out3 = in_thread(lambda: scheduler.run(lambda job: "none", dropped))
    wait_until(lambda: scheduler.pending == 3)
    release.set()
    for t in (t1, t2, t3):
        t.join(5)
    assert (out1, out2, out3) == (["done"], ["b"], ["none"])


def test_cancel_while_queued_answers_without_running(scheduler):
    release, started = threading.Event(), threading.Event()
    t1, _ = in_thread(lambda: scheduler.run(blocking_job(release, started), dropped))
    assert started.wait(5)
    cancel, ran = threading.Event(), []
    t2, out2 = in_thread(lambda: scheduler.run(lambda job: ran.append(1), dropped, cancel=cancel))
    wait_until(lambda: scheduler.pending == 2)
    cancel.set()
    t2.join(5)
    assert out2 == ["cancelled"] and not ran and t1.is_alive()
    release.set()
    t1.join(5)


def test_exceptions_reach_the_caller_and_the_worker_lives_on(scheduler):
    def boom(job):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        scheduler.run(boom, dropped)
    assert scheduler.run(lambda job: "ok", dropped) == "ok"


def test_close_stops_the_running_job_and_refuses_new_ones():
    s = Scheduler()
    release, started = threading.Event(), threading.Event()
    t1, out1 = in_thread(lambda: s.run(blocking_job(release, started), dropped))
    assert started.wait(5)
    s.close()
    t1.join(5)
    assert out1 == ["cancelled"]
    with pytest.raises(EngineClosed):
        s.run(lambda job: None, dropped)


def test_urgent_jobs_run_inside_a_less_urgent_one_between_its_steps(scheduler):
    events: list[str] = []
    urgent_queued = threading.Event()

    def slow(job: Job) -> str:             # like a chat reply: yields between steps
        for step in range(6):
            events.append(f"slow {step}")
            if step == 2:
                urgent_queued.wait(5)
            scheduler.run_urgent(job)
        return "slow done"

    def quick(name: str):
        def run(job: Job) -> str:
            events.append(name)
            return name
        return run

    t_slow, slow_out = in_thread(lambda: scheduler.run(slow, dropped, priority=1))
    while "slow 2" not in events:
        time.sleep(0.001)
    # a less urgent job queued too: it waits for the slow one, the urgent one does not
    later = scheduler.submit(quick("later"), dropped, priority=1)
    urgent = scheduler.submit(quick("urgent"), dropped, priority=0)
    urgent_queued.set()
    assert urgent.future.result(5) == "urgent"
    t_slow.join(5)
    assert later.future.result(5) == "later"
    assert slow_out == ["slow done"]
    assert events == ["slow 0", "slow 1", "slow 2", "urgent", "slow 3", "slow 4", "slow 5", "later"]


def test_a_paused_job_is_still_superseded_and_cancelled(scheduler):
    def outer(job: Job) -> str:
        while not job.stop_reason():
            scheduler.run_urgent(job)
            time.sleep(0.002)
        return job.stop_reason()

    def inner(job: Job) -> str:
        # while the outer job is paused here, a newer request for its key arrives
        scheduler.submit(lambda j: "newer", dropped, key="doc", priority=1)
        return "inner"

    t, out = in_thread(lambda: scheduler.run(outer, dropped, key="doc", priority=1))
    time.sleep(0.01)
    assert scheduler.submit(inner, dropped, priority=0).future.result(5) == "inner"
    t.join(5)
    assert out == ["superseded"]
