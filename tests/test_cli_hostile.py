"""The command line against a hostile user: signals at the worst moments, kill -9, output
that cannot be written, input files of the wrong shape, a reader that stops reading.

Signals are sent at chosen moments: after a progress line, or while the CLI sleeps in a
test pause (ASIRT_TEST_PAUSE=<phase>:<seconds>, asirt.cli.pause_for_tests).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from asirt import histogram, results, scenarios
from asirt.cfloor import compiler
from asirt.cli import main
from asirt.errors import ShmUnavailable
from asirt.results import SCHEMA_VERSION, Entry
from shm_layout.region import list_leftovers

pytestmark = pytest.mark.timeout(180)

CPUS = sorted(os.sched_getaffinity(0))
PAIR = f"{CPUS[0]},{CPUS[-1]}"


class Cli:
    """``python -m asirt ARGS`` in a session of its own, its stderr read as it comes."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "asirt", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        self.err: list[str] = []
        self.out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stderr, self.err),
                                               (self.proc.stdout, self.out))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.err)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        raise AssertionError(f"no stderr line with {text!r}: {''.join(self.err)}")

    def ctrl_c(self) -> None:
        """What a terminal does: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self, sig: int) -> None:
        """What ``kill PID`` does: the CLI alone."""
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        """Wait for the CLI to exit: its status, stdout and stderr."""
        self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        return self.proc.returncode, "".join(self.out), "".join(self.err)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for t in self._readers:
            t.join(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def cli():
    started: list[Cli] = []

    def start(*args: str, **kwargs) -> Cli:
        started.append(Cli(*args, **kwargs))
        return started[-1]
    yield start
    for c in started:
        c.close()


def bench_args(out, duration: float, transport: str = "spin") -> list[str]:
    return ["bench", "pingpong", "--transport", transport, "--duration", str(duration),
            "--no-floor", "--cpus", PAIR, "--out", str(out)]


def result_of(out) -> dict:
    dirs = [d for d in os.listdir(out) if not d.startswith(".")]
    assert len(dirs) == 1, f"expected one run directory in {out}, found {dirs}"
    return json.loads((out / dirs[0] / "result.json").read_text())


def nothing_of(pid: int) -> None:
    assert not [lo for lo in list_leftovers() if lo.creator_pid == pid]


# -- A: late interrupts ---------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_a_double_ctrl_c_keeps_the_completed_entry(cli, tmp_path):
    """The second Ctrl-C, 35 ms after the first, used to tear the writing: nothing kept."""
    run = cli(*bench_args(tmp_path, 2, "spin,sem"))
    run.wait_for("[2/2] sem")
    run.ctrl_c()
    time.sleep(0.035)
    run.ctrl_c()
    rc, out, err = run.finish()
    assert rc == 130, err
    result = result_of(tmp_path)
    assert result["interrupted"] is True
    (kept,) = result["scenarios"]
    assert kept["transport"] == "spin" and kept["metrics"]["roundtrip"]["count"] > 0, err
    assert "Traceback" not in err
    nothing_of(run.proc.pid)


@pytest.mark.multiprocess
@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM],
                                     [signal.SIGINT, signal.SIGINT, signal.SIGTERM]])
def test_signals_after_the_last_entry_interrupt_nothing(cli, tmp_path, signals):
    """Signals while the results are written: every entry is kept, the run is not
    'interrupted' and its status says so (it used to lose everything, or exit 130/143 with
    "interrupted": false)."""
    run = cli(*bench_args(tmp_path, 0.3), env={"ASIRT_TEST_PAUSE": "write:2"})
    run.wait_for("asirt: test pause: write")
    for sig in signals:
        (run.ctrl_c if sig == signal.SIGINT else lambda: run.kill(sig))()
        time.sleep(0.01)
    rc, out, err = run.finish()
    assert rc == 0, err
    result = result_of(tmp_path)
    assert result["interrupted"] is False and len(result["scenarios"]) == 1
    assert "nothing was interrupted, every entry was kept" in err
    assert "run directory:" in out


@pytest.mark.multiprocess
def test_signals_while_an_interrupted_run_is_written_change_nothing(cli, tmp_path):
    run = cli(*bench_args(tmp_path, 30), env={"ASIRT_TEST_PAUSE": "write:2"})
    run.wait_for("[1/1]")
    time.sleep(0.5)
    run.ctrl_c()
    run.wait_for("asirt: test pause: write")
    run.kill(signal.SIGTERM)
    run.ctrl_c()
    rc, out, err = run.finish()
    assert rc == 130, err
    assert result_of(tmp_path)["interrupted"] is True
    assert "ignored while the results were kept" in err


@pytest.mark.multiprocess
def test_sigterm_after_main_returned_keeps_its_status(cli, tmp_path):
    """SIGTERM used to exit 143 once main had restored its default action, and the
    interpreter's finalization restores it too (a storm of SIGINT and SIGTERM at the very end
    gave 143 or 130): from the chosen status on both are ignored."""
    run = cli(*bench_args(tmp_path, 0.3), env={"ASIRT_TEST_PAUSE": "exit:2"})
    run.wait_for("asirt: test pause: exit")
    run.kill(signal.SIGTERM)
    run.kill(signal.SIGINT)
    run.kill(signal.SIGTERM)
    rc, out, err = run.finish()
    assert rc == 0, err
    assert result_of(tmp_path)["interrupted"] is False


def test_importing_the_entry_point_imports_nothing_heavy():
    code = "import sys, asirt, asirt.__main__; print(sorted(m for m in sys.modules if m in " \
           "('numpy', 'psutil', 'posix_ipc', 'asirt.cli', 'shm_layout')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res


def _wait_for_mapping(pid: int, library: str, timeout: float = 60) -> None:
    """Until process ``pid`` has mapped ``library``: it is importing the module that loads it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/maps") as f:
            if library in f.read():
                return
        time.sleep(0.001)
    raise AssertionError(f"{library} never loaded")


