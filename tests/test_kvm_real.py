"""`--guest kvm`: the vCPU loop on real vCPUs through /dev/kvm (asirt.kvm.real). The guest
program itself and the device layer are test_kvm_device.py's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asirt.cpu import ASI, HOST
from asirt.errors import BadInput, FeatureMissing
from asirt.kvm import profile as profiles
from asirt.kvm.real import KvmGuest
from asirt.scenarios.kvm import resolve_guest
from tests.fixtures import close_loops, counter, cpu_region, make_loops

pytestmark = pytest.mark.timeout(240)


def asirt(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asirt", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _result(out_dir) -> dict:
    (name,) = [n for n in os.listdir(out_dir) if not n.startswith(".")]
    with open(os.path.join(out_dir, name, "result.json")) as f:
        return json.load(f)


def test_guest_choice_and_its_reason(tmp_path):
    assert resolve_guest("emulated", "spin") == ("emulated", "chosen with --guest emulated")
    missing = str(tmp_path / "no-kvm")
    guest, why = resolve_guest("auto", "spin", missing)
    assert guest == "emulated" and "no usable KVM" in why and missing in why
    with pytest.raises(FeatureMissing, match="does not exist") as err:
        resolve_guest("kvm", "spin", missing)
    assert err.value.exit_code == 2 and "--guest emulated" in str(err.value)
    with pytest.raises(BadInput):
        resolve_guest("sometimes", "spin")


@pytest.mark.requires_kvm
def test_signal_transport_cannot_drive_real_vcpus():
    with pytest.raises(BadInput, match="kicks a vCPU"):
        resolve_guest("kvm", "signal")
    guest, why = resolve_guest("auto", "signal")
    assert guest == "emulated" and "signal" in why


def test_cli_guest_kvm_without_kvm_exits_2_naming_the_cause(tmp_path):
    r = asirt("bench", "kvm", "--guest", "kvm", "--duration", "0.2", "--out", str(tmp_path),
              env={"ASIRT_KVM_DEVICE": str(tmp_path / "kvm")}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--guest kvm" in r.stderr and "does not exist" in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.requires_kvm
def test_the_real_guest_sees_what_is_in_the_core_buffer():
    """Leak evidence from real guest code: a host token in the core buffer is counted from the
    bytes the guest copied out of its window, and nothing once it is flushed."""
    with cpu_region(1, vms=1) as r:
        (lp,) = make_loops(r, 1, "none")
        guest = KvmGuest(lp.stun, r, 1, profiles.load("io-heavy"), {})
        try:
            st = lp.state
            st.set(HOST, 1)
            lp.asi.access(lp.mem.secrets[0])          # host data, in the buffer
            st.set(ASI, 1)
            st.enter_guest()
            assert guest.run(20_000, 0) is False
            assert counter(lp.cpu, "check.samples") == 2          # before and after the work
            assert counter(lp.cpu, "check.leak_host") >= 1
            st.exit_guest(ASI)
            st.flush(lp.cpu.c("buffer.flushes"))
            leaks = counter(lp.cpu, "check.leaks")
            st.enter_guest()
            assert guest.run(20_000, 0) is False
            assert counter(lp.cpu, "check.leaks") == leaks   # flushed: nothing new seen
            st.exit_guest(ASI)
        finally:
            guest.close()
            close_loops([lp])


@pytest.mark.requires_kvm
@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_cli_real_vcpus_end_to_end(tmp_path):
    r = asirt("bench", "kvm", "--guest", "kvm", "--strategy", "none,asi", "--duration", "0.8",
              "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "guest kvm: /dev/kvm" in r.stdout and "real exits: IO round trip" in r.stdout
    res = _result(tmp_path)
    none, asi = res["scenarios"]
    for s in (none, asi):
        assert s["guest"] == "kvm" and s["ok"]
        assert s["metrics"]["kvm_exit_roundtrip"]["count"] > 0
        assert s["metrics"]["kvm_exit_hlt"]["count"] > 0
        floor = s["kvm_floor"]
        assert floor["kind"] == "c-kvm-exit-floor"
        assert floor["p50_ns"] is None or floor["ratio_p50"] > 0
    assert none["counters"]["check.leaks"] > 0                 # seen by the real guest
    assert asi["counters"]["violations"] == 0 and asi["leaks"] == []
    assert asi["metrics"]["kick_to_exit"]["count"] > 0          # stuns kicked real vCPUs
    assert asi["counters"]["kvm.kicked"] > 0


@pytest.mark.requires_kvm
@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_cli_real_vcpus_catch_a_broken_strategy(tmp_path):
    r = asirt("bench", "kvm", "--guest", "kvm", "--strategy", "always-noflush", "--duration",
              "0.8", "--no-floor", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "under a variant that claims safety" in r.stderr


@pytest.mark.requires_kvm
@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
def test_every_strategy_on_real_vcpus_against_its_claim():
    from asirt.kvm import strategy
    from asirt.scenarios import KvmOptions
    from asirt.scenarios.kvm import run_kvm
    from tests.fixtures import test_topology
    entries = list(run_kvm(test_topology(), KvmOptions(guest="kvm"), 0.6, reference=False))
    assert [e.strategy for e in entries] == list(strategy.NAMES)
    for e in entries:
        assert e.failures == [] and e.problems == [], (e.strategy, e.failures, e.problems)
        assert e.extra["guest"] == "kvm"
        if e.claims_safety:
            assert e.counters["violations"] == 0 and e.leaks == [], e.strategy
    by = {e.strategy: e for e in entries}
    assert by["none"].extra["kvm"]["leaks_per_s"]["host"] > 0
    assert by["coresched"].extra["kvm"]["leaks_per_s"]["host"] > 0


def _kvm_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "kvm" in target:
            out.append(target)
    return out


def _kvm_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "kvm" in line]


@pytest.mark.requires_kvm
def test_a_real_guest_sees_a_sibling_s_host_data_under_none_and_nothing_left_after():
    """What a sibling left in HOST (its lane of the core buffer) is what the real guest reads
    through its window; closing the backend leaves no KVM fd or mapping behind."""
    fds, maps = _kvm_fds(), _kvm_maps()
    with cpu_region(2, vms=1) as r:
        loops = make_loops(r, 2, "none")
        a, b = loops
        guest = KvmGuest(a.stun, r, 1, profiles.load("io-heavy"), {})
        try:
            assert len(_kvm_fds()) > len(fds)
            b.state.set(HOST, 1)
            b.asi.access(b.mem.secrets[0])           # the sibling's host data, in its lane
            st = a.state
            st.set(ASI, 1)
            st.enter_guest()
            assert guest.run(20_000, 0) is False
            assert counter(a.cpu, "check.leak_host") >= 1
            st.exit_guest(ASI)
        finally:
            guest.close()
            close_loops(loops)
    assert _kvm_fds() == fds and _kvm_maps() == maps


def _progress_until(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("".join(lines))


@pytest.mark.requires_kvm
@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.parametrize("how", ["ctrl-c", "kill-9-of-a-vcpu"])
def test_real_vcpus_leave_nothing_after_a_ctrl_c_or_a_kill(how, tmp_path):
    import signal

    import psutil

    from shm_layout import list_leftovers
    proc = subprocess.Popen([sys.executable, "-m", "asirt", "bench", "kvm", "--guest", "kvm",
                             "--strategy", "none,asi", "--duration", "3", "--no-floor", "--out",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        import time
        _progress_until(proc, "[2/2] kvm asi")
        deadline = time.monotonic() + 60
        workers: list = []
        while len(workers) < 3 and time.monotonic() < deadline:   # two vCPUs and the monitor
            workers = [c for c in psutil.Process(proc.pid).children()
                       if "workers" in " ".join(c.cmdline())]
            time.sleep(0.05)
        assert len(workers) >= 3
        time.sleep(1.0)                           # in the loop, past the start barrier
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            next(w for w in workers if "vcpu" in " ".join(w.cmdline())).kill()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == (130 if how == "ctrl-c" else 1), err[-2000:]
        res = _result(tmp_path)
        assert res["scenarios"][0]["strategy"] == "none" and res["scenarios"][0]["ok"]
        if how == "ctrl-c":
            assert res["interrupted"] is True
        else:
            assert "killed by SIGKILL" in res["scenarios"][1]["failures"][0]
        assert not psutil.wait_procs(workers, timeout=30)[1]
        assert not [lo for lo in list_leftovers() if lo.creator_pid == proc.pid]
    finally:
        if proc.poll() is None:                   # the test failed half-way: clean up
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_each_request_is_posted_after_the_answer_is_cleared():
    """KvmGuest clears the guest's answer header before each request: a kick between the
    guest's echo of the new seq and its clearing of the copy count would otherwise pass the
    last pass's copies off as this one's (counted twice). Needs no KVM: the order of the
    two stores is what matters."""
    from types import SimpleNamespace
    calls = []
    prog = SimpleNamespace(clear_answer=lambda: calls.append("clear"),
                           post=lambda req: calls.append(("post", req.seq)))
    guest = SimpleNamespace(seq=41, sample_len=64, sample_off=0)
    assert KvmGuest._post(guest, SimpleNamespace(prog=prog), 1, 1, 0, True) == 42
    assert calls == ["clear", ("post", 42)]
