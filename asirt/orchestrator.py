"""Spawn pinned workers over one region, release them together, supervise, stop, collect.

Parent owns, children attach: the orchestrator creates the region and every semaphore and
is the only one that unlinks them, on every exit path (normal end, exception, Ctrl-C or
SIGTERM, a worker that crashes or is killed). Each child runs inside a kill-and-reap guard.
A worker that dies, at start-up or during the run, is reported by CPU and exit status in
the outcome's ``failures`` (so is one that never becomes ready); what the others recorded is
kept.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import psutil

from asirt import cpu as cpu_layer
from asirt import histogram
from asirt.errors import AsirtError, WorkerFailed
from asirt.params import encode
from shm_layout import Region, RegionState, Section, WorkerState, reclaim
from shm_layout.header import START_NS_WORD, STOP_WORD
from shm_layout.sections import MAX_SIBLINGS

# Both bounds count from the last progress of *any* worker, not from the first spawn or the
# stop: hundreds of workers oversubscribing two CPUs start and stop one after another, so a
# fixed bound on the whole would fail a large run that is merely slow, however healthy.
STARTUP_TIMEOUT_S = 60.0   # no worker became ready for this long (python start + imports)
STOP_GRACE_S = 5.0         # after stop: no worker exited for this long (notice, record, exit)
POLL_S = 0.05
#: how often, while workers start, the parent looks for one that exited (a look costs a
#: waitpid per worker: every 10 ms it would grow with the workers times the start-up's length)
STARTUP_CHECK_S = 0.25
#: workers starting at once, per CPU this process may use (the rest wait for their turn)
START_WINDOW_PER_CPU = 4
#: a worker does no bulk numpy work: one BLAS thread, not one per CPU (creating those was half
#: of a worker's start-up, and hundreds of workers would hold thousands of idle threads)
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class WorkerSpec:
    cpu: int
    role: str
    params: Any             # the role's parameter dataclass (asirt.params)
    spins: bool = True      # busy-waits; False for a sampler that sleeps between samples


@dataclass(frozen=True)
class RunSpec:
    """One run: workers (slot i = workers[i]), the metrics each records, how long."""
    workers: Sequence[WorkerSpec]
    metrics: Sequence[str]
    duration_s: float
    cores: Sequence[Sequence[int]] = ()          # slot indices per (pseudo-)core
    emulated: bool = False
    l1d_bytes: int = 0
    extra_sections: Sequence[Section] = ()
    #: parent-side setup before workers start (the CPU sections are set up already)
    init: Callable[[Region], None] | None = None
    #: stop early once every worker whose role is listed here is DONE (or failed)
    finish_when_done: Sequence[str] = ()
    #: parent-side read of the region after the workers stopped, before it is unlinked;
    #: what it returns is RunOutcome.collected
    collect: Callable[[Region], Any] | None = None
    #: a worker that fails does not end the run (fault injection: the others must notice)
    keep_going: bool = False


@dataclass
class RunOutcome:
    hists: np.ndarray            # (nworkers, nmetrics, HIST_BUCKETS) int64 counts, copied out
    slots: np.ndarray            # copy of the slots section at the end
    failures: list[WorkerFailed]
    elapsed_s: float
    collected: Any = None        # what RunSpec.collect returned
    startup_s: float = 0.0       # from the first spawn until the start barrier opened
    stop_s: float = 0.0          # from the stop request until every worker had exited
    region_bytes: int = 0        # the shared region's size

    def merged(self, metric_index: int, workers: Sequence[int] | None = None) -> np.ndarray:
        rows = self.hists[:, metric_index] if workers is None else self.hists[list(workers), metric_index]
        return histogram.merge(rows)


Progress = Callable[[float, np.ndarray], None]   # (fraction done, slots view)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run a block that must not be torn half-way by Ctrl-C or SIGTERM; a signal that arrives
    is noted and raised as KeyboardInterrupt (the CLI's cleanup path) once the block is done.

    Python-level handlers, not a signal mask: numpy's BLAS threads leave the signals
    unblocked, so the kernel may deliver them there and a mask on this thread holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield        # only the main thread receives Python signal handlers
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


class _Children:
    """The kill-and-reap guard: every child spawned is killed and reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen:
        log = tempfile.TemporaryFile()
        self.logs.append(log)
        # A Ctrl-C inside Popen (which waits for the exec) would leave a child we never
        # learn about: take it only once the child is in our list.
        with deferred_interrupts():
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    close_fds=True, env={**os.environ, **WORKER_ENV})
            self.procs.append(proc)
        return proc

    def stderr_tail(self, i: int, lines: int = 3) -> str:
        log = self.logs[i]
        log.seek(0)
        text = log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed child in D state
                pass

    def close(self) -> None:
        self.kill_all()
        for log in self.logs:
            log.close()


