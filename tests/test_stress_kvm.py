"""``asirt stress --strategy``: the KVM vCPU loop under injected delays, shootdowns and faults,
end to end through the CLI as a user runs it (asirt.scenarios.stress.run_kvm_stress).

Every strategy once (each claim held: the safe ones show no leak and no violation, the unsafe
ones show some); the two broken on purpose fail the run; every fault on a strategy that waits
for its siblings (stuns, the barrier) is detected; under one that never waits the faults are
survived and judged by the survivors; real vCPUs where /dev/kvm works; bad input exits 2.
Every run must leave nothing in /dev/shm (tests/plugin.py checks every test; here by name).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asirt.kvm.strategy import NAMES
from asirt.scenarios.faults import FAULTS

pytestmark = [pytest.mark.multiprocess, pytest.mark.requires_cpus(2), pytest.mark.timeout(240)]


def _stress(tmp_path, *args: str, timeout: float = 200) -> tuple[subprocess.CompletedProcess,
                                                                  list[dict]]:
    argv = [sys.executable, "-m", "asirt", "stress", *args, "--out", str(tmp_path), "--json"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    mine = f"asirt-{proc.pid}-"
    assert not [n for n in os.listdir("/dev/shm") if mine in n]
    res = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    return res, json.loads(out)["scenarios"] if out.startswith("{") else []


def _table(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """The CLI's table on stdout; stderr keeps the guest line and the verdict, not progress."""
    argv = [sys.executable, "-m", "asirt", "stress", *args, "--out", str(tmp_path), "--quiet"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=200)


