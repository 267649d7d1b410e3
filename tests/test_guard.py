"""Garbage in published words (asirt.cpu.guard): every reader's range check and the owner's
audit, each shown to catch it, with the look-alikes they must not report: a word in range, an
ack that only echoes another lane's garbage, a fence mask that names no lane of the core."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from asirt import collect
from asirt.cpu import GUEST
from asirt.cpu.checks import Monitor
from asirt.errors import Corrupted
from asirt.scenarios.faults import GARBAGE
from asirt.sync.barrier import SpinBarrier, Result
from shm_layout.cpu import Phase, Word
from tests.fixtures import counter, cpu_region, make_stuns, mode_of


@pytest.fixture
def sleeper():
    """A live process to stand for a sibling that a fencer may kill."""
    p = subprocess.Popen(["sleep", "30"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def _corrupt(events: list[dict]) -> list[tuple]:
    return [(e["other_slot"], e["word"], e["value"], e["found_by"]) for e in events
            if e["kind"] == "CORRUPT"]


def test_a_siblings_words_out_of_range_are_garbage_and_in_range_are_not():
    with cpu_region(3) as r:
        a, b, c = make_stuns(r, 3)
        w = r.words
        assert a.cpu.guard.garbage(1) is None
        for which, i in ((Word.MODE, b.cpu.state.i_mode), (Word.DOMAIN, b.cpu.state.i_dom),
                         (Word.MSEQ, b.cpu.state.i_mseq), (Word.FENCED, b.cpu.i_fenced),
                         (Word.GEN, b.i_gen), (Word.ACK, b.my_ack_of[0])):
            old = w[i]
            w[i] = GARBAGE
            assert a.cpu.guard.garbage(1) == (which, GARBAGE)
            w[i] = old
        w[b.i_gen] = 1 << 40                 # any generation may be true: only its owner knows
        assert a.cpu.guard.garbage(1) is None
        w[b.my_ack_of[2]] = GARBAGE          # b's ack of lane 2: may echo lane 2's garbage
        assert a.cpu.guard.garbage(1) is None


def test_the_owner_finds_its_own_word_changed_even_in_range():
    with cpu_region(2) as r:
        a, _ = make_stuns(r, 2)
        a.cpu.guard.audit()
        r.words[a.i_gen] = a.g + 2
        with pytest.raises(Corrupted, match=r"slot 0: its gen word reads 0x2 but it wrote 0x0"):
            a.cpu.guard.audit()
        assert _corrupt(collect.events(r)) == [(0, "gen", 2, "owner")]
        assert counter(a.cpu, "check.corrupt") == 1


def test_a_waiter_kills_and_fences_a_sibling_whose_generation_is_garbage(sleeper):
    with cpu_region(2, pids=[os.getpid(), sleeper.pid]) as r:
        a, b = make_stuns(r, 2)
        r.words[b.i_gen] = GARBAGE           # odd: a request that never ends
        t0 = time.monotonic()
        assert a.request() is True           # its wait for b's ack checks b's words
        assert time.monotonic() - t0 < 5
        assert a.cpu.fenced_mask == 0b10 and sleeper.wait(timeout=10) == -signal.SIGKILL
        events = collect.events(r)
        assert _corrupt(events) == [(1, "gen", GARBAGE, "reader")]
        assert "FENCE_CORRUPT" in [e["kind"] for e in events]
        a.release()


def test_a_waiter_does_not_accuse_a_sibling_that_echoes_its_own_garbage(sleeper):
    """b acked a's corrupt generation: b's ack of a holds garbage b copied. a, checking b's
    words on a slow wait, audits itself first, and leaves instead of killing b."""
    with cpu_region(2, pids=[os.getpid(), sleeper.pid]) as r:
        a, b = make_stuns(r, 2)
        r.words[a.i_gen] = GARBAGE
        assert b.ack_pending() == 1 and r.words[a.s_ack_me[1]] == GARBAGE
        wait = a.cpu.waiter.begin(1, Phase.REQUEST)
        with pytest.raises(Corrupted, match="its gen word"):
            for _ in range(1000):
                wait.slow()
                time.sleep(0.005)
        assert a.cpu.fenced_mask == 0 and sleeper.poll() is None


def test_the_barrier_fences_a_sibling_with_no_mode_at_all(sleeper):
    with cpu_region(2, pids=[os.getpid(), sleeper.pid]) as r:
        a, b = make_stuns(r, 2)
        r.words[b.cpu.state.i_mode] = GARBAGE
        assert SpinBarrier(a).enter(2_000_000_000) == Result.OK
        assert mode_of(a.cpu) == GUEST and a.cpu.fenced_mask == 0b10
        assert _corrupt(collect.events(r)) == [(1, "mode", GARBAGE, "reader")]


def test_the_checker_and_the_monitor_report_a_mode_that_is_no_mode():
    """Neither may judge S1/S2 with it, nor pass it over in silence; the monitor says it once
    per value however often it samples it."""
    with cpu_region(2, ncores=2) as r:
        a, b = make_stuns(r, 2)
        r.words[b.cpu.state.i_mode] = GARBAGE
        a.cpu.state.enter_guest()                       # the transition checker's look
        assert counter(a.cpu, "check.corrupt") == 1 and a.cpu.fenced_mask == 0
        mon = Monitor(r, 3, [[0, 1]])
        mon.sample()
        mon.sample()
        assert r.words[mon.c_corrupt] == 1
        found = sorted(e["source"] for e in collect.events(r) if e["kind"] == "CORRUPT")
        assert found == ["monitor", "transition"]


def test_a_fence_mask_that_names_no_lane_takes_nobody_out():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        r.words[b.cpu.i_fenced] = GARBAGE               # trusted: every lane out of every check
        assert a.cpu.fenced_any() == 0 and a.cpu.counts(1)