def _sections(spec: RunSpec) -> list[Section]:
    n, m, k = len(spec.workers), len(spec.metrics), max(len(spec.cores), 1)
    return [Section("slots", n), Section("cores", k), Section("metrics", m),
            Section("hist", n * m), *cpu_layer.sections(n, k), *spec.extra_sections]


def _fill(region: Region, spec: RunSpec) -> None:
    slots = region.array("slots")
    for i, ws in enumerate(spec.workers):
        slots[i]["cpu"] = ws.cpu
    cores = region.array("cores")
    for i, core in enumerate(spec.cores):
        if len(core) > MAX_SIBLINGS:
            raise AsirtError(f"core {i} has {len(core)} siblings; at most {MAX_SIBLINGS} fit")
        cores[i]["core"] = i
        cores[i]["nsiblings"] = len(core)
        cores[i]["cpus"] = list(core) + [-1] * (MAX_SIBLINGS - len(core))
        cores[i]["emulated"] = int(spec.emulated)
        cores[i]["l1d_bytes"] = spec.l1d_bytes
    metrics = region.array("metrics")
    for i, name in enumerate(spec.metrics):
        metrics[i]["name"] = name.encode()
        metrics[i]["unit"] = b"ns"
    cpu_layer.setup(region)


def _worker_argv(region: Region, slot: int, ws: WorkerSpec, over: bool) -> list[str]:
    argv = [sys.executable, "-m", "workers", "--cpu", str(ws.cpu), "--slot", str(slot),
            "--region", region.name, "--role", ws.role, "--params", encode(ws.params),
            "--parent", str(os.getpid())]
    return argv + ["--oversubscribed"] if over else argv


def _describe_exit(proc: subprocess.Popen) -> str:
    rc = proc.returncode
    if rc is not None and rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def run(spec: RunSpec, progress: Progress | None = None) -> RunOutcome:
    """Run the workers of ``spec`` for ``spec.duration_s`` seconds and collect their histograms.

    Worker failures do not raise: they are in the outcome's ``failures`` (a start-up failure
    means the run never started: ``elapsed_s`` 0, empty histograms).
    """
    if spec.duration_s <= 0:
        raise AsirtError(f"duration must be positive, got {spec.duration_s}")
    reclaim()  # segments and semaphores of earlier runs whose creator died
    children = _Children()
    region = Region.create(_sections(spec))
    failures: list[WorkerFailed] = []
    reported: set[int] = set()
    started: float | None = None      # when the start barrier opened; None: it never did
    startup = 0.0
    try:
        _fill(region, spec)
        start = region.semaphore("start")
        for slot in range(len(spec.workers)):
            region.semaphore(f"wake{slot}")
        if spec.init is not None:
            spec.init(region)
        over = oversubscribed(spec.workers)
        nworkers = len(spec.workers)
        window = START_WINDOW_PER_CPU * len(os.sched_getaffinity(0))
        spawned = time.monotonic()
        w = region.words
        state_words = [region.word_index("slots", i, "state") for i in range(len(spec.workers))]

        def check_children() -> None:
            for i, proc in enumerate(children.procs):
                if i in reported:
                    continue
                if proc.poll() is not None and (proc.returncode != 0 or
                                                w[state_words[i]] != WorkerState.DONE):
                    reported.add(i)
                    failures.append(_failed(spec, i, _describe_exit(proc),
                                            children.stderr_tail(i)))

        # Every worker pinned, attached and waiting on the barrier, or one failed. A failure
        # here ends the run like one during it (stop, collect, return it in the outcome), so
        # the caller reports this entry as failed and keeps the others. Workers are spawned
        # a window at a time: hundreds started at once would all import together, none ready
        # before all are, so the start-up bound would measure the whole crowd.
        states = region.array("slots")["state"]
        ready, last_ready = 0, time.monotonic()
        next_check = 0.0
        while not failures:
            now = time.monotonic()
            n = int((states == WorkerState.READY).sum())
            if n == nworkers:
                break
            if n > ready:
                ready, last_ready = n, now
            while len(children.procs) < min(nworkers, n + window):
                slot = len(children.procs)
                children.spawn(_worker_argv(region, slot, spec.workers[slot], over))
            if now >= next_check:
                check_children()
                next_check = now + STARTUP_CHECK_S
            if not failures and now - last_ready > STARTUP_TIMEOUT_S:
                for i in range(len(children.procs)):
                    if w[state_words[i]] != WorkerState.READY and i not in reported:
                        reported.add(i)
                        failures.append(_failed(
                            spec, i, f"did not become ready ({ready} of {len(state_words)} "
                            f"workers did, none in the last {STARTUP_TIMEOUT_S:.0f}s)",
                            f"{_liveness(children.procs[i].pid)}; is the machine overloaded?"))
            else:
                time.sleep(0.01)
        if not failures:
            region.set_state(RegionState.RUNNING)
            w[START_NS_WORD] = time.perf_counter_ns()
            started = time.monotonic()
            startup = started - spawned
            for _ in spec.workers:
                start.release()
            _supervise(spec, region, state_words, started, failures, reported, check_children,
                       progress)
    finally:
        # Cleanup must finish even if another Ctrl-C arrives: it is taken afterwards.
        with deferred_interrupts():
            try:
                elapsed = 0.0 if started is None else time.monotonic() - started
                outcome = _stop_and_collect(region, spec, children, failures, reported, elapsed,
                                            ran=started is not None)
                outcome.startup_s = startup
                outcome.region_bytes = len(region.words) * 8
            finally:
                children.close()
                region.close()
                region.unlink()
    return outcome