def test_every_strategy_under_stress_holds_its_claim(tmp_path):
    res, entries = _stress(tmp_path, "--strategy", "all", "--guest", "emulated",
                           "--duration", "1.5", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert [e["strategy"] for e in entries] == list(NAMES)
    for e in entries:
        c = e["counters"]
        assert c["kvm.cycles"] > 0 and c["monitor.samples"] > 0 and c["check.samples"] > 0, e
        assert e["problems"] == [] and e["failures"] == [], e
        if e["claims_safety"]:
            assert c["violations"] == 0 and c["check.leaks"] == 0, e["strategy"]
        else:
            assert c["violations"] > 0, e["strategy"]
    by = {e["strategy"]: e for e in entries}
    assert by["asi"]["counters"]["asi.shootdowns_sent"] > 0     # shootdowns while others walk
    assert by["none"]["counters"]["asi.shootdowns_sent"] == 0   # only ASI strategies have trees
    assert by["coresched"]["counters"]["coresched.forced_idle"] > 0
    assert "guest emulated: chosen with --guest emulated" in res.stderr


def test_the_table_names_each_strategy_and_its_verdict(tmp_path):
    res = _table(tmp_path, "--strategy", "none,asi", "--guest", "emulated", "--duration", "1")
    assert res.returncode == 0, res.stderr
    rows = [ln.split() for ln in res.stdout.splitlines()]
    assert {r[1] for r in rows if r and r[0] == "stress"} == {"none", "asi"}
    leaks = {r[1]: int(r[5]) for r in rows if len(r) > 5 and r[4] == "check.leaks"}
    assert leaks["none"] > 0 and leaks["asi"] == 0


def test_the_strategies_broken_on_purpose_fail_the_run(tmp_path):
    res = _table(tmp_path, "--strategy", "always-noflush,asi-noack", "--guest", "emulated",
                 "--duration", "2")
    assert res.returncode == 1, res.stdout + res.stderr
    for s in ("always-noflush", "asi-noack"):
        assert f"stress {s} spin" in res.stderr and "under a variant that claims safety" in \
            res.stderr, res.stderr
    (run,) = os.listdir(tmp_path)
    report = subprocess.run([sys.executable, "-m", "asirt", "report", str(tmp_path / run)],
                            capture_output=True, text=True, timeout=60)
    failed = [ln for ln in report.stdout.splitlines() if " FAILED " in ln]
    assert report.returncode == 0 and len(failed) == 2, report.stdout   # the verdict shows
    assert all("violations under a variant that claims safety" in ln for ln in failed)


def test_the_loops_own_options_reach_it(tmp_path):
    """--profile, --vms and --gadgets with --strategy (each refused without it, below)."""
    res, (e,) = _stress(tmp_path, "--strategy", "asi", "--guest", "emulated", "--profile",
                        "io-heavy", "--vms", "3", "--gadgets", "0.2", "--duration", "1.5")
    assert res.returncode == 0, res.stderr
    assert (e["profile"], e["vms"], e["gadgets"], e["guest"]) == ("io-heavy", 3, 0.2,
                                                                  "emulated")
    # restricted, a gadget loads nothing (a hit only where an exit had left the tree already)
    assert e["counters"]["asi.gadget_hits"] < e["counters"]["asi.gadgets"] / 10
    assert e["counters"]["check.leaks"] == 0 and e["ok"]


def test_the_walks_options_reach_the_loop_too(tmp_path):
    """--workers, --transport and --no-delays, shared with the handshake's walk."""
    res, (e,) = _stress(tmp_path, "--strategy", "always", "--guest", "emulated", "--workers",
                        "4", "--transport", "sem", "--no-delays", "--duration", "1.5")
    assert res.returncode == 0, res.stderr
    assert e["workers"] == 4 and e["transport"] == "sem" and e["delays"] is False
    assert e["counters"]["stun.requests"] > 0 and e["counters"]["violations"] == 0


def test_kcs_with_gadgets_claims_nothing_and_leaks(tmp_path):
    res, (e,) = _stress(tmp_path, "--strategy", "kcs", "--gadgets", "0.3", "--guest",
                        "emulated", "--duration", "2")
    assert res.returncode == 0, res.stderr
    assert e["claims_safety"] is False and e["counters"]["asi.gadget_hits"] > 0
    assert e["counters"]["check.leaks"] > 0


def test_every_fault_is_detected_where_siblings_wait(tmp_path):
    res, (e,) = _stress(tmp_path, "--strategy", "asi", "--guest", "emulated", "--faults",
                        ",".join(FAULTS), "--duration", "4", "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert [f["fault"] for f in e["faults"]] == list(FAULTS)
    assert all(f["injected"] and f["detected"] for f in e["faults"]), e["faults"]
    assert len({f["slot"] for f in e["faults"]}) == len(FAULTS)
    assert e["counters"]["violations"] == 0 and e["problems"] == [] and e["failures"] == []


def test_where_nobody_waits_the_faults_are_survived_and_said_so(tmp_path):
    res = _table(tmp_path, "--strategy", "none", "--guest", "emulated", "--faults",
                 "kill,stop,delay,corrupt", "--duration", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("nobody waits (survivors judged)") == 3, res.stdout
    assert "fault corrupt" in res.stdout and "NOT DETECTED" not in res.stdout


def test_smt_off_faults_hit_the_lane_that_runs(tmp_path):
    res, (e,) = _stress(tmp_path, "--strategy", "smt-off", "--guest", "emulated", "--faults",
                        "delay", "--duration", "2")
    assert res.returncode == 0, res.stderr
    (f,) = e["faults"]
    assert f["injected"] and f["slot"] == 0   # lane 0 of its core: the idle lane never exits


def test_kcs_with_gadgets_that_never_fired_says_so(tmp_path):
    res = _table(tmp_path, "--strategy", "kcs", "--gadgets", "1e-12", "--guest", "emulated",
                 "--duration", "1")
    assert res.returncode == 1
    assert "no speculative gadget fired (--gadgets 1e-12)" in res.stderr, res.stderr
    assert "a checker is broken" not in res.stderr


@pytest.mark.requires_kvm
def test_auto_falls_back_to_the_emulated_guest_for_cores_it_cannot_copy(tmp_path):
    res, (e,) = _stress(tmp_path, "--strategy", "none", "--topology", "emulated:4",
                        "--duration", "1")
    assert res.returncode == 0, res.stderr
    assert "guest emulated: --guest auto: KVM works, but a core of 4 lanes" in res.stderr
    assert e["counters"]["check.leaks"] > 0


@pytest.mark.requires_kvm
def test_real_vcpus_under_stress_and_a_kill(tmp_path):
    res, entries = _stress(tmp_path, "--strategy", "none,asi", "--guest", "kvm", "--faults",
                           "kill", "--duration", "3")
    assert res.returncode == 0, res.stderr
    by = {e["strategy"]: e for e in entries}
    assert by["none"]["counters"]["check.leaks"] > 0
    assert by["asi"]["counters"]["check.leaks"] == 0 and by["asi"]["counters"]["violations"] == 0
    (f,) = by["asi"]["faults"]
    assert f["detected"] and f["detected_as"] == ["FENCE_DEAD"]
    assert by["asi"]["metrics"]["kvm_exit_roundtrip"]["count"] > 0


@pytest.mark.parametrize("args, needle", [
    (["--strategy", "bogus"], "strategy 'bogus'"),
    (["--strategy", "asi", "--transitions", "100"], "--transitions with --strategy"),
    (["--strategy", "asi", "--protocol", "strict"], "--protocol with --strategy"),
    (["--strategy", "asi", "--barrier", "spin"], "--barrier with --strategy"),
    (["--guest", "emulated"], "--guest"),
    (["--vms", "3"], "--vms"),
    (["--strategy", "asi", "--vms", "9"], "--vms 9"),
    (["--strategy", "asi", "--profile", "/nonexistent.toml"], "/nonexistent.toml"),
    (["--profile", "default"], "--profile"),
    (["--strategy", "all,none"], "combines 'all' with other names"),
    (["--strategy", "asi", "--seed=-1"], "--seed -1"),
    (["--strategy", "asi", "--guest", "kvm", "--topology", "emulated:4"], "a core of 4 lanes"),
])
def test_bad_stress_strategy_input_exits_2(tmp_path, args, needle):
    length = [] if "--transitions" in args else ["--duration", "1"]
    res = _table(tmp_path, *args, *length)
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not os.listdir(tmp_path)                     # nothing half-written


def test_stress_strategy_falls_back_to_the_emulated_guest_where_kvm_is_missing(tmp_path):
    """The default ``--guest auto`` on a host without KVM: the run goes on emulated and says
    why (the tests above that leave out --guest need KVM, so CI without it would never run
    this path)."""
    env = {**os.environ, "ASIRT_KVM_DEVICE": str(tmp_path / "missing")}
    res = subprocess.run([sys.executable, "-m", "asirt", "stress", "--strategy", "none",
                          "--duration", "1", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=200, env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "guest emulated: --guest auto: no usable KVM" in out
    assert "stress    none" in res.stdout and "Traceback" not in out
