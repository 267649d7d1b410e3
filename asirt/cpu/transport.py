"""IPI-like transports: how a CPU wakes or interrupts another, and how an idle CPU sleeps.

  spin    nothing is sent; the target polls the words it cares about at its safe points;
  signal  SIGUSR1 to the target's process; its handler runs the target's safe point when it
          interrupts a running guest or an idle sleep (``steady``), and does nothing when it
          interrupts a transition half-way: the interrupted code reaches its next safe point
          within a few steps (a real IPI handler finds the same: it acts at the next
          interruptible point);
  sem     a post on the target's ``wake<slot>`` semaphore, which wakes a CPU blocked in the
          kernel as an idle CPU is: it answers at its safe point and goes back to sleep.

:func:`senders` is the sending side, shared by the stun handshake and the raw pingpong
benchmark; :class:`Transport` is one CPU's whole transport (send to its siblings, idle wait,
the signal handler).
"""
from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Callable, Sequence

import posix_ipc

from shm_layout import Region
from shm_layout.counters import COUNTER
from shm_layout.header import STOP_WORD
from shm_layout.region import sem_wait

if TYPE_CHECKING:
    from asirt.cpu.cpu import Cpu

__all__ = ["TRANSPORTS", "senders", "Transport", "IPI_SIGNAL"]

TRANSPORTS = ("spin", "signal", "sem")
IPI_SIGNAL = signal.SIGUSR1


def senders(kind: str, region: Region, targets: Sequence[tuple[int, int]]) -> list[Callable[[], None]]:
    """One callable per ``(slot, pid)`` target that delivers an IPI to it ([] for spin)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport {kind!r}; choose from {', '.join(TRANSPORTS)}")
    if kind == "spin":
        return []
    if kind == "signal":
        kill = os.kill

        def signaller(pid: int) -> Callable[[], None]:
            def send() -> None:
                try:
                    kill(pid, IPI_SIGNAL)
                except ProcessLookupError:
                    pass
            return send
        return [signaller(pid) for _, pid in targets]
    return [region.semaphore(f"wake{slot}").release for slot, _ in targets]


class Transport:
    """One CPU's transport (module docstring)."""

    def __init__(self, cpu: "Cpu", kind: str) -> None:
        if kind not in TRANSPORTS:
            raise ValueError(f"transport {kind!r}; choose from {', '.join(TRANSPORTS)}")
        self.cpu, self.kind = cpu, kind
        self.send: list[Callable[[], None] | None] = [None] * cpu.nlanes
        self.c_ipis = cpu.cnt + COUNTER["cpu.ipis"]
        self._wake: posix_ipc.Semaphore | None = None
        #: signal transport: the handler may act (a running guest, an idle sleep) ...
        self.steady = False
        #: ... and it did: the handler's safe point parked this CPU
        self.interrupted = False

    def bind(self) -> None:
        """After the start barrier, when every sibling's pid is known."""
        cpu = self.cpu
        targets = [(cpu.slot_of[j], cpu.w[cpu.s_pid[j]]) for j in cpu.sibs]
        for j, send in zip(cpu.sibs, senders(self.kind, cpu.region, targets)):
            self.send[j] = send

    def deliver(self, lanes: Sequence[int]) -> None:
        """Send an IPI to each of ``lanes`` (nothing for spin)."""
        if self.kind == "spin":
            return
        send = self.send
        for j in lanes:
            s = send[j]
            if s is not None:
                s()
        self.cpu.w[self.c_ipis] += len(lanes)

    def install_handler(self) -> None:
        """The signal transport's receiving side (install before READY: SIGUSR1's default
        action would kill the process)."""
        safepoint = self.cpu.safepoint

        def on_ipi(signum: int, frame: object) -> None:
            if not self.steady:
                return          # mid-transition: the interrupted code reaches a safe point
            self.steady = False
            if safepoint():
                self.interrupted = True
            else:
                self.steady = True

        signal.signal(IPI_SIGNAL, on_ipi)

    def idle_wait(self, timeout_ns: int) -> None:
        """Sleep as an idle CPU for up to ``timeout_ns``, answering at the safe point whenever
        woken (and before and after)."""
        cpu = self.cpu
        sp = cpu.safepoint
        sp()
        if self.kind == "sem":
            if self._wake is None:
                self._wake = cpu.region.semaphore(f"wake{cpu.slot}")
            try:
                sem_wait(self._wake, timeout_ns / 1e9)
            except posix_ipc.BusyError:
                pass
            sp()
        elif self.kind == "signal":
            self.steady = True
            sp()                          # what came before ``steady`` was set
            time.sleep(timeout_ns / 1e9)  # SIGUSR1 interrupts it; the handler answers
            self.steady = False
            sp()
        else:
            w = cpu.w
            end = time.perf_counter_ns() + timeout_ns
            n, limit = 0, cpu.waiter.limit
            while time.perf_counter_ns() < end and not w[STOP_WORD]:
                sp()
                n += 1
                if n >= limit:
                    os.sched_yield()
