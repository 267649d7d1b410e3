"""Round-trip latency of one IPI-like transport between two pinned workers.

The ``ping`` side writes a sequence number into its slot, delivers it through the transport,
and waits for the ``pong`` side to echo it into its own slot; the time between is one sample
of ``roundtrip``. Every word has one writer: ping writes only its ``ping``, pong only its
``pong`` (x86 TSO orders the stores; no fence is needed for request/ack message passing).

Transports (``PingpongParams.transport``; the sending side is asirt.cpu.transport's):
  spin    the target polls the requester's word at its safe points (a busy loop);
  signal  SIGUSR1: the target's handler echoes asynchronously, interrupting the busy loop
          it runs;
  sem     the target is blocked on its POSIX semaphore, as an idle CPU would be, and is woken.
          Before each sample the ping side waits (untimed) until /proc says the target is
          asleep: without that, a target still on its way back to the semaphore finds the
          post already there, and the sample times a handoff, not a wake-up.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

import posix_ipc

from asirt import clock
from asirt.cpu.transport import IPI_SIGNAL, senders
from asirt.cpu.wait import spin_limit
from asirt.params import PingpongParams
from asirt.proc import Proc
from shm_layout.header import STOP_WORD
from shm_layout.region import sem_wait
from workers.context import WorkerContext

PARAMS = PingpongParams
PROGRESS_EVERY = 1024   # round trips between publications of ``samples`` (progress display)


def prepare(ctx: WorkerContext) -> None:
    """Before READY: the signal target installs its handler so no early IPI is lost."""
    p: PingpongParams = ctx.params
    if p.side == "pong" and p.transport == "signal":
        w = ctx.words
        src = ctx.slot_word(p.peer, "ping")
        dst = ctx.slot_word(ctx.slot, "pong")

        def on_ipi(signum: int, frame: object) -> None:
            w[dst] = w[src]

        signal.signal(IPI_SIGNAL, on_ipi)


def run(ctx: WorkerContext, prepared: None) -> None:
    if ctx.params.side == "ping":
        _ping(ctx)
    else:
        _PONG[ctx.params.transport](ctx)


def _wait_slow(w: memoryview, idx: int, value: int) -> bool:
    """Yield between polls until ``w[idx] == value``; False if the run stops first."""
    sched_yield = os.sched_yield
    while w[idx] != value:
        if w[STOP_WORD]:
            return False
        sched_yield()
    return True


def _ping(ctx: WorkerContext) -> None:
    w, p = ctx.words, ctx.params
    peer = p.peer
    mine = ctx.slot_word(ctx.slot, "ping")
    theirs = ctx.slot_word(peer, "pong")
    samples = ctx.slot_word(ctx.slot, "samples")
    rec = ctx.recorder("roundtrip")
    limit = spin_limit(ctx.oversubscribed)
    peer_pid = w[ctx.slot_word(peer, "pid")]
    (deliver,) = senders(p.transport, ctx.region, [(peer, peer_pid)]) or (None,)
    asleep = _asleep(peer_pid) if p.transport == "sem" else None
    now = clock.now   # a local: one lookup per read in the loop below
    k = 0
    while not w[STOP_WORD]:
        k += 1
        if asleep is not None:
            _wait_until_asleep(w, asleep)
        t0 = now()
        w[mine] = k
        if deliver is not None:
            deliver()
        n = 0
        stopped = False
        while w[theirs] != k:
            n += 1
            if n >= limit and not _wait_slow(w, theirs, k):
                stopped = True   # asked to stop while waiting: not a round trip
                break
        if stopped:
            k -= 1
            break
        t1 = now()
        rec(t1 - t0)
        if k % PROGRESS_EVERY == 0:
            w[samples] = k
    w[samples] = k


def _asleep(pid: int) -> Callable[[], bool]:
    """Whether process ``pid`` (single-threaded here) is asleep in the kernel: state S."""
    proc = Proc(pid)
    return lambda: proc.state() == "S"


def _wait_until_asleep(w: memoryview, asleep: Callable[[], bool]) -> None:
    """Untimed, before a sample: until the target sleeps (yielding, in case it needs this
    CPU to get there), the run stops, or 50 ms pass (then the sample goes ahead)."""
    deadline = time.monotonic() + 0.05
    while not asleep() and not w[STOP_WORD] and time.monotonic() < deadline:
        os.sched_yield()


def _pong_spin(ctx: WorkerContext) -> None:
    w = ctx.words
    src = ctx.slot_word(ctx.params.peer, "ping")
    dst = ctx.slot_word(ctx.slot, "pong")
    limit = spin_limit(ctx.oversubscribed)
    sched_yield = os.sched_yield
    last, n = 0, 0
    while True:
        v = w[src]
        if v != last:
            w[dst] = last = v
            n = 0
            continue
        n += 1
        if n >= limit:
            if w[STOP_WORD]:
                return
            sched_yield()


def _pong_signal(ctx: WorkerContext) -> None:
    w = ctx.words
    limit = spin_limit(ctx.oversubscribed)
    sched_yield, n = os.sched_yield, 0
    while not w[STOP_WORD]:   # a running "guest": the handler interrupts it between bytecodes
        n += 1
        if n >= limit:
            sched_yield()
            n = 0


def _pong_sem(ctx: WorkerContext) -> None:
    w = ctx.words
    src = ctx.slot_word(ctx.params.peer, "ping")
    dst = ctx.slot_word(ctx.slot, "pong")
    sem = ctx.region.semaphore(f"wake{ctx.slot}")
    while not w[STOP_WORD]:
        try:
            sem_wait(sem, 0.05)
        except posix_ipc.BusyError:
            continue
        w[dst] = w[src]


_PONG = {"spin": _pong_spin, "signal": _pong_signal, "sem": _pong_sem}
