"""Helpers for the /dev/kvm tests and benchmarks: a loaded guest that always closes, what this
process holds of KVM (fds, mappings), and kick-to-exit timing from a thread or a process."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import Iterator

from asirt.kvm.guest import RAM_SIZE, WORK_FOREVER, GuestProgram, Request
from asirt.kvm.vm import ExitKind, Vcpu, Vm, kick_thread


@contextlib.contextmanager
def loaded_guest(kick: bool = False) -> Iterator[tuple[GuestProgram, Vcpu]]:
    """A Vm with asirt's guest loaded and its vCPU (kicks enabled in this thread if ``kick``)."""
    with Vm(RAM_SIZE) as vm:
        program = GuestProgram(vm)
        with program.vcpu(kick=kick) as vcpu:
            yield program, vcpu


def kvm_fds() -> list[str]:
    """What this process's fds on /dev/kvm and KVM's anon inodes point at."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:       # the fd listdir itself used, closed meanwhile
            continue
        if target.startswith("anon_inode:kvm") or target == "/dev/kvm":
            found.append(target)
    return sorted(found)


def kvm_mappings() -> list[str]:
    """Lines of /proc/self/maps that map a KVM anon inode (the vCPU's kvm_run)."""
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "kvm" in line]


def is_mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def kick_from_thread(program: GuestProgram, vcpu: Vcpu, rounds: int,
                     delay_s: float = 0.002, timeout_s: float = 30.0) -> list[int]:
    """ns from a thread's SIGUSR1 to the vCPU thread (this one) until run() returns INTR,
    while the guest spins (work_iters = WORK_FOREVER); the guest is released afterwards."""
    go, sent = threading.Event(), []
    me = threading.get_ident()

    def kicker() -> None:
        for _ in range(rounds):
            if not go.wait(timeout_s):
                return
            go.clear()
            time.sleep(delay_s)         # the vCPU is in the guest by then
            sent.append(time.monotonic_ns())
            kick_thread(me)

    thread = threading.Thread(target=kicker, name="kicker", daemon=True)
    thread.start()
    program.post(Request(seq=1, work_iters=WORK_FOREVER))
    latencies = []
    try:
        for i in range(rounds):
            go.set()
            exit_ = vcpu.run()
            returned = time.monotonic_ns()
            assert exit_.kind is ExitKind.INTR, exit_
            latencies.append(returned - sent[i])
    finally:
        thread.join(timeout_s)
        program.post(Request(seq=2))
    return latencies


# Kicks the (pid, tid) of argv each time a byte arrives on stdin, after argv[3] seconds, and
# writes the CLOCK_MONOTONIC time of the send; gives up after argv[4] seconds in all; runs on
# CPU argv[5] unless it is -1.
KICKER = """
import os, sys, time
from asirt.kvm.vm import kick
pid, tid, delay, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
if int(sys.argv[5]) >= 0:
    os.sched_setaffinity(0, {int(sys.argv[5])})
end = time.monotonic() + limit
while sys.stdin.buffer.read(1) and time.monotonic() < end:
    time.sleep(delay)
    sent = time.monotonic_ns()
    kick(pid, tid)
    sys.stdout.buffer.write(sent.to_bytes(8, "little"))
    sys.stdout.buffer.flush()
"""


def kick_from_process(program: GuestProgram, vcpu: Vcpu, rounds: int, delay_s: float = 0.002,
                      timeout_s: float = 30.0, cpu: int | None = None) -> list[int]:
    """Like kick_from_thread, the kicks sent by a child process with ``kick(pid, tid)``
    (tgkill), optionally pinned to ``cpu``; the child is always reaped."""
    pid, tid = vcpu.kick_target
    cmd = [sys.executable, "-c", KICKER, str(pid), str(tid), str(delay_s), str(timeout_s),
           str(-1 if cpu is None else cpu)]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    program.post(Request(seq=1, work_iters=WORK_FOREVER))
    latencies = []
    try:
        for _ in range(rounds):
            child.stdin.write(b"k")
            child.stdin.flush()
            exit_ = vcpu.run()
            returned = time.monotonic_ns()
            assert exit_.kind is ExitKind.INTR, exit_
            latencies.append(returned - int.from_bytes(child.stdout.read(8), "little"))
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
        program.post(Request(seq=2))
    return latencies
