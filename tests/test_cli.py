"""The command line as a user runs it: exit codes, run directories, Ctrl-C, kill -9."""
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

from asirt import cli
from asirt.cli import main
from asirt.scenarios import stress
from asirt.errors import AsirtError, BadInput, FeatureMissing, LayoutMismatch, SegmentMissing
from asirt.topology import format_cpu_list, read_topology
from shm_layout import list_leftovers
from tests.sysfs import make_sysfs

pytestmark = pytest.mark.timeout(180)


def asirt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asirt", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["bench", "--cpus", "0-999"], "--cpus"),
    (["bench", "--cpus", "1-0"], "--cpus"),
    (["bench", "--cpus", "zero"], "--cpus"),
    (["bench", "--duration", "0"], "--duration"),
    (["bench", "--duration", "-1"], "--duration"),
    (["bench", "--duration", "nan"], "--duration"),
    (["bench", "--duration", "soon"], "--duration"),
    (["bench", "--transport", "carrier-pigeon"], "--transport"),
    (["bench", "no-such-scenario"], "no-such-scenario"),
    (["bench", "--topology", "emulated:99"], "--topology"),
    (["bench", "--topology", "sideways"], "--topology"),
    (["topology", "--sysfs-root", "/nonexistent"], "/nonexistent"),
    (["report", "/nonexistent"], "/nonexistent"),
])
def test_bad_input_exits_2_and_names_the_input(args, needle, tmp_path, capsys):
    try:
        rc = main([*args, "--out", str(tmp_path)] if args[0] == "bench" else args)
    except SystemExit as exit_:   # argparse's own refusals
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert os.listdir(tmp_path) == []          # nothing half-written


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_unusable_out_is_refused_before_anything_runs(kind, tmp_path, capsys):
    if kind == "file":
        out = tmp_path / "a-file"
        out.write_text("not a directory\n")
    else:
        out = "/proc/self"          # exists, but no directory can be made in it
    before = sorted(os.listdir(tmp_path))
    t0 = time.monotonic()
    rc = main(["bench", "pingpong", "--duration", "30", "--no-floor", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"--out {out}" in err and "pass a directory" in err
    assert time.monotonic() - t0 < 15, "the benchmark ran before --out was checked"
    assert sorted(os.listdir(tmp_path)) == before       # nothing written


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_cpus_narrows_the_system_report_and_config(tmp_path, monkeypatch, capsys):
    """--cpus A,B: the config, the isolation and governor warnings name A,B only, not every
    allowed CPU (a fake tree of the allowed CPUs plus two more, A,B isolated)."""
    allowed = sorted(os.sched_getaffinity(0))
    a, b = allowed[:2]
    extra = [allowed[-1] + 1, allowed[-1] + 2]
    root = make_sysfs(tmp_path / "sys", [[c] for c in allowed + extra], governor="powersave",
                      isolated=format_cpu_list([a, b]), nohz_full=format_cpu_list([a, b]))
    monkeypatch.setattr(cli, "read_topology", lambda: read_topology(root))
    out = tmp_path / "runs"
    rc = main(["bench", "pingpong", "--cpus", f"{a},{b}", "--transport", "spin", "--no-floor",
               "--duration", "0.2", "--out", str(out), "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["config"]["cpus"] == [a, b]
    assert {c for s in result["scenarios"] for c in s["cpus"]} == {a, b}
    warnings = result["system"]["warnings"]
    assert not any("isolated" in w or "nohz_full" in w for w in warnings), warnings
    (gov,) = [w for w in warnings if "governor" in w]
    assert f"CPUs {format_cpu_list([a, b])} is 'powersave'" in gov
    assert sorted(result["system"]["governors"]) == sorted(map(str, (a, b)))


@pytest.mark.multiprocess
def test_asi_records_an_assumed_l1d_as_assumed(tmp_path, monkeypatch, capsys):
    """No L1D size in sysfs: l1d_bytes is null (not uarch's default dressed up as read),
    l1d_assumed is true and the run warns."""
    allowed = sorted(os.sched_getaffinity(0))
    root = make_sysfs(tmp_path / "sys", [[c] for c in allowed], l1d=None)
    monkeypatch.setattr(cli, "read_topology", lambda: read_topology(root))
    rc = main(["bench", "asi", "--duration", "0.3", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "WARNING: sysfs does not give the L1D size" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    (entry,) = json.loads((run_dir / "result.json").read_text())["scenarios"]
    assert entry["l1d_bytes"] is None and entry["l1d_assumed"] is True
    from asirt.cpu.buffer import DEFAULT_L1D
    assert f"assumed {DEFAULT_L1D // 1024} KiB" in entry["warnings"][0]


@pytest.mark.parametrize("error,code", [
    (AsirtError("an internal error"), 1),
    (BadInput("--thing", "is wrong", "fix it"), 2),
    (FeatureMissing("a feature", "absent", "install it"), 2),
    (SegmentMissing("/asirt-gone"), 2),
    (LayoutMismatch("/asirt-x", "magic", 1, 2), 2),
])
def test_exit_code_of_each_error(error, code, monkeypatch, capsys):
    """Only bad input exits 2; an internal error is not the user's fault."""
    def fail(args):
        raise error
    monkeypatch.setitem(cli.COMMANDS, "cleanup", fail)
    assert main(["cleanup"]) == code
    assert capsys.readouterr().err == f"asirt: error: {error}\n"


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["bench", "--no-such-flag"])
    assert info.value.code == 2


def test_topology_json_on_this_host(capsys):
    assert main(["topology", "--json"]) == 0
    topo = json.loads(capsys.readouterr().out)
    for key in ("cores", "smt", "emulated", "allowed_cpus"):
        assert key in topo
    assert set(topo["allowed_cpus"]) <= set(os.sched_getaffinity(0))


@pytest.mark.multiprocess
def test_bench_pingpong_writes_a_run_directory(tmp_path):
    res = asirt("bench", "pingpong", "--duration", "0.3", "--out", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    (run_dir,) = [p for p in tmp_path.iterdir()]
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert (run_dir / "summary.csv").read_text().startswith("scenario,strategy,transport")
    transports = {s["transport"] for s in result["scenarios"]}
    assert {"spin", "signal", "sem"} <= transports
    for s in result["scenarios"]:
        m = s["metrics"]["roundtrip"]
        assert m["count"] > 0 and m["p50"] <= m["p99"] <= m["max"]
        assert (run_dir / f"pingpong-{s['transport']}-cpu{'_'.join(map(str, s['cpus']))}"
                f"-roundtrip.hgrm").exists()
    for key in ("schema_version", "run_id", "started_at", "host", "topology", "system",
                "config", "scenarios"):
        assert key in result
    if not result["topology"]["smt"]:
        assert result["topology"]["emulated"] is True
        assert "emulated sibling grouping" in res.stderr
    assert result["config"]["clock"]["read_overhead_ns"] > 0
    # the other commands read what bench wrote
    rep = asirt("report", str(run_dir), "--plot")
    assert rep.returncode == 0 and "spin" in rep.stdout
    from asirt import plot
    if plot.available():
        assert (run_dir / "roundtrip.png").stat().st_size > 0
    rep = asirt("report", str(run_dir), "--json", "--plot")   # stdout is the JSON alone
    assert rep.returncode == 0 and json.loads(rep.stdout) == result, rep.stdout
    cmp_ = asirt("compare", str(run_dir), str(run_dir))
    assert cmp_.returncode == 0 and cmp_.stdout.count("1.00") >= 2 * len(result["scenarios"])


class LongBench:
    """A long ``asirt bench`` in a child process, its workers once they run, and a guard that
    kills the whole process group if the test fails half-way. Its stderr is read line by line
    as it comes (``wait_for_stderr``)."""

    def __init__(self, out, transport: str = "spin", duration: float = 20,
                 args: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asirt", "bench", "pingpong", "--duration", str(duration), "--no-floor",
             "--transport", transport, "--out", str(out), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.workers = self._wait_for_workers(2)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.err_lines.append(line)

    def wait_for_stderr(self, prefix: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in list(self.err_lines)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        raise AssertionError(f"no stderr line starting {prefix!r}: {''.join(self.err_lines)}")

    def _wait_for_workers(self, n: int, timeout: float = 60) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = [c for c in psutil.Process(self.proc.pid).children()
                    if "workers" in " ".join(c.cmdline())]
            if len(kids) >= n:
                return kids
            time.sleep(0.05)
        self.close()
        raise AssertionError("workers never started")

    def finish(self) -> str:
        """Wait for the CLI to exit; its output (stderr, then stdout)."""
        self.proc.wait(timeout=60)
        out = self.proc.stdout.read()
        self._reader.join(timeout=10)
        return f"{''.join(self.err_lines)}\n--- stdout:\n{out}"

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def assert_nothing_left(self) -> None:
        # generous: under load a worker may still be starting Python when the CLI exits, and
        # it ends itself (PR_SET_PDEATHSIG, or the parent check right after it) once it runs
        assert not psutil.wait_procs(self.workers, timeout=30)[1], "a worker outlived the CLI"
        assert not [lo for lo in list_leftovers() if lo.creator_pid == self.proc.pid]


@pytest.fixture
def long_bench(tmp_path):
    runs = []

    def start(transport: str = "spin", **kwargs) -> LongBench:
        runs.append(LongBench(tmp_path, transport, **kwargs))
        return runs[-1]
    yield start
    for run in runs:
        run.close()


def _result(tmp_path, err: str = "") -> dict:
    dirs = list(tmp_path.iterdir())
    assert len(dirs) == 1, f"expected one run directory, found {dirs}; stderr: {err}"
    (run_dir,) = dirs
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_ctrl_c_cleans_up_and_keeps_completed_entries(long_bench, tmp_path):
    a, b = sorted(os.sched_getaffinity(0))[:2]      # one pair: entry 1 spin, entry 2 sem
    run = long_bench("spin,sem", duration=2, args=("--cpus", f"{a},{b}"))
    run.wait_for_stderr("[2/2] sem")               # the spin entry is done, sem is starting
    os.killpg(run.proc.pid, signal.SIGINT)       # what a terminal's Ctrl-C does
    err = run.finish()
    assert run.proc.returncode == 130, err
    run.assert_nothing_left()
    result = _result(tmp_path, err)
    assert result["interrupted"] is True
    (kept,) = result["scenarios"]
    assert kept["transport"] == "spin" and kept["cpus"] == [a, b], err
    assert kept["metrics"]["roundtrip"]["count"] > 0 and not kept["failures"]


@pytest.mark.multiprocess
def test_sigterm_cleans_up(long_bench, tmp_path):
    run = long_bench()
    run.proc.terminate()
    err = run.finish()
    assert run.proc.returncode == 130, err
    run.assert_nothing_left()
    assert _result(tmp_path, err)["interrupted"] is True


@pytest.mark.multiprocess
def test_kill_9_of_a_worker_is_reported_by_cpu(long_bench, tmp_path):
    run = long_bench()
    time.sleep(0.5)
    victim = run.workers[-1]
    cpu = victim.cmdline()[victim.cmdline().index("--cpu") + 1]
    victim.kill()
    err = run.finish()
    assert run.proc.returncode == 1, err
    assert f"worker on CPU {cpu} was killed by SIGKILL" in err
    run.assert_nothing_left()
    assert any(s["failures"] for s in _result(tmp_path)["scenarios"])


@pytest.mark.multiprocess
def test_kill_9_of_the_cli_kills_workers_and_next_run_reclaims(long_bench):
    run = long_bench()
    run.proc.kill()
    run.proc.communicate()
    # PR_SET_PDEATHSIG: the kernel kills the orphans.
    assert not psutil.wait_procs(run.workers, timeout=10)[1]
    # Its segment and semaphores stay behind (another asirt run on this machine may already
    # have reclaimed them: every run reclaims those of dead creators when it starts).
    left = [lo for lo in list_leftovers() if lo.creator_pid == run.proc.pid]
    assert not any(lo.alive for lo in left)
    res = asirt("cleanup")
    assert res.returncode == 0
    if left:
        assert "removed segment" in res.stdout
    run.assert_nothing_left()


@pytest.mark.multiprocess
def test_bench_asi_writes_every_metric(tmp_path):
    res = asirt("bench", "asi", "--duration", "0.5", "--out", str(tmp_path), "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(res.stdout)["scenarios"]
    assert set(entry["metrics"]) == {"walk_tlb_hit", "walk_full", "asi_exit_enter",
                                     "fault_retry", "flush", "shootdown"}
    assert all(m["count"] > 0 for m in entry["metrics"].values())
    assert entry["counters"]["asi.faults"] > 0 and entry["counters"]["asi.flushes"] > 0


@pytest.mark.multiprocess
def test_bench_stun_both_protocols(tmp_path):
    res = asirt("bench", "stun", "--duration", "0.5", "--transport", "spin", "--no-floor",
                "--out", str(tmp_path), "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    by = {s["strategy"]: s for s in json.loads(res.stdout)["scenarios"]}
    assert set(by) == {"strict", "naive"}
    assert by["strict"]["metrics"]["stun_roundtrip"]["count"] > 0
    assert by["strict"]["counters"]["violations"] == 0
    assert "exposure_window" in by["naive"]["metrics"]


@pytest.mark.multiprocess
def test_stress_strict_is_clean_and_naive_is_caught_on_the_same_seed(tmp_path):
    """The CLI form of the done criterion (README has the 10-million-transition command)."""
    res = asirt("stress", "--protocol", "strict,naive", "--transitions", "50000", "--seed", "7",
                "--out", str(tmp_path), "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    by = {s["strategy"]: s for s in json.loads(res.stdout)["scenarios"]}
    assert by["strict"]["counters"]["cpu.transitions"] >= 50000
    assert by["strict"]["counters"]["violations"] == 0 and by["strict"]["ok"]
    assert by["naive"]["counters"]["violations"] > 0
    assert by["naive"]["violations"], "violations are listed with time and source"


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault", stress.FAULTS)
def test_stress_judges_each_fault_end_to_end(tmp_path, fault):
    """Every --faults value as a user runs it: exit 0, the fault's row in the printed table
    says it was detected, and result.json says the same (a delay fault once crashed the table
    with KeyError 'detect_after_ms')."""
    res = asirt("stress", "--duration", "2", "--faults", fault, "--out", str(tmp_path),
                "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    (row,) = [line for line in res.stdout.splitlines() if f" fault {fault} " in line]
    assert row.split("  ")[-1].strip().startswith("detected"), row
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (entry,) = json.loads((run_dir / "result.json").read_text())["scenarios"]
    (f,) = entry["faults"]
    assert f["fault"] == fault and f["injected"] and f["detected"], f
    assert entry["failures"] == [] and entry["ok"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("args", [("--barrier", "rendezvous"), ("--transport", "signal"),
                                  ("--transport", "sem")])
def test_stress_with_each_barrier_and_transport_end_to_end(tmp_path, args):
    res = asirt("stress", *args, "--duration", "1.5", "--out", str(tmp_path), "--json",
                "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    (entry,) = json.loads(res.stdout)["scenarios"]
    if args[0] == "--barrier":
        assert entry["barrier"] == "rendezvous" and entry["counters"]["barrier.rv_rounds"] > 0
    else:
        assert entry["transport"] == args[1]
    assert entry["counters"]["violations"] == 0 and entry["counters"]["stun.requests"] > 0
    assert entry["ok"]


@pytest.mark.multiprocess
def test_an_unsafe_protocol_that_shows_nothing_without_delays_fails(tmp_path):
    """--no-delays used to switch the rule off: a naive run that showed nothing passed."""
    res = asirt("stress", "--protocol", "naive", "--no-delays", "--transitions", "2",
                "--out", str(tmp_path), "--quiet")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "proves nothing about the checkers" in res.stderr and "drop --no-delays" in res.stderr


@pytest.mark.multiprocess
def test_stress_workers_in_all_in_cores_of_k_siblings(tmp_path):
    """--workers N is the number of vCPU workers in all; --topology emulated:K makes cores of
    K siblings even with fewer CPUs than K (oversubscribed)."""
    res = asirt("stress", "--workers", "8", "--topology", "emulated:4", "--cpus", "0,1",
                "--duration", "1", "--out", str(tmp_path), "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(res.stdout)["scenarios"]
    assert entry["lanes"] == [[0, 1, 0, 1], [0, 1, 0, 1]] and entry["workers"] == 8
    assert entry["oversubscribed"] and entry["cpus"] == [0, 1]


@pytest.mark.parametrize("args,needle", [
    (["--workers", "6", "--topology", "emulated:4"], "need a multiple of 4; choose --workers 8"),
    (["--workers", "2", "--faults", "kill,stop"], "2 cores (one per fault) need 4"),
    (["--topology", "emulated:9"], "K must be between 2 and 8"),
    (["--workers", "100000"], "more than 1024 worker processes"),
])
def test_stress_workers_that_fill_no_whole_cores_are_refused(args, needle, tmp_path, capsys):
    rc = main(["stress", *args, "--cpus", "0,1", "--duration", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert os.listdir(tmp_path) == []


def test_a_violation_under_a_safe_protocol_fails_the_run():
    """The exit-status rule itself: it must fail on what it is there to catch, and result.json's
    ``ok`` says the same thing as the exit status."""
    from asirt.results import Entry, check_problems
    clean = Entry("stun", "strict", "spin", [0, 1], 1.0, counters={"violations": 0},
                  claims_safety=True)
    assert check_problems([clean]) == [] and clean.to_json()["ok"] is True
    bad = Entry("stun", "strict", "spin", [0, 1], 1.0, counters={"violations": 3},
                claims_safety=True)
    unsafe = Entry("stun", "naive", "spin", [0, 1], 1.0, counters={"violations": 3},
                   claims_safety=False)
    stalled = Entry("stress", "naive", "spin", [0, 1], 1.0, problems=["liveness: STALL"])
    assert len(check_problems([bad, unsafe, stalled])) == 2
    assert "claims safety" in check_problems([bad])[0]
    assert bad.to_json()["ok"] is False and unsafe.to_json()["ok"] is True
    assert stalled.to_json()["ok"] is False
