"""`asirt bench kvm`: every strategy against its declared claim, the variants, sweeps, repeats,
imported profiles, plots, and the command line end to end (exit status and printed table)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asirt.kvm import strategy
from asirt.scenarios import KvmOptions
from asirt.scenarios.kvm import run_kvm
from tests.fixtures import test_topology

pytestmark = [pytest.mark.multiprocess, pytest.mark.requires_cpus(2), pytest.mark.timeout(240)]

DATA = os.path.join(os.path.dirname(__file__), "data", "perf_kvm_stat")


def asirt(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asirt", *args], capture_output=True, text=True,
                          timeout=timeout)


def _emulated(**knobs) -> KvmOptions:
    """The emulated guest whatever the host has: the contract of the strategies, the same
    everywhere (real vCPUs are test_kvm_real.py's)."""
    return KvmOptions(guest="emulated", **knobs)


def _only_run(out_dir) -> str:
    (name,) = [n for n in os.listdir(out_dir) if not n.startswith(".")]
    return os.path.join(out_dir, name)


def _result(out_dir) -> dict:
    with open(os.path.join(_only_run(out_dir), "result.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def comparison() -> dict:
    """All seven strategies, the default profile, one second each, with the reference."""
    entries = list(run_kvm(test_topology(), _emulated(), 1.0))
    return {e.strategy: e for e in entries}


def test_every_strategy_ran_and_its_checkers_looked(comparison):
    assert list(comparison) == list(strategy.NAMES)
    for name, e in comparison.items():
        c = e.counters
        assert e.failures == [] and e.problems == [], name
        assert c["kvm.cycles"] > 0 and c["check.samples"] > 0 and c["monitor.samples"] > 0, name
        assert e.claims_safety == strategy.get(name).claims_safety(0.0)


@pytest.mark.parametrize("name", [n for n in strategy.NAMES if strategy.get(n).claims == "yes"]
                         + ["kcs"])
def test_a_strategy_that_claims_safety_shows_no_leak_and_no_violation(comparison, name):
    e = comparison[name]
    assert e.claims_safety
    assert e.counters["violations"] == 0 and e.leaks == [] and not e.unsafe, e.violations[:3]


def test_none_leaks_host_and_other_vm_data(comparison):
    k = comparison["none"].extra["kvm"]
    assert k["leaks_per_s"]["host"] > 0 and k["leaks_per_s"]["other_vm"] > 0
    assert comparison["none"].counters["stun.requests"] == 0


def test_coresched_keeps_vms_apart_but_leaks_host_data(comparison):
    e = comparison["coresched"]
    k = e.extra["kvm"]
    assert k["leaks_per_s"]["host"] > 0
    assert k["leaks_per_s"]["other_vm"] == 0 and k["violations"]["check.s2"] == 0
    assert e.counters["coresched.forced_idle"] > 0
    assert "core_sched" in e.extra          # real prctl cookies, or why they are emulated


def test_always_stuns_every_exit_and_flushes_every_entry(comparison):
    c = comparison["always"].counters
    assert c["stun.requests"] >= c["kvm.exits"] > 0
    assert c["buffer.flushes"] >= c["cpu.guest_entries"]


def test_asi_stuns_only_for_exits_that_left_the_restricted_space(comparison):
    e = comparison["asi"]
    c = e.counters
    left = c["kvm.exits"] - c["kvm.exits_restricted"]
    assert c["kvm.exits_restricted"] > 0 and left > 0
    # besides exits that left: a halted vCPU wakes up through the kernel (a second stun for
    # its exit, which left already), vCPU switches and host tasks go through the kernel, each
    # lane starts there, and holds its siblings out of VM entry when it stops
    assert c["stun.requests"] <= (left + c["kvm.halts"] + c["kvm.switches"]
                                  + c["kvm.host_tasks"] + 2 * len(e.cpus))
    assert e.extra["kvm"]["restricted_pct"] > 0
    assert comparison["none"].extra["kvm"]["restricted_pct"] is None


def test_smt_off_leaves_the_second_lane_idle(comparison):
    e = comparison["smt-off"]
    assert e.extra["kvm"]["time"]["idle"] > 0.3
    assert e.counters["stun.requests"] == 0


def test_throughput_is_relative_to_none_and_the_overhead_to_the_pingpong(comparison):
    assert comparison["none"].extra["kvm"]["guest_vs_none"] == 1.0
    for e in comparison.values():
        k = e.extra["kvm"]
        assert 0 < k["guest_fraction"] < 1
        assert abs(sum(k["time"].values()) - 1.0) < 0.05, k["time"]
        base = e.extra["baseline"]
        assert base["kind"] == "pingpong-spin" and base["p50_ns"] > 0
        assert base["ratio_p50"] > 0
        assert e.hists["vm_cycle_overhead"].sum() > 0


def test_kcs_leaks_with_gadgets_and_claims_nothing_then():
    (e,) = run_kvm(test_topology(), _emulated(strategies=("kcs",), gadgets=0.5), 1.5,
                   reference=False)
    assert e.claims_safety is False
    assert e.counters["asi.gadget_hits"] > 0 and e.leaks, e.counters
    assert e.failures == [] and e.problems == []


def test_asi_gadgets_never_reach_memory():
    (e,) = run_kvm(test_topology(), _emulated(strategies=("asi",), gadgets=0.5), 0.6,
                   reference=False)
    assert e.counters["asi.gadgets"] > 0 and e.counters["asi.gadget_hits"] == 0
    assert e.counters["violations"] == 0 and e.leaks == []


def test_stun_at_exit_stuns_every_exit():
    (e,) = run_kvm(test_topology(), _emulated(strategies=("asi",), stun_at="exit"), 0.6,
                   reference=False)
    assert e.extra["stun_at"] == "exit"
    assert e.counters["stun.requests"] >= e.counters["kvm.exits"] > 0
    assert e.counters["violations"] == 0 and e.leaks == []


INTERRUPTS_PROFILE = """
name = "interrupts"
description = "half external interrupts, half MSR writes; nothing sensitive"
exit_rate_hz = 20000
[source]
title = "tests/test_kvm.py"
[[exit]]
name = "EXTERNAL_INTERRUPT"
share = 0.5
kind = "io"
p_global = 1
p_local = 0
p_sensitive = 0
p_to_user = 0
handler = { mean_ns = 2000, max_ns = 5000, min_ns = 1000 }
[[exit]]
name = "MSR_WRITE"
share = 0.5
kind = "io"
p_global = 1
p_local = 1
p_sensitive = 0
p_to_user = 0
handler = { mean_ns = 1000, max_ns = 3000, min_ns = 500 }
"""


def test_interrupts_exit_leaves_asi_at_every_interrupt(tmp_path):
    prof = tmp_path / "interrupts.toml"
    prof.write_text(INTERRUPTS_PROFILE)
    runs = {}
    for variant in ("stay", "exit"):
        (runs[variant],) = run_kvm(test_topology(), KvmOptions(
            guest="emulated", strategies=("asi",), profile=str(prof), interrupts=variant, host_share=0.0), 0.6,
            reference=False)
    stay, leave = runs["stay"], runs["exit"]
    assert leave.extra["interrupts"] == "exit" and stay.extra["interrupts"] == "stay"
    # nothing is sensitive: staying, every exit is handled restricted; leaving, about half
    assert stay.extra["kvm"]["restricted_pct"] > 95
    assert 30 < leave.extra["kvm"]["restricted_pct"] < 70
    c = leave.counters
    assert c["stun.requests"] >= c["kvm.exits"] - c["kvm.exits_restricted"] > 0
    for e in runs.values():
        assert e.counters["violations"] == 0 and e.leaks == [] and e.failures == []


def test_seed_makes_the_draws_identical_and_repeat_reports_spread():
    opts = _emulated(strategies=("none", "asi"), repeat=2, seed=7, vms=1)
    entries = list(run_kvm(test_topology(), opts, 0.4, reference=False))
    assert [e.strategy for e in entries] == ["none", "asi"]
    for e in entries:
        assert e.extra["repeat"] == 2 and e.extra["seed"] == 7
        assert set(e.extra["kvm"]["spread"]) >= {"guest_fraction", "leaks_per_s"}


# -- the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("name", strategy.ALL_NAMES)
def test_cli_every_strategy_end_to_end(name, tmp_path):
    r = asirt("bench", "kvm", "--guest", "emulated", "--strategy", name, "--duration", "0.4",
              "--no-floor",
              "--out", str(tmp_path), "--quiet")
    broken = name in strategy.BROKEN
    assert r.returncode == (1 if broken else 0), r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 4, r.stdout           # one row in each of the four blocks
    verdict = rows[1].split()[-1]
    assert verdict == ("UNSAFE" if broken else "ok")
    if broken:
        assert f"kvm {name} spin" in r.stderr and "under a variant that claims safety" in r.stderr
    assert "run directory:" in r.stdout
    res = _result(tmp_path)
    (s,) = res["scenarios"]
    assert s["strategy"] == name and s["ok"] is (not broken)
    assert s["claims_safety"] is strategy.get(name).claims_safety(0.0)
    assert max(len(line) for line in r.stdout.splitlines()
               if not line.startswith(("WARNING", "run directory"))) <= 100


@pytest.mark.parametrize("sweep, values", [("exit_rate", (2000.0, 20000.0)),
                                           ("sensitive", (0.0, 1.0)), ("vms", (1.0, 3.0))])
def test_cli_every_sweep_key_runs(tmp_path, sweep, values):
    r = asirt("bench", "kvm", "--guest", "emulated", "--strategy", "asi", "--sweep",
              f"{sweep}={values[0]:g},{values[1]:g}", "--duration", "0.3", "--no-floor",
              "--out", str(tmp_path), "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)["scenarios"]
    assert [(s["sweep"]["key"], s["sweep"]["value"]) for s in got] == [
        (sweep, v) for v in values]
    assert all(s["counters"]["kvm.cycles"] > 0 and s["ok"] for s in got)
    if sweep == "vms":
        assert [s["vms"] for s in got] == [1, 3]


def test_cli_every_knob_of_bench_kvm_reaches_the_run(tmp_path):
    """--strategy all, --stun-at exit, --interrupts exit, --tick-ms, --host-share, --vms,
    --gadgets, --seed and --repeat, end to end, each found in result.json."""
    r = asirt("bench", "kvm", "--guest", "emulated", "--strategy", "all", "--stun-at", "exit",
              "--interrupts", "exit", "--tick-ms", "1", "--host-share", "0.2", "--vms", "3",
              "--gadgets", "0.05", "--seed", "5", "--repeat", "2", "--duration", "0.25",
              "--no-floor", "--out", str(tmp_path), "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)["scenarios"]
    assert [s["strategy"] for s in got] == list(strategy.NAMES)
    for s in got:
        assert (s["stun_at"], s["interrupts"], s["tick_ms"], s["host_share"], s["vms"],
                s["gadgets"], s["seed"], s["repeat"]) == ("exit", "exit", 1.0, 0.2, 3, 0.05,
                                                          5, 2)
        assert "spread" in s["kvm"] and s["counters"]["kvm.host_tasks"] > 0
    asi = next(s for s in got if s["strategy"] == "asi")
    assert asi["counters"]["stun.requests"] >= asi["counters"]["kvm.exits"] * 0.9  # at exit


def test_cli_sweep_draws_its_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = asirt("bench", "kvm", "--guest", "emulated", "--strategy", "none,asi", "--sweep",
              "gadgets=0,0.5",
              "--duration", "0.3", "--no-floor", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[gadgets=0]" in r.stdout and "[gadgets=0.5]" in r.stdout
    run = _only_run(tmp_path)
    files = os.listdir(run)
    for png in ("kvm-sweep.png", "kvm-security.png", "kvm-time.png", "kvm-exit-handling.png"):
        assert png in files
    res = _result(tmp_path)
    assert [(s["strategy"], s["sweep"]["value"]) for s in res["scenarios"]] == [
        ("none", 0.0), ("asi", 0.0), ("none", 0.5), ("asi", 0.5)]
    labels = [s["label"] for s in res["scenarios"]]
    assert len(set(labels)) == 4                 # one set of .hgrm files per point
    assert sum(f.endswith("-exit_handling.hgrm") for f in files) == 4
    rep = asirt("report", run, "--plot")
    assert rep.returncode == 0 and "kvm-sweep.png" in rep.stdout


def test_cli_runs_an_imported_profile(tmp_path):
    prof = tmp_path / "win10.toml"
    imp = asirt("profile", "import", os.path.join(DATA, "win10-io-huataihuang.txt"),
                "-o", str(prof))
    assert imp.returncode == 0, imp.stderr
    r = asirt("bench", "kvm", "--guest", "emulated", "--profile", str(prof), "--strategy", "asi",
              "--duration", "0.3",
              "--no-floor", "--out", str(tmp_path / "runs"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    (s,) = _result(tmp_path / "runs")["scenarios"]
    assert s["profile"] == "win10-io-huataihuang" and s["counters"]["kvm.exits"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--strategy", "nothing"], "--strategy"),
    (["--strategy", ""], "--strategy"),
    (["--gadgets", "1.5"], "--gadgets"),
    (["--gadgets", "nan"], "--gadgets"),
    (["--vms", "0"], "--vms"),
    (["--vms", "8"], "--vms"),
    (["--repeat", "0"], "--repeat"),
    (["--seed", "x"], "--seed"),
    (["--sweep", "gadgets"], "--sweep"),
    (["--sweep", "tea=1,2"], "--sweep"),
    (["--sweep", "vms=1,2.5"], "--sweep"),
    (["--sweep", "gadgets=0,2"], "--sweep"),
    (["--sweep", "exit_rate=a"], "--sweep"),
    (["--stun-at", "never"], "--stun-at"),
    (["--interrupts", "sometimes"], "--interrupts"),
    (["--tick-ms", "0"], "--tick-ms"),
    (["--host-share", "2"], "--host-share"),
    (["--transport", "spin,sem"], "--transport"),
    (["--profile", "/nonexistent.toml"], "/nonexistent.toml"),
    (["--profile", "no-such-profile"], "no-such-profile"),
    (["--guest", "maybe"], "--guest"),
])
def test_cli_bad_kvm_input_exits_2_and_writes_nothing(args, needle, tmp_path):
    r = asirt("bench", "kvm", *args, "--duration", "0.2", "--out", str(tmp_path), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scenario,option", [("pingpong", ["--strategy", "asi"]),
                                             ("stun", ["--gadgets", "0.1"]),
                                             ("kvm", ["--protocol", "strict"])])
def test_cli_refuses_an_option_of_another_scenario(scenario, option, tmp_path):
    r = asirt("bench", scenario, *option, "--out", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "applies to bench" in r.stderr
    assert os.listdir(tmp_path) == []


def test_an_interrupt_keeps_what_the_repetitions_measured(monkeypatch):
    """Ctrl-C in the second repetition: each strategy's first run is handed out, marked
    partial, before the interrupt goes on (with one repetition entries go out at once)."""
    from asirt.scenarios import kvm as scenario
    real, calls = scenario._one, []

    def one(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(scenario, "_one", one)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for e in run_kvm(test_topology(), _emulated(strategies=("none", "asi"), repeat=2), 0.3,
                         reference=False):
            got.append(e)
    assert [e.strategy for e in got] == ["none", "asi"]
    assert all(e.extra["partial"] == "1 of 2 runs" for e in got)
    assert got[1].extra["kvm"]["guest_vs_none"] is not None