@pytest.mark.multiprocess
@pytest.mark.parametrize("library", ["_multiarray_umath", "posix_ipc"])
def test_a_ctrl_c_during_the_imports_exits_130_quietly(cli, tmp_path, library):
    """Ctrl-C while numpy (then posix_ipc) is being imported used to print a traceback."""
    run = cli(*bench_args(tmp_path, 30))
    _wait_for_mapping(run.proc.pid, library)
    run.ctrl_c()
    rc, out, err = run.finish()
    assert "Traceback" not in err, err
    assert rc == 130, (rc, err)
    nothing_of(run.proc.pid)


# -- D: output that cannot be written ------------------------------------------------------
def fake_entry(i: int, p50_ns: int = 500) -> Entry:
    counts = np.zeros(histogram.NBUCKETS, np.int64)
    counts[histogram.bucket_index(p50_ns)] = 100
    return Entry("pingpong", "-", f"fake{i}", [0, 1], 0.1, hists={"roundtrip": counts})


@pytest.fixture
def fake_bench(monkeypatch, tmp_path):
    """'asirt bench fake': entries made in-process (no worker), to see what becomes of them;
    the system temporary directory is the test's own."""
    def install(*entries_then_error) -> None:
        def run(topo, opts, progress):
            for item in entries_then_error:
                if isinstance(item, Exception):
                    raise item
                yield item
        monkeypatch.setitem(scenarios.SCENARIOS, "fake", scenarios.Scenario(
            "fake entries", lambda topo, opts: len(entries_then_error), run))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return install


def fail_writes_into(monkeypatch, *dirs: str) -> None:
    real = results.write_run

    def write_run(out_dir, result, entries):
        if any(out_dir.startswith(d) for d in dirs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), out_dir)
        return real(out_dir, result, entries)
    monkeypatch.setattr(results, "write_run", write_run)


