"""Regions and in-process CPUs for the unit tests, and the fixtures built on them (registered
as a pytest plugin by conftest.py: tests use them by name, never import them).

``cpu_region(n)`` is an in-process region for ``ncores`` cores of ``n`` lanes each (slots in
core order), with the CPU and synchronization sections set up, and the ASI sections when
``asi`` is true. Its "CPUs" are :class:`asirt.cpu.Cpu` handles built in this one process
(:func:`make_cpus`); unit tests drive a protocol's steps one by one, and a step that must wait
runs in a thread (:class:`Background`). ``test_topology()`` is the emulated grouping of this
process's CPUs that the multi-process tests run on.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterator

import pytest

from asirt import cpu as cpu_layer
from asirt import mm, sync
from asirt.cpu import ASI, IDLE, Cpu
from asirt.kvm import profile as profiles
from asirt.kvm import strategy
from asirt.kvm import vms as vm_memory
from asirt.kvm.backend import EmulatedGuest
from asirt.kvm.loop import VcpuLoop
from asirt.kvm.vms import Memory
from asirt.mm.asi import Asi
from asirt.mm.spaces import AddressSpaces
from asirt.params import CpuParams, KvmParams
from asirt.sync.barrier import SpinBarrier
from asirt.sync.stun import Stun
from asirt.topology import Topology, read_topology, select_topology
from shm_layout import Region, Section
from shm_layout.counters import COUNTER

L1D = 32 * 1024
#: a test CPU: yields at once (the test's threads share CPUs), short timeouts, patient give-up
FAST = CpuParams(oversubscribed=True, ack_timeout_ms=20.0, give_up_ms=2000.0)
#: a requester that does not give up before the test has had every chance to answer it
PATIENT = CpuParams(oversubscribed=True, ack_timeout_ms=20.0, give_up_ms=30_000.0)


def test_topology() -> Topology:
    """The usable cores of this host; emulated siblings where there is no SMT."""
    return select_topology(read_topology(), "auto")


test_topology.__test__ = False  # type: ignore[attr-defined]  # not a test


@contextlib.contextmanager
def cpu_region(n: int = 2, ncores: int = 1, asi: bool = False, frames: int = 64,
               tables: int = 64, pids: list[int] | None = None,
               vms: int = 0) -> Iterator[Region]:
    """A region for ``ncores`` cores of ``n`` lanes (slot = core * n + lane); unlinked on exit.
    Every slot's pid is this process's unless ``pids`` says otherwise. ``vms``: the KVM
    workload's memory for that many VMs (asirt.kvm.vms) instead of bare address spaces."""
    total = n * ncores
    secs = [Section("slots", total), Section("cores", ncores), Section("metrics", 1),
            Section("hist", total), *cpu_layer.sections(total, ncores),
            *sync.sections(total, ncores)]
    if vms:
        secs += vm_memory.sections(total, vms)
    elif asi:
        secs += mm.sections(total, frames, tables)
    r = Region.create(secs)
    try:
        slots = r.array("slots")
        for s in range(total):
            slots[s]["cpu"] = s
            slots[s]["pid"] = os.getpid() if pids is None else pids[s]
            r.semaphore(f"wake{s}")
        cores = [list(range(k * n, (k + 1) * n)) for k in range(ncores)]
        rec = r.array("cores")
        for k, c in enumerate(cores):
            rec[k]["core"], rec[k]["nsiblings"], rec[k]["l1d_bytes"] = k, len(c), L1D
            rec[k]["cpus"][:len(c)] = c
        cpu_layer.setup(r)
        sync.setup(r, cores)
        if vms:
            vm_memory.setup(r, vms)
        elif asi:
            mm.setup(r)
        yield r
    finally:
        r.close()
        r.unlink()


def make_cpus(region: Region, slots: list[int] | int, params: CpuParams = FAST,
              domain: int = 1, mode: int | None = None,
              delay: Callable[[], None] | None = None) -> list[Cpu]:
    """One started Cpu per slot (``n``: slots 0..n-1), all in ASI(domain) (IDLE for 0)."""
    m = mode if mode is not None else (ASI if domain else IDLE)
    slots = list(range(slots)) if isinstance(slots, int) else slots
    out = [Cpu(region, s, params, delay, m, domain) for s in slots]
    for c in out:
        c.start()
    return out


def make_stuns(region: Region, n: int, protocol: str = "strict", params: CpuParams = FAST,
               domain: int = 1, mode: int | None = None) -> list[Stun]:
    """One Stun per lane of core 0, on started CPUs."""
    return [Stun(c, protocol) for c in make_cpus(region, n, params, domain, mode)]


@contextlib.contextmanager
def asi_handles(region: Region, *slots: int) -> Iterator[list[Asi]]:
    """One online Asi per CPU slot (all in this process, each on its own Cpu), closed after."""
    out: list[Asi] = []
    try:
        for s in slots:
            (c,) = make_cpus(region, [s], domain=0)
            a = Asi(region, c)
            out.append(a)
            a.online()
        yield out
    finally:
        for a in out:
            a.close()
            a.cpu.close()


def make_loops(region: Region, n: int, strategy_name: str, vms: int = 1,
               profile: str = "io-heavy", params: CpuParams = FAST,
               rec: dict | None = None, **knobs) -> list[VcpuLoop]:
    """A vCPU loop (asirt.kvm.loop) on each of lanes 0..n-1 of core 0 of a region made with
    ``cpu_region(n, vms=...)``, on started CPUs in IDLE, with the emulated guest; ``knobs``:
    KvmParams fields. ``rec``: metric -> recorder (default: none recorded)."""
    out = []
    for cpu in make_cpus(region, n, params, domain=0):
        stun = Stun(cpu, strategy.get(strategy_name).protocol)
        asi = Asi(region, cpu)
        p = KvmParams(cpu=params, strategy=strategy_name, vms=vms, **knobs)
        out.append(VcpuLoop(stun, asi, strategy.get(strategy_name), p, profiles.load(profile),
                            Memory.find(asi, vms), EmulatedGuest(stun),
                            SpinBarrier(stun, None), None, rec or {}))
    return out


def close_loops(loops: list) -> None:
    for lp in loops:
        lp.asi.close()
        lp.cpu.close()


def counter(cpu: Cpu, name: str) -> int:
    return cpu.w[cpu.cnt + COUNTER[name]]


def mode_of(cpu: Cpu) -> int:
    return cpu.w[cpu.state.i_mode]


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``cond()`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(0.001)


class Background:
    """Run ``fn`` in a thread; ``result()`` joins it (with a timeout) and returns its value."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.value = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised in result()
                self.error = err

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 10.0) -> object:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"background step did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def aregion() -> Iterator[Region]:
    """A region with the ASI sections, two CPUs on one core."""
    with cpu_region(2, asi=True) as r:
        yield r


@pytest.fixture
def kernel(aregion: Region) -> Iterator[Asi]:
    """The parent's handle (no CPU): allocation, instances, checks."""
    a = AddressSpaces(aregion)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def cpu0(aregion: Region) -> Iterator[Asi]:
    with asi_handles(aregion, 0) as (a,):
        yield a


@pytest.fixture
def cpu1(aregion: Region) -> Iterator[Asi]:
    with asi_handles(aregion, 1) as (a,):
        yield a
