"""The command line against a hostile user: signals at the worst moments, kill -9, output
that cannot be written, input files of the wrong shape, a reader that stops reading.

Signals are sent at chosen moments: after a progress line, or while the CLI sleeps in a
test pause (ASIRT_TEST_PAUSE=<phase>:<seconds>, asirt.cli.pause_for_tests).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from shm_layout.region import list_leftovers

pytestmark = [pytest.mark.timeout(180), pytest.mark.multiprocess]

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


def test_sigterm_after_main_returned_keeps_its_status(cli, tmp_path):
    """SIGTERM used to exit 143 once main had restored its default action."""
    run = cli(*bench_args(tmp_path, 0.3), env={"ASIRT_TEST_PAUSE": "exit:2"})
    run.wait_for("asirt: test pause: exit")
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