def test_results_that_cannot_go_to_out_go_to_a_temporary_directory(
        fake_bench, monkeypatch, tmp_path, capsys):
    """A full disk after the run used to give a traceback, and every result was lost."""
    fake_bench(fake_entry(0), fake_entry(1))
    out = tmp_path / "out"
    fail_writes_into(monkeypatch, str(out))
    rc = main(["bench", "fake", "--no-floor", "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert "fake0" in cap.out and "fake1" in cap.out              # the table, first
    assert f"cannot write the run directory into --out {out}" in cap.err
    assert "No space left on device" in cap.err
    (fallback,) = (tmp_path / "tmp").iterdir()
    (run_dir,) = fallback.iterdir()
    assert f"went to {run_dir} instead" in cap.err and f"run directory: {run_dir}" in cap.out
    assert len(json.loads((run_dir / "result.json").read_text())["scenarios"]) == 2


def test_results_that_cannot_be_written_anywhere_go_to_stderr(
        fake_bench, monkeypatch, tmp_path, capsys):
    fake_bench(fake_entry(0))
    fail_writes_into(monkeypatch, str(tmp_path))
    rc = main(["bench", "fake", "--no-floor", "--quiet", "--out", str(tmp_path / "out"),
               "--json"])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    shown = json.loads(cap.out)
    dumped = json.loads(cap.err[cap.err.index("\n{") + 1:])
    assert shown == dumped and len(dumped["scenarios"]) == 1
    assert os.listdir(tmp_path / "tmp") == []                      # no empty fallback left


def test_an_error_after_an_entry_keeps_it(fake_bench, tmp_path, capsys):
    fake_bench(fake_entry(0), ShmUnavailable("/dev/shm", "has no room", "make room"))
    rc = main(["bench", "fake", "--no-floor", "--quiet", "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert rc == 2 and "/dev/shm has no room" in cap.err
    result = result_of(tmp_path / "out")
    assert len(result["scenarios"]) == 1 and "has no room" in result["error"]


ROOT = os.getuid() == 0


@pytest.mark.multiprocess
@pytest.mark.skipif(not ROOT, reason="needs root to mount a small tmpfs")
@pytest.mark.parametrize("how", ["full", "read-only during the run"])
def test_an_out_that_fails_for_real_keeps_the_results(tmp_path, how):
    """--out on a 4 KiB tmpfs (no room for the files), or one remounted read-only while the
    CLI is about to write (ASIRT_TEST_PAUSE=write), in a mount namespace of its own."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    cmd = f"{sys.executable} -m asirt {' '.join(bench_args(out, 0.2))} --quiet"
    if how == "full":
        script = f"mount -t tmpfs -o size=4k tmpfs {out} || exit 99; {cmd}"
    else:
        script = (f"mount -t tmpfs -o size=1m tmpfs {out} || exit 99; "
                  f"ASIRT_TEST_PAUSE=write:3 {cmd} 2>{tmp_path}/err & pid=$!; "
                  f"while ! grep -q 'test pause' {tmp_path}/err; do sleep 0.02; done; "
                  f"mount -o remount,ro {out}; wait $pid; rc=$?; cat {tmp_path}/err >&2; "
                  "exit $rc")
    res = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.getcwd()})
    if res.returncode == 99 or "unshare:" in res.stderr:
        pytest.skip(f"cannot mount here: {res.stderr.strip()}")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "cannot write the run directory into --out" in res.stderr
    assert ("No space left on device" if how == "full" else "Read-only file system") in res.stderr
    assert "roundtrip" in res.stdout
    (fallback,) = tmp.iterdir()
    (run_dir,) = fallback.iterdir()
    assert json.loads((run_dir / "result.json").read_text())["scenarios"]


# -- D: report and compare on what is not a run ---------------------------------------------
def write_fake_run(where, entries: list[Entry]) -> str:
    result = results.build_result(f"run-{len(entries)}", "now", {"emulated": True},
                                  {"warnings": []}, {}, entries)
    return results.write_run(str(where), result, entries)


def _spoil(run_dir: str, content: object) -> None:
    path = Path(run_dir) / "result.json"
    if content in ("scenarios-count", "scenarios-cpus", "kvm-empty"):
        result = json.loads(path.read_text())
        if content == "scenarios-count":
            result["scenarios"][0]["metrics"]["roundtrip"]["count"] = "many"
        elif content == "kvm-empty":           # a kvm entry the strategy table cannot read
            result["scenarios"][0].update(scenario="kvm", kvm={})
        else:
            result["scenarios"][0]["cpus"] = [True]
        content = result
    path.unlink()
    if content == "a directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))


@pytest.mark.parametrize("content,needle", [
    (None, "schema_version null"),
    ([], "schema_version []"),
    ({"schema_version": SCHEMA_VERSION}, "has no 'run_id'"),
    ({"schema_version": SCHEMA_VERSION, "run_id": "r", "started_at": "t", "host": None,
      "topology": {}, "scenarios": []}, "result.host is NoneType"),
    ("scenarios-count", 'result.scenarios[0].metrics.roundtrip.count is "many"'),
    ("scenarios-cpus", "result.scenarios[0].cpus[0] is true"),
    ("kvm-empty", "result.scenarios[0].kvm has no 'guest_fraction'"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "is not JSON"),
    (b"\xff\xfe{}", "is not JSON"),
    (b"[" * 100000, "is not JSON"),
    ("a directory", "cannot be read"),
])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_refuse_what_is_not_a_run(tmp_path, capsys, content, needle, command):
    good = write_fake_run(tmp_path / "good", [fake_entry(0)])
    bad = write_fake_run(tmp_path / "bad", [fake_entry(0)])
    _spoil(bad, content)
    rc = main(["report", bad] if command == "report" else ["compare", good, bad])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and bad in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["report", "compare"])
def test_result_json_given_for_its_directory_is_refused_naming_the_directory(
        tmp_path, capsys, command):
    run_dir = write_fake_run(tmp_path, [fake_entry(0)])
    path = os.path.join(run_dir, "result.json")
    rc = main(["report", path] if command == "report" else ["compare", path, run_dir])
    err = capsys.readouterr().err
    assert rc == 2 and f"pass the directory that holds it: {run_dir}" in err, err


def test_a_result_json_of_the_previous_schema_is_refused_not_migrated(tmp_path, capsys):
    """Schema 1 stored neither an entry's label nor its unsafe verdict: compare and report
    refuse such a file (exit 2, re-run it) instead of guessing them (STYLE: no
    compatibility layers)."""
    a = write_fake_run(tmp_path / "a", [fake_entry(0)])
    b = write_fake_run(tmp_path / "b", [fake_entry(0, p50_ns=400)])
    path = Path(a) / "result.json"
    old = json.loads(path.read_text())
    old["schema_version"] = 1
    del old["scenarios"][0]["label"], old["scenarios"][0]["unsafe"]
    path.write_text(json.dumps(old))
    assert main(["compare", a, b]) == 2
    err = capsys.readouterr().err
    assert "schema_version 1 is not 2" in err and "re-run" in err, err


def test_compare_with_a_p50_of_zero(tmp_path, capsys):
    a = write_fake_run(tmp_path / "a", [fake_entry(0, p50_ns=0)])
    b = write_fake_run(tmp_path / "b", [fake_entry(0, p50_ns=400)])
    assert main(["compare", a, b]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "fake0" in line]
    assert row and row[0].split()[7] == "-", row


@pytest.mark.multiprocess
@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_reader_that_stops_reading_is_not_an_error(tmp_path, command):
    """'asirt report RUN | head' used to end in a BrokenPipeError traceback."""
    run_dir = write_fake_run(tmp_path, [fake_entry(i) for i in range(3000)])
    args = [run_dir] if command == "report" else [run_dir, run_dir]
    proc = subprocess.Popen([sys.executable, "-m", "asirt", command, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                    # what head does after its lines
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


# -- E: verdicts and inputs -----------------------------------------------------------------
def test_a_fault_never_injected_is_not_called_undetected():
    scenario = {"label": "stress-strict-spin-cpu0_1", "scenario": "stress", "strategy": "strict",
                "transport": "spin", "cpus": [0, 1], "unsafe": False, "metrics": {}, "faults": [
                    {"fault": "kill", "cpu": 1, "injected": False, "detected": False},
                    {"fault": "stop", "cpu": 1, "injected": True, "detected": False},
                    {"fault": "delay", "cpu": 1, "injected": True, "detected": True,
                     "detect_after_ms": 3.5}]}
    rows = {line.split("  ")[-1].strip(): line
            for line in results.format_table([scenario]).splitlines()[2:]}
    assert "fault kill cpu 1" in rows["not injected"]
    assert "fault stop cpu 1" in rows["NOT DETECTED"]
    assert "fault delay cpu 1" in rows["detected in 3.5 ms"]


def _refused(argv: list[str], capsys) -> str:
    t0 = time.monotonic()
    try:
        rc = main(argv)
    except SystemExit as exit_:          # argparse's own refusals
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert time.monotonic() - t0 < 20, "it ran before refusing"
    return err


@pytest.mark.parametrize("text,needle", [
    ("1_0", "is not a number of seconds"),       # float() reads 10
    ("\uff12", "is not a number of seconds"),    # fullwidth 2: float() reads 2
    ("inf", "is not a number of seconds"),
    ("1e308", "outside 0.01..86400 s"),
    ("86401", "outside 0.01..86400 s"),
    ("1e-9", "outside 0.01..86400 s"),           # entries with no sample, no warning
    ("0.001", "outside 0.01..86400 s"),
])
@pytest.mark.parametrize("command", ["bench", "stress"])
def test_absurd_durations_are_refused(tmp_path, capsys, text, needle, command):
    err = _refused([command, "--duration", text, "--out", str(tmp_path)], capsys)
    assert "--duration" in err and needle in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["bench", "stress"])
def test_an_empty_cpu_list_is_refused(tmp_path, capsys, command):
    """--cpus "" used to mean every CPU."""
    err = _refused([command, "--cpus", "", "--duration", "30", "--out", str(tmp_path)], capsys)
    assert "--cpus" in err and "empty" in err, err


def test_an_entry_with_no_sample_is_warned_about(fake_bench, tmp_path, capsys, monkeypatch):
    from asirt import plot
    monkeypatch.setattr(plot, "available", lambda: False)   # it warns of an empty legend
    empty = fake_entry(0)
    empty.hists["roundtrip"][:] = 0
    fake_bench(empty)
    assert main(["bench", "fake", "--no-floor", "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert "pingpong-fake0-cpu0_1 recorded no sample in 0.1 s" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_a_run_on_cpus_another_run_uses_is_warned_about(fake_bench, tmp_path, capsys):
    """Two runs on the same CPUs used to share them in silence."""
    a, b = CPUS[0], CPUS[-1]
    code = ("import sys; from shm_layout import Region, Section; "
            "r = Region.create([Section('slots', 2)]); s = r.array('slots'); "
            f"s[0]['cpu'], s[1]['cpu'] = {a}, {b}; del s; print(r.name, flush=True); "
            "sys.stdin.read(); r.close(); r.unlink()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        name = other.stdout.readline().strip()
        fake_bench(fake_entry(0))
        rc = main(["bench", "fake", "--no-floor", "--quiet", "--cpus", f"{a}",
                   "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert (f"WARNING: another asirt run (pid {other.pid}, segment {name}) is using CPUs "
                f"{a} too") in err, err
        assert any(name in w for w in result_of(tmp_path / "o")["system"]["warnings"])
    finally:
        other.stdin.close()
        other.wait(timeout=60)
        other.stdout.close()


# -- G: kill -9 of the CLI itself -----------------------------------------------------------
def _descendants_once(run: Cli, what: str, timeout: float = 90) -> list[psutil.Process]:
    """Every descendant of the CLI, once one whose command line contains ``what`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(run.proc.pid).children(recursive=True)
        with contextlib.suppress(psutil.Error):
            if any(what in " ".join(k.cmdline()) for k in kids):
                return kids
        assert run.proc.poll() is None, "".join(run.err)
        time.sleep(0.02)
    raise AssertionError(f"no {what!r} under the CLI: {''.join(run.err)}")


def _killed(run: Cli, what: str) -> int:
    """kill -9 the CLI once ``what`` runs under it; check every descendant died with it."""
    kids = _descendants_once(run, what)
    run.proc.kill()
    run.proc.wait()
    alive = psutil.wait_procs(kids, timeout=15)[1]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not alive, f"outlived the CLI: {alive}"
    return run.proc.pid


def _floor_dirs(pid: int) -> list[str]:
    return [d for d in os.listdir(tempfile.gettempdir()) if d.startswith(f"asirt-floor-{pid}-")]


def _nothing_left(pid: int) -> None:
    nothing_of(pid)
    assert not _floor_dirs(pid)


needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler")


def floor_args(out, duration: float) -> list[str]:
    """A pingpong bench that measures the C floor first."""
    return [a for a in bench_args(out, duration) if a != "--no-floor"]


@pytest.mark.multiprocess
@needs_cc
@pytest.mark.parametrize("during", ["floor", "workers"])
def test_kill_9_of_bench_then_cleanup_leaves_nothing(cli, tmp_path, during):
    pid = _killed(cli(*floor_args(tmp_path, 30)), "/floor " if during == "floor" else "-m workers")
    assert _floor_dirs(pid) or list_leftovers(), "nothing was left to reclaim"
    res = subprocess.run([sys.executable, "-m", "asirt", "cleanup"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    _nothing_left(pid)


@pytest.mark.multiprocess
@needs_cc
def test_kill_9_during_the_floor_then_the_next_run_reclaims_it(cli, tmp_path):
    pid = _killed(cli(*floor_args(tmp_path, 30)), "/floor ")
    assert _floor_dirs(pid)
    res = subprocess.run([sys.executable, "-m", "asirt", *floor_args(tmp_path / "next", 0.2)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    _nothing_left(pid)


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_kill_9_of_stress_then_the_next_run_reclaims_everything(cli, tmp_path):
    run = cli("stress", "--duration", "30", "--cpus", PAIR, "--out", str(tmp_path))
    pid = _killed(run, "-m workers")
    assert [lo for lo in list_leftovers() if lo.creator_pid == pid], "nothing was left"
    res = subprocess.run([sys.executable, "-m", "asirt", *bench_args(tmp_path / "next", 0.2)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    _nothing_left(pid)
