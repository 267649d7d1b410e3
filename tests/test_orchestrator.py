"""Pinned workers over one region: runs, failures and cleanup on every exit path."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from asirt import histogram, orchestrator
from asirt.errors import WorkerFailed
from asirt.orchestrator import RunSpec, WorkerSpec
from asirt.params import MonitorParams, PingpongParams
from shm_layout import WorkerState

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def pair_spec(transport: str, duration: float = 0.3, role: str = "pingpong") -> RunSpec:
    cpus = sorted(os.sched_getaffinity(0))
    a, b = cpus[0], cpus[-1]
    return RunSpec(workers=[WorkerSpec(a, role, PingpongParams("ping", 1, transport)),
                            WorkerSpec(b, role, PingpongParams("pong", 0, transport))],
                   metrics=["roundtrip"], duration_s=duration, cores=[[0, 1]])


@pytest.mark.parametrize("transport", ["spin", "signal", "sem"])
def test_pingpong_records_round_trips(transport):
    out = orchestrator.run(pair_spec(transport))
    assert out.failures == []
    s = histogram.summarize(out.merged(0))
    assert s.count > 10
    assert s.count == out.slots["samples"][0]     # every sample recorded is counted
    assert 0 < s.min <= s.p50 <= s.p99 <= s.max
    assert list(out.slots["state"]) == [WorkerState.DONE, WorkerState.DONE]
    assert out.slots["cpu"][0] in os.sched_getaffinity(0)


def test_workers_are_pinned_where_asked():
    out = orchestrator.run(pair_spec("spin", 0.2))
    pids = out.slots["pid"]
    assert all(p > 0 for p in pids) and len(set(pids)) == 2


def test_unknown_program_fails_at_startup_by_cpu():
    """A start-up failure is reported in the outcome like one during the run (the caller keeps
    its other entries), not raised."""
    spec = pair_spec("spin", role="no_such_program")
    out = orchestrator.run(spec)
    assert out.failures and all(isinstance(f, WorkerFailed) for f in out.failures)
    f = out.failures[0]
    assert f.cpu in {ws.cpu for ws in spec.workers}
    assert "status 3" in str(f) and "No module named" in f.detail
    assert out.elapsed_s == 0 and out.merged(0).sum() == 0    # the run never started


def test_unpinnable_cpu_is_reported_as_cannot_pin():
    spec = pair_spec("spin")
    bad = WorkerSpec(9999, spec.workers[1].role, spec.workers[1].params)
    out = orchestrator.run(RunSpec(workers=[spec.workers[0], bad], metrics=spec.metrics,
                                   duration_s=spec.duration_s, cores=spec.cores))
    (f,) = out.failures
    assert f.cpu == 9999 and "status 4" in f.status     # EXIT_PIN, not a traceback (status 1)
    assert "cannot pin" in f.detail and "9999" in f.detail


def test_startup_timeout_is_a_worker_failure(monkeypatch):
    monkeypatch.setattr(orchestrator, "STARTUP_TIMEOUT_S", 0.01)
    spec = pair_spec("spin")
    out = orchestrator.run(spec)
    assert {f.cpu for f in out.failures} == {ws.cpu for ws in spec.workers}
    assert all("did not become ready" in f.status for f in out.failures)
    assert out.elapsed_s == 0


def test_killed_worker_is_reported_and_results_kept():
    spec = pair_spec("spin", duration=30)
    killed = threading.Event()

    def kill_pong(fraction, slots):
        if not killed.is_set() and slots["samples"][0] > 0 or fraction > 0.05:
            if not killed.is_set():
                os.kill(int(slots["pid"][1]), signal.SIGKILL)
                killed.set()

    t0 = time.monotonic()
    out = orchestrator.run(spec, kill_pong)
    assert killed.is_set()
    assert time.monotonic() - t0 < 25, "a dead peer must end the run, not be waited for"
    assert len(out.failures) == 1
    f = out.failures[0]
    assert f.cpu == spec.workers[1].cpu and "SIGKILL" in f.status
    assert out.merged(0).sum() > 0          # the ping side's samples survive


def test_stopped_worker_is_killed_and_reported():
    spec = pair_spec("sem", duration=0.5)
    stopped = []

    def stop_pong(fraction, slots):
        if not stopped:
            os.kill(int(slots["pid"][1]), signal.SIGSTOP)
            stopped.append(int(slots["pid"][1]))

    out = orchestrator.run(spec, stop_pong)
    assert stopped
    assert any(f.cpu == spec.workers[1].cpu and "did not stop" in f.status for f in out.failures)


def test_duration_must_be_positive():
    with pytest.raises(Exception, match="duration"):
        orchestrator.run(pair_spec("spin", duration=0))


@pytest.mark.parametrize("transport", ["spin", "signal", "sem"])
def test_two_workers_on_one_cpu_do_not_live_lock(transport):
    """Workers outnumbering CPUs: the spin waits yield, so round trips still complete."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    out = orchestrator.run(RunSpec(
        workers=[WorkerSpec(cpu, "pingpong", PingpongParams("ping", 1, transport)),
                 WorkerSpec(cpu, "pingpong", PingpongParams("pong", 0, transport))],
        metrics=["roundtrip"], duration_s=0.5, cores=[[0, 1]]))
    assert out.failures == []
    assert histogram.summarize(out.merged(0)).count > 10


def test_deferred_interrupts_take_the_signal_after_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with orchestrator.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)       # the handler has run by now: it must not have raised
            done.append(True)
    assert done == [True]
    with orchestrator.deferred_interrupts():
        pass                        # nothing caught: nothing raised


def test_oversubscribed_is_decided_from_the_workers_of_the_run():
    cpus = sorted(os.sched_getaffinity(0))

    def spin(cpu: int) -> WorkerSpec:
        return WorkerSpec(cpu, "pingpong", PingpongParams("ping", 1))

    assert orchestrator.oversubscribed([spin(cpus[0]), spin(cpus[0])])       # two on one CPU
    assert orchestrator.oversubscribed([spin(c) for c in cpus] + [spin(cpus[0])])
    sampler = WorkerSpec(cpus[0], "monitor", MonitorParams(((0,),)), spins=False)
    assert not orchestrator.oversubscribed([spin(cpus[0]), sampler])          # it sleeps
    if len(cpus) >= 2:
        assert not orchestrator.oversubscribed([spin(cpus[0]), spin(cpus[1])])


def test_sem_ping_sees_whether_the_target_sleeps():
    """The sem transport times wake-ups only if it can tell a sleeping target from a running
    one (workers.pingpong._asleep reads /proc/PID/stat through asirt.proc)."""
    import subprocess
    import sys

    from workers.pingpong import _asleep
    sleeper = subprocess.Popen(["sleep", "30"])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        asleep, busy = _asleep(sleeper.pid), _asleep(spinner.pid)
        while not asleep() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert asleep()
        assert sum(not busy() for _ in range(50)) > 0     # running or runnable, not S
    finally:
        for p in (sleeper, spinner):
            p.kill()
            p.wait()
