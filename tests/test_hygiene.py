"""/dev/shm hygiene against a hostile or confusing machine: what start-up reclaim and
``asirt cleanup`` remove, what they leave alone and say why, and how they tell a live run
from a dead one (the creator's lock, never the pid in the name).

Hostile files are planted in a directory of the test's own (``reclaim`` and
``list_leftovers`` take it as ``dev_shm``), never in the real /dev/shm: other asirt runs on
this machine must not trip over them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import secrets
import subprocess
import sys
import time

import posix_ipc
import psutil
import pytest

from asirt import cli
from asirt.cfloor import compiler, reclaim_dirs
from shm_layout import Region, Section
from shm_layout.region import DEV_SHM, list_leftovers, reclaim

ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, unshare)")
OTHER_UID = os.getuid() + 4242


def _name(pid: int | None = None) -> str:
    return f"asirt-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def _dead_region(*tags: str) -> str:
    """The name of a region (and semaphores ``tags``) whose creator has exited."""
    code = ("import os, sys; from shm_layout import Region, Section; "
            "r = Region.create([Section('slots', 1)]); "
            "[r.semaphore(t) for t in sys.argv[1:]]; print(r.name, flush=True); os._exit(0)")
    return subprocess.run([sys.executable, "-c", code, *tags], capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()[0]


def _unlink_all(name: str, *tags: str) -> None:
    for tag in tags:
        try:
            posix_ipc.unlink_semaphore(f"{name}-{tag}")
        except posix_ipc.ExistentialError:
            pass
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def _shm(name: str) -> str:
    return os.path.join(DEV_SHM, name.lstrip("/"))


@pytest.fixture
def planted(tmp_path):
    """A fake /dev/shm holding what a careless or hostile user can leave in the real one."""
    d = tmp_path / "shm"
    d.mkdir()
    (d / _name(123)).mkdir()                                    # asirt bench --out /dev/shm/...
    os.symlink("/proc/self/stat", d / _name(124))               # owned by whoever reads it
    os.mkfifo(d / _name(125))                                   # would block a plain open
    (d / "asirt-999994-cafe.txt").write_text("not ours\n")      # the pattern's end anchor
    (d / f"sem.{_name(126)}-start").mkdir()
    if ROOT:
        theirs = d / _name(127)
        theirs.write_bytes(b"\0" * 4096)
        os.chown(theirs, OTHER_UID, -1)
        link = d / _name(128)
        os.symlink("/nonexistent", link)
        os.lchown(link, OTHER_UID, -1)
    return d


def test_reclaim_leaves_what_asirt_does_not_make_and_says_why(planted):
    before = sorted(os.listdir(planted))
    seen = reclaim(str(planted))             # used to raise on the directory (start-up reclaim)
    assert sorted(os.listdir(planted)) == before, "reclaim removed something not its own"
    by_name = {os.path.basename(lo.path): lo for lo in seen}
    assert "asirt-999994-cafe.txt" not in by_name
    assert all(lo.alive and lo.why for lo in seen), seen
    assert len(by_name) == len(before) - 1


def test_cleanup_prints_every_skipped_entry_and_why(planted, monkeypatch, capsys):
    monkeypatch.setattr(cli, "reclaim", functools.partial(reclaim, str(planted)))
    monkeypatch.setattr(cli, "list_leftovers", functools.partial(list_leftovers, str(planted)))
    assert cli.main(["cleanup"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(os.listdir(planted)) - 1, out       # all but cafe.txt
    assert any("a directory" in line for line in out)
    assert any("a symbolic link" in line for line in out)
    assert any("a FIFO" in line for line in out)
    if ROOT:
        assert any(f"owned by uid {OTHER_UID}" in line for line in out)


def test_a_dead_creator_is_found_by_its_lock_even_when_its_pid_is_reused():
    """Its pid now names another live process (here: renamed to pid 1, always alive)."""
    name = _dead_region("start")
    reused = f"/asirt-1-{name.rsplit('-', 1)[1]}"
    os.rename(_shm(name), _shm(reused))
    os.rename(_shm(f"sem.{name[1:]}-start"), _shm(f"sem.{reused[1:]}-start"))
    try:
        reclaim()
        assert not os.path.exists(_shm(reused))
        assert not os.path.exists(_shm(f"sem.{reused[1:]}-start"))
    finally:
        _unlink_all(reused, "start")


def test_a_live_creator_keeps_its_region_and_an_attacher_does_not():
    """The lock is the creator's alone: a worker that attached keeps nothing alive."""
    code = ("import sys; from shm_layout import Region, Section; "
            "r = Region.create([Section('slots', 1)]); r.semaphore('start'); "
            "print(r.name, flush=True); sys.stdin.read()")
    creator = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    name = creator.stdout.readline().strip()
    try:
        worker = Region.attach(name)
        try:
            reclaim()
            assert os.path.exists(_shm(name)), "reclaim took a live run's segment"
            assert os.path.exists(_shm(f"sem.{name[1:]}-start"))
            creator.stdin.close()
            creator.wait(timeout=60)
            reclaim()
            assert not os.path.exists(_shm(name)), "the attacher's mapping kept it 'alive'"
            assert not os.path.exists(_shm(f"sem.{name[1:]}-start"))
        finally:
            worker.close()
    finally:
        if creator.poll() is None:
            creator.kill()
        creator.wait()
        creator.stdout.close()
        _unlink_all(name, "start")


