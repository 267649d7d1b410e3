"""Micro-benchmarks of the runtime's primitives: slot words, one spin round trip, and the
spin transport against the C cache-line floor between the same two CPUs.

Run with ``python -m pytest bench --benchmark-enable``. The ratio benchmark is the issue's
speed target (spin p50 within 2.5x of the C floor); it asserts only when benchmarks are
enabled, since a loaded machine makes any single timing meaningless.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from asirt import histogram, orchestrator
from asirt.cfloor import CFloor, compiler
from asirt.orchestrator import RunSpec, WorkerSpec
from asirt.params import PingpongParams
from shm_layout.header import STOP_WORD

CPUS = sorted(os.sched_getaffinity(0))
RATIO_TARGET = float(os.environ.get("ASIRT_SPIN_FLOOR_RATIO", "2.5"))
#: how long the spin round trip may take in all; the ponger gives up on its own after it
ROUND_TRIP_S = 90.0


def test_slot_write_read(benchmark, region):
    w = region.words
    i = region.word_index("slots", 1, "ping")

    def rounds():
        for k in range(1000):
            w[i] = k
            w[i]
    benchmark.extra_info["unit"] = "us per round = ns per write+read"
    benchmark(rounds)


# Answers each ping until the parent sets STOP, or on its own after argv[2] seconds (the
# parent died or hung); the clock is read only while there is nothing to answer.
PONGER = """
import os, sys, time
from shm_layout import Region
from shm_layout.header import STOP_WORD
os.sched_setaffinity(0, {%d})
r = Region.attach(sys.argv[1]); w = r.words
end = time.monotonic() + float(sys.argv[2])
src, dst = r.word_index('slots', 0, 'ping'), r.word_index('slots', 1, 'pong')
w[r.word_index('slots', 1, 'progress')] = 1
last = n = 0
while not w[STOP_WORD]:
    v = w[src]
    if v != last:
        w[dst] = last = v
    else:
        n += 1
        if n >= 4096:
            n = 0
            if time.monotonic() > end:
                break
r.close()
"""


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_spin_round_trip(benchmark, region):
    """One spin round trip between this process (first CPU) and a child on the last CPU."""
    deadline = time.monotonic() + ROUND_TRIP_S
    w = region.words
    os.sched_setaffinity(0, {CPUS[0]})
    child = subprocess.Popen([sys.executable, "-c", PONGER % CPUS[-1], region.name,
                              str(ROUND_TRIP_S)])

    def check_child(what: str) -> None:
        if child.poll() is not None:
            pytest.fail(f"the ponger exited with status {child.returncode} {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no answer {what} within {ROUND_TRIP_S:.0f}s")

    try:
        ready = region.word_index("slots", 1, "progress")
        while w[ready] != 1:
            check_child("before it was ready")
            time.sleep(0.001)
        ping, pong = region.word_index("slots", 0, "ping"), region.word_index("slots", 1, "pong")
        seq = [0]
        polls = range(4096)

        def round_trip():
            k = seq[0] = seq[0] + 1
            w[ping] = k
            while True:
                for _ in polls:
                    if w[pong] == k:
                        return
                check_child(f"to ping {k}")
        benchmark(round_trip)
    finally:
        w[STOP_WORD] = 1
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os.sched_setaffinity(0, set(CPUS))


@pytest.mark.skipif(len(CPUS) < 2 or compiler() is None, reason="needs two CPUs and a C compiler")
def test_spin_transport_vs_c_floor(benchmark, request):
    """The spin transport's p50 round trip as a ratio of the C floor, measured in one run."""
    a, b = CPUS[0], CPUS[-1]
    ratios = []

    def measure():
        with CFloor() as floor:
            floor_p50 = histogram.summarize(floor.measure(a, b, 1.0).counts).p50
        out = orchestrator.run(RunSpec(
            workers=[WorkerSpec(a, "pingpong", PingpongParams("ping", peer=1, transport="spin")),
                     WorkerSpec(b, "pingpong", PingpongParams("pong", peer=0, transport="spin"))],
            metrics=["roundtrip"], duration_s=1.0, cores=[[0, 1]]))
        assert out.failures == [], out.failures
        spin_p50 = histogram.summarize(out.merged(0)).p50
        ratios.append(spin_p50 / floor_p50)
        benchmark.extra_info.update(floor_p50_ns=floor_p50, spin_p50_ns=spin_p50,
                                    ratio=round(spin_p50 / floor_p50, 3))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    if not request.config.getoption("benchmark_disable"):
        assert min(ratios) <= RATIO_TARGET, benchmark.extra_info