def _supervise(spec: RunSpec, region: Region, state_words: list[int], started: float,
               failures: list[WorkerFailed], reported: set[int],
               check_children: Callable[[], None], progress: Progress | None) -> None:
    """Wait out the run: its duration, a failure (unless keep_going), or every finisher DONE."""
    w = region.words
    end = started + spec.duration_s
    finishers = [i for i, ws in enumerate(spec.workers) if ws.role in spec.finish_when_done]
    while True:
        now = time.monotonic()
        check_children()
        if (failures and not spec.keep_going) or now >= end:
            return
        if finishers and all(w[state_words[i]] == WorkerState.DONE or i in reported
                             for i in finishers):
            return
        if progress is not None:
            progress(min(1.0, (now - started) / spec.duration_s), region.array("slots"))
        time.sleep(POLL_S)


def _stop_and_collect(region: Region, spec: RunSpec, children: _Children,
                      failures: list[WorkerFailed], reported: set[int],
                      elapsed: float, ran: bool = True) -> RunOutcome:
    """Ask every worker to stop, wait while they keep exiting (until none has for
    STOP_GRACE_S), kill the rest, copy results out.

    ``ran`` False: the start barrier never opened (a worker failed at start-up). Workers
    still starting then end however the stop finds them (an attach after it is refused,
    exit 5); that is our doing, not theirs, so only the failures seen before are reported.
    """
    w = region.words
    w[STOP_WORD] = 1
    region.set_state(RegionState.STOPPING)
    start = region.semaphore("start")
    for _ in spec.workers:      # a worker still waiting at the barrier wakes, sees stop, ends
        start.release()
    stopped = last_exit = time.monotonic()
    running = list(range(len(children.procs)))
    while running:
        still = [i for i in running if children.procs[i].poll() is None]
        now = time.monotonic()
        if len(still) < len(running):
            last_exit = now
        running = still
        if running and now - last_exit > STOP_GRACE_S:
            for i in running:
                if ran and i not in reported:
                    reported.add(i)
                    failures.append(_failed(spec, i, "did not stop",
                                            _liveness(children.procs[i].pid)))
            break
        if running:
            time.sleep(POLL_S)
    stop_s = time.monotonic() - stopped
    children.kill_all()
    for i, proc in enumerate(children.procs):
        if ran and i not in reported and proc.returncode != 0:
            reported.add(i)
            failures.append(_failed(spec, i, _describe_exit(proc), children.stderr_tail(i)))
    hist = region.array("hist").reshape(len(spec.workers), len(spec.metrics), -1).copy()
    slots = region.array("slots").copy()
    collected = spec.collect(region) if spec.collect is not None else None
    region.set_state(RegionState.DONE)
    return RunOutcome(hist, slots, failures, elapsed, collected=collected, stop_s=stop_s)


def _failed(spec: RunSpec, slot: int, status: str, detail: str) -> WorkerFailed:
    ws = spec.workers[slot]
    return WorkerFailed(ws.cpu, status, detail, slot=slot, role=ws.role)


def _liveness(pid: int) -> str:
    try:
        return f"process {pid} is {psutil.Process(pid).status()}"
    except psutil.NoSuchProcess:
        return f"process {pid} has exited"


def oversubscribed(workers: Sequence[WorkerSpec]) -> bool:
    """Spin waits must yield early: more spinning workers than CPUs this process may use,
    or two of them pinned to one CPU. Every worker of a run gets it as params
    ``oversubscribed``."""
    cpus = [ws.cpu for ws in workers if ws.spins]
    return len(cpus) > len(os.sched_getaffinity(0)) or len(set(cpus)) < len(cpus)
