"""shm_layout: layout derived from dtypes, create/attach validation, unlink, reclaim."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import posix_ipc
import psutil
import pytest

from shm_layout import (HEADER_DTYPE, LAYOUT_VERSION, SLOT_DTYPE, LayoutMismatch, Region,
                        RegionState, Section, SegmentMissing, list_leftovers, reclaim)
from shm_layout.region import DEV_SHM, plan, sem_wait
from shm_layout.sections import ALIGN, CORE_DTYPE, HIST_DTYPE
from tests.leakcheck import children_left, leftovers_since, snapshot


def test_layout_is_derived_from_dtypes():
    planned, total = plan([Section("slots", 3), Section("hist", 2)])
    assert planned[0].offset == HEADER_DTYPE.itemsize
    assert planned[1].offset == planned[0].offset + 3 * SLOT_DTYPE.itemsize
    assert total == planned[1].offset + 2 * HIST_DTYPE.itemsize
    assert all(p.offset % ALIGN == 0 for p in planned)
    assert SLOT_DTYPE.itemsize == CORE_DTYPE.itemsize == 128


def test_create_attach_roundtrip(region):
    other = Region.attach(region.name)
    try:
        w = region.word_index("slots", 1, "pong")
        region.words[w] = 42
        assert other.words[w] == 42
        assert other.array("slots")[1]["pong"] == 42
        assert other.state == RegionState.READY
    finally:
        other.close()


def test_segment_is_private_and_prefixed(region):
    st = os.stat(f"/dev/shm/{region.name[1:]}")
    assert st.st_mode & 0o777 == 0o600
    assert region.name.startswith(f"/asirt-{os.getpid()}-")


def _corrupt(region: Region, field: str, value) -> None:
    region.header[field] = value


@pytest.mark.parametrize("field,value,what", [
    ("magic", 1234, "magic"),
    ("version", LAYOUT_VERSION + 1, "layout version"),
    ("creator_uid", os.getuid() + 1, "creator uid"),
    ("state", RegionState.CREATING, "state"),
    ("total_size", 1, "total size"),
])
def test_attach_refuses_mismatch(region, field, value, what):
    _corrupt(region, field, value)
    with pytest.raises(LayoutMismatch) as info:
        Region.attach(region.name)
    assert info.value.what == what
    assert "expected" in str(info.value) and "found" in str(info.value)
    assert info.value.exit_code == 2


def test_attach_refuses_changed_dtype(region):
    region.header["sections"][0]["dtype_crc"] ^= 1
    with pytest.raises(LayoutMismatch, match="slots dtype"):
        Region.attach(region.name)


def test_attach_refuses_foreign_segment():
    name = f"/asirt-{os.getpid()}-f0reign0"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    try:
        os.write(shm.fd, b"not an asirt region")
        with pytest.raises(LayoutMismatch, match="magic"):
            Region.attach(name)
    finally:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(name)


def test_attach_missing():
    with pytest.raises(SegmentMissing):
        Region.attach("/asirt-1-doesnotexist")


def test_error_pickles(region):
    import pickle
    err = LayoutMismatch(region.name, "magic", 1, 2)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


def test_unlink_removes_semaphores_and_is_idempotent():
    r = Region.create([Section("slots", 1)])
    r.semaphore("start")
    r.semaphore("wake0")
    r.close()
    r.close()
    r.unlink()
    r.unlink()
    assert not [lo for lo in list_leftovers() if lo.ipc_name.startswith(r.name)]


def test_only_creator_unlinks(region):
    other = Region.attach(region.name)
    try:
        with pytest.raises(Exception, match="only the creator"):
            other.unlink()
    finally:
        other.close()


def test_reclaim_takes_dead_creators_only():
    # A child creates a region and a semaphore and is killed before it can unlink them.
    code = ("import os,sys; from shm_layout import Region, Section; "
            "r = Region.create([Section('slots', 1)]); r.semaphore('start'); "
            "print(r.name, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()[0]
    names = {lo.ipc_name for lo in list_leftovers()}
    assert out in names and f"{out}-start" in names
    live = Region.create([Section("slots", 1)])
    try:
        done = {lo.ipc_name for lo in reclaim() if lo.removed}
        assert {out, f"{out}-start"} <= done
        assert live.name not in done
        assert live.name in {lo.ipc_name for lo in list_leftovers()}
    finally:
        live.close()
        live.unlink()


def test_leak_checker_fails_on_a_leftover():
    """The autouse leak check must flag a segment a test forgot: this is how we know it works."""
    before = snapshot()
    r = Region.create([Section("slots", 1)])
    try:
        problems = leftovers_since(before)
        assert problems and r.name[1:] in problems[0]
    finally:
        r.close()
        r.unlink()
    assert leftovers_since(before) == []


def test_leak_checker_fails_on_a_leftover_semaphore():
    """A segment unlinked but one of its semaphores forgotten: the semaphore is named."""
    before = snapshot()
    r = Region.create([Section("slots", 1)])
    r.semaphore("start")
    r.close()
    posix_ipc.unlink_shared_memory(r.name)
    try:
        problems = leftovers_since(before)
        assert problems and f"sem.{r.name[1:]}-start" in problems[0]
        assert f"{DEV_SHM}/{r.name[1:]}" not in problems[0]     # the segment is gone
    finally:
        r.unlink()
    assert leftovers_since(before) == []


def test_leak_checker_counts_what_a_dead_child_left():
    """A child that created a segment and a semaphore and died without unlinking them."""
    before = snapshot()
    code = ("import os; from shm_layout import Region, Section; "
            "r = Region.create([Section('slots', 1)]); r.semaphore('start'); "
            "print(r.name, flush=True); os._exit(0)")
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()[0]
    try:
        problems = leftovers_since(before)
        assert problems and name[1:] in problems[0] and f"sem.{name[1:]}-start" in problems[0]
    finally:
        posix_ipc.unlink_semaphore(f"{name}-start")
        posix_ipc.unlink_shared_memory(name)
    assert leftovers_since(before) == []


def test_leak_checker_fails_on_an_unreaped_child():
    """A child still running at the end of a test is named, then killed and reaped."""
    p = subprocess.Popen(["sleep", "30"])
    try:
        problems = children_left()
        assert problems and str(p.pid) in problems[0] and "sleep 30" in problems[0], problems
        assert children_left() == []                   # the first call reaped it
    finally:
        if p.poll() is None:                           # the checker failed to: do it here
            p.kill()
            p.wait()


def test_leak_checker_fails_on_a_child_nobody_waited_for():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        problems = children_left()
        assert problems and str(p.pid) in problems[0], problems
        assert children_left() == []
    finally:
        p.wait()


def test_create_failure_leaves_nothing(monkeypatch):
    before = snapshot()

    def boom(self, planned, total):
        raise RuntimeError("half-way")

    monkeypatch.setattr(Region, "_write_header", boom)
    with pytest.raises(RuntimeError):
        Region.create([Section("slots", 1)])
    assert leftovers_since(before) == []


def test_numpy_views_match_word_index(region):
    slots = region.array("slots")
    slots[0]["progress"] = 7
    assert region.words[region.word_index("slots", 0, "progress")] == 7
    hist = region.array("hist")
    hist[1][5] = 3
    assert region.words[region.word_index("hist", 1) + 5] == 3
    assert isinstance(hist, np.ndarray)


def _pester(stop: threading.Event) -> None:
    """Send SIGUSR1 to the main thread every millisecond, as a signal-transport peer would."""
    main = threading.main_thread().ident
    while not stop.wait(0.001):
        signal.pthread_kill(main, signal.SIGUSR1)


@pytest.fixture
def pestered():
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
    stop = threading.Event()
    t = threading.Thread(target=_pester, args=(stop,))
    t.start()
    yield hits
    stop.set()
    t.join()
    signal.signal(signal.SIGUSR1, old)


def test_sem_wait_survives_signals(region, pestered):
    """The CI failure: a peer's SIGUSR1 broke a worker's wait on the start barrier."""
    sem = region.semaphore("start")
    with pytest.raises(posix_ipc.SignalError):     # what a bare acquire does
        while True:
            try:
                sem.acquire(0.05)
            except posix_ipc.BusyError:
                continue
    threading.Timer(0.2, sem.release).start()
    sem_wait(sem, 5.0)                              # interrupted many times, still acquires
    assert len(pestered) > 10


def test_sem_wait_still_times_out(region, pestered):
    sem = region.semaphore("start")
    t0 = time.monotonic()
    with pytest.raises(posix_ipc.BusyError):
        sem_wait(sem, 0.1)
    assert 0.09 <= time.monotonic() - t0 < 10.0