@needs_root
def test_a_run_in_another_pid_namespace_is_seen_alive_and_its_leftovers_reclaimed():
    """A reclaimer in another PID namespace sharing /dev/shm sees neither this pid nor we its
    pids: only the lock can tell."""
    live = Region.create([Section("slots", 1)])
    live.semaphore("start")
    code = ("import os; from shm_layout import Region, Section; from shm_layout.region import "
            "reclaim; reclaim(); r = Region.create([Section('slots', 1)]); r.semaphore('start');"
            " print(r.name, flush=True); os._exit(0)")
    try:
        res = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0 and "unshare" in res.stderr:
            pytest.skip(f"no PID namespaces here: {res.stderr.strip()}")
        assert res.returncode == 0, res.stderr
        inner = res.stdout.split()[0]
        assert os.path.exists(_shm(live.name)), "a reclaimer in another namespace took it"
        assert os.path.exists(_shm(f"sem.{live.name[1:]}-start"))
        reclaim()
        assert not os.path.exists(_shm(inner))
        assert not os.path.exists(_shm(f"sem.{inner[1:]}-start"))
    finally:
        live.close()
        live.unlink()
        if "inner" in locals():
            _unlink_all(inner, "start")


def test_cleanup_all_refuses_while_a_run_is_active(capsys):
    live = Region.create([Section("slots", 1)])
    try:
        rc = cli.main(["cleanup", "--all"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert live.name in err and "active" in err
        assert os.path.exists(_shm(live.name))
        assert Region.attach(live.name).close() is None
    finally:
        live.close()
        live.unlink()


def _image(version: int | None = None, magic: int | None = None) -> bytes:
    r = Region.create([Section("slots", 1)])
    try:
        if version is not None:
            r.header["version"] = version
        if magic is not None:
            r.header["magic"] = magic
        return bytes(memoryview(r._mmap))
    finally:
        r.close()
        r.unlink()


@pytest.mark.parametrize("kind", ["old version", "other version", "not a region"])
def test_what_cannot_be_judged_is_kept_unless_all(kind, tmp_path):
    """An asirt of another layout may take no lock: its segment may be in use; only --all
    removes it."""
    data = (_image(magic=0x1234) if kind == "not a region" else
            _image(version=1 if kind == "old version" else 2))
    seg = tmp_path / _name()
    seg.write_bytes(data)
    sem = tmp_path / f"sem.{seg.name}-start"
    sem.write_bytes(b"\0" * 32)
    kept = {os.path.basename(lo.path): lo for lo in reclaim(str(tmp_path))}
    assert seg.exists() and sem.exists()
    assert kept[seg.name].alive and kept[sem.name].alive
    assert ("magic" if kind == "not a region" else "another asirt version") in kept[seg.name].why
    reclaim(str(tmp_path), unjudged=True)
    assert not seg.exists() and not sem.exists()


def test_a_region_reclaimed_while_being_made_is_made_again(monkeypatch):
    """'cleanup --all' opening a new segment before its creator locked it finds no header and
    no lock and unlinks it: the creator notices and takes another name."""
    import fcntl

    from shm_layout import region as region_mod
    real_flock = fcntl.flock
    raced: list[str] = []

    def flock_after_a_reclaim(fd: int, op: int) -> None:
        if op == fcntl.LOCK_SH and not raced:
            raced.extend(lo.ipc_name for lo in reclaim(unjudged=True) if lo.removed)
        real_flock(fd, op)

    monkeypatch.setattr(region_mod.fcntl, "flock", flock_after_a_reclaim)
    r = Region.create([Section("slots", 1)])
    try:
        assert raced, "the reclaimer did not find the new segment"
        assert r.name not in raced and os.path.exists(_shm(r.name))
        assert Region.attach(r.name).close() is None
    finally:
        r.close()
        r.unlink()


def test_a_headerless_segment_is_stale_only_when_old(tmp_path, monkeypatch):
    """No header and no lock: an asirt of another layout making it, or a dead creator.
    Making one takes microseconds, so only an old one is surely abandoned."""
    from shm_layout import region as region_mod
    seg = tmp_path / _name()
    seg.write_bytes(b"\0" * 4096)
    (young,) = reclaim(str(tmp_path))
    assert seg.exists() and young.alive and "no header yet" in young.why
    monkeypatch.setattr(region_mod.time, "time", lambda: os.stat(seg).st_ctime + 61)
    (old,) = reclaim(str(tmp_path))
    assert old.removed and not seg.exists()


def test_leftovers_of_a_dead_creator_are_counted_by_the_leak_checker():
    """tests/leakcheck.py relies on ``alive`` and ``creator_pid``: a dead child's are stale."""
    name = _dead_region("start")
    try:
        mine = [lo for lo in list_leftovers() if lo.ipc_name.startswith(name)]
        assert len(mine) == 2 and not any(lo.alive for lo in mine)
        assert {lo.creator_pid for lo in mine} == {int(name.split("-")[1])}
    finally:
        _unlink_all(name, "start")


def test_semaphore_tags_are_what_reclaim_recognises(region):
    with pytest.raises(ValueError, match="tag"):
        region.semaphore("no-dashes")


def _in_private_shm(mount_opts: str, command: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``command`` (sh) with a private tmpfs (``mount_opts``) on /dev/shm, in a mount
    namespace of its own: the real /dev/shm and every other run never see it."""
    script = (f"mount -t tmpfs -o {mount_opts} tmpfs /dev/shm || exit 99; {command}; rc=$?; "
              "echo; echo LEFT:; ls -A /dev/shm; exit $rc")
    res = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    if res.returncode == 99 or "unshare:" in res.stderr:
        pytest.skip(f"cannot mount a private /dev/shm here: {res.stderr.strip()}")
    return res


BENCH = (f"{sys.executable} -m asirt bench pingpong --transport spin --duration 0.2 "
         "--no-floor --quiet --out runs")


@needs_root
def test_a_full_dev_shm_is_refused_with_its_size_and_the_fix(tmp_path):
    res = _in_private_shm("size=8k", BENCH, tmp_path)      # two pages: no region fits
    assert res.returncode == 2, res                          # was 135: SIGBUS, no message
    assert "/dev/shm has no room for a" in res.stderr and "free)" in res.stderr, res.stderr
    assert "mount -o remount,size=" in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.split("LEFT:")[1].split() == [], "the segment was left behind"


@needs_root
def test_a_read_only_dev_shm_is_refused(tmp_path):
    res = _in_private_shm("size=1m,ro", BENCH, tmp_path)
    assert res.returncode == 2, res
    assert "/dev/shm is mounted read-only" in res.stderr and "remount" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("err,needle", [(28, "has no room for a 0.0 MiB region"),
                                        (30, "read-only"), (13, "refused a 0.0 MiB region")])
def test_create_refuses_what_dev_shm_cannot_hold_and_leaves_nothing(err, needle, monkeypatch):
    """The same without root: posix_fallocate says ENOSPC (or EROFS, EACCES)."""
    from shm_layout.errors import ShmUnavailable
    from shm_layout import region as region_mod

    def fail(fd: int, offset: int, size: int) -> None:
        raise OSError(err, os.strerror(err))
    before = {lo.path for lo in list_leftovers()}
    monkeypatch.setattr(region_mod.os, "posix_fallocate", fail)
    with pytest.raises(ShmUnavailable, match=needle) as info:
        Region.create([Section("slots", 1)])
    assert info.value.exit_code == 2 and "/dev/shm" in str(info.value)
    assert {lo.path for lo in list_leftovers()} == before


def test_a_semaphore_dev_shm_cannot_hold_is_refused_like_a_region(region, monkeypatch):
    from shm_layout.errors import ShmUnavailable

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, os.strerror(28))
    monkeypatch.setattr(posix_ipc, "Semaphore", full)
    with pytest.raises(ShmUnavailable, match=f"no room for semaphore {region.name}-start"):
        region.semaphore("start")


needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler")


def _wait_for_child(parent: subprocess.Popen, exe: str, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in psutil.Process(parent.pid).children():
            with contextlib.suppress(psutil.Error):
                if c.exe() == exe:
                    return c
        time.sleep(0.02)
    raise AssertionError(f"{exe} never started")


@needs_cc
@pytest.mark.multiprocess
def test_the_floor_dies_with_its_parent_and_its_directory_is_reclaimed():
    """kill -9 of the CLI while the C floor measures: it used to spin on both CPUs for the
    rest of its duration, and its temporary directory stayed forever."""
    a, b = sorted(os.sched_getaffinity(0))[0], sorted(os.sched_getaffinity(0))[-1]
    code = ("import os; from asirt.cfloor import CFloor; f = CFloor(); "
            f"print(f.exe, flush=True); f.measure({a}, {b}, 120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    floor = None
    try:
        exe = parent.stdout.readline().strip()
        floor = _wait_for_child(parent, exe)
        assert os.path.dirname(exe) in {lo.path for lo in reclaim_dirs() if not lo.removed}
        parent.kill()
        parent.wait()
        assert not psutil.wait_procs([floor], timeout=10)[1], "the floor outlived its parent"
        assert os.path.isdir(os.path.dirname(exe))
        done = [lo for lo in reclaim_dirs() if lo.path == os.path.dirname(exe)]
        assert done and done[0].removed, done
        assert not os.path.exists(os.path.dirname(exe))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        if floor is not None and floor.is_running():
            floor.kill()


def test_reclaim_dirs_leaves_what_a_floor_does_not_make(tmp_path):
    (tmp_path / "asirt-floor-1-deadbeef").mkdir()                 # no lock file
    os.symlink("/etc", tmp_path / "asirt-floor-2-deadbeef")
    (tmp_path / "asirt-floor-3-deadbeef").write_text("a file")
    (tmp_path / "asirt-floor-4-deadbeef").mkdir()
    os.symlink("/etc/passwd", tmp_path / "asirt-floor-4-deadbeef" / "lock")
    (tmp_path / "asirt-floor-5-deadbeef.txt").mkdir()              # not the pattern
    seen = reclaim_dirs(str(tmp_path))
    assert len(seen) == 4 and not any(lo.removed for lo in seen), seen
    assert all(lo.why for lo in seen)
    assert len(os.listdir(tmp_path)) == 5 and os.path.exists("/etc/passwd")
