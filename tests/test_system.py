"""System-noise report (isolation, nohz_full, governors, SMT, vulnerabilities) on fake trees."""
from __future__ import annotations

import json
import os

import pytest

from asirt.errors import BadInput
from asirt.system import read_system
from tests.sysfs import HOST_VULNERABILITIES


def _warning(info, start: str) -> str:
    hits = [w for w in info.warnings if w.startswith(start)]
    assert len(hits) == 1, info.warnings
    return hits[0]


def test_kvm_guest(fake_sysfs) -> None:
    info = read_system(fake_sysfs("kvm_2cpu_nosmt"))
    assert info.isolated_cpus == () and info.nohz_full_cpus == ()
    assert info.governors == {}
    assert info.vulnerabilities == HOST_VULNERABILITIES
    assert "isolcpus=" in _warning(info, "no isolated CPUs")
    assert "CONFIG_NO_HZ_FULL" in _warning(info, "nohz_full is not available")
    assert "emulated" in _warning(info, "SMT control is 'notsupported'")
    assert not any("governor" in w for w in info.warnings)
    assert not any(w.startswith("emulated sibling grouping") for w in info.warnings)


def test_nohz_full_null_means_not_set(fake_sysfs) -> None:
    info = read_system(fake_sysfs("adjacent_smt2", nohz_full="(null)"))
    assert info.nohz_full_cpus == ()
    assert "nohz_full=LIST" in _warning(info, "nohz_full is not set")
    info = read_system(fake_sysfs("adjacent_smt2", nohz_full=""))
    _warning(info, "nohz_full is not set")


def test_isolated_and_nohz_full(fake_sysfs) -> None:
    root = fake_sysfs("legacy_kernel")  # isolated and nohz_full: 1-3,5-7
    info = read_system(root, cpus=[1, 5])
    assert info.isolated_cpus == (1, 2, 3, 5, 6, 7)
    assert info.nohz_full_cpus == (1, 2, 3, 5, 6, 7)
    assert not any("isol" in w or "nohz" in w for w in info.warnings)
    info = read_system(root)  # every online CPU, 0 and 4 included
    assert "--cpus 1-3,5-7" in _warning(info, "measured CPUs 0,4 are not isolated")
    _warning(info, "measured CPUs 0,4 are not in nohz_full")
    assert info.vulnerabilities == HOST_VULNERABILITIES


def test_isolated_file_absent(fake_sysfs) -> None:
    info = read_system(fake_sysfs("adjacent_smt2", isolated=None))
    assert "4.2" in _warning(info, "cannot tell which CPUs are isolated")


@pytest.mark.parametrize("layout, cpus, expected", [
    ("alder_lake_hybrid", None, "CPU frequency governor of CPUs 0-19 is 'powersave'"),
    ("power_smt4", [0, 1], "CPU frequency governor of CPUs 0-1 is 'ondemand'"),
])
def test_governor_warning(fake_sysfs, layout: str, cpus, expected: str) -> None:
    info = read_system(fake_sysfs(layout), cpus=cpus)
    assert "use 'performance'" in _warning(info, expected)


def test_performance_governor_is_quiet(fake_sysfs) -> None:
    info = read_system(fake_sysfs("two_socket_smt2"), cpus=[0, 8])
    assert info.governors == {0: "performance", 8: "performance"}
    assert not any("governor" in w for w in info.warnings)
    assert "SMT vulnerable" in info.vulnerabilities["mds"]


def test_mixed_governors(fake_sysfs) -> None:
    root = fake_sysfs("adjacent_smt2")
    with open(os.path.join(root, "devices/system/cpu/cpu3/cpufreq/scaling_governor"), "w") as f:
        f.write("schedutil\n")
    info = read_system(root)
    assert info.governors[3] == "schedutil" and info.governors[2] == "performance"
    _warning(info, "CPU frequency governor of CPUs 3 is 'schedutil'")


@pytest.mark.parametrize("control, needle", [("off", "echo on >"), ("forceoff", "nosmt=force")])
def test_smt_disabled(fake_sysfs, control: str, needle: str) -> None:
    info = read_system(fake_sysfs("adjacent_smt2", smt_control=control))
    assert needle in _warning(info, "SMT is disabled")


@pytest.mark.parametrize("control", ["on", "8", None])
def test_smt_on_or_absent_is_quiet(fake_sysfs, control) -> None:
    info = read_system(fake_sysfs("power_smt8", smt_control=control))
    assert not any("SMT" in w for w in info.warnings)


def test_no_vulnerabilities_dir(fake_sysfs) -> None:
    info = read_system(fake_sysfs("power_smt4"))
    assert info.vulnerabilities == {}


def test_to_json(fake_sysfs) -> None:
    info = read_system(fake_sysfs("two_socket_smt2"), cpus=[0, 8])
    data = info.to_json()
    assert data["governors"] == {"0": "performance", "8": "performance"}
    assert data["warnings"] == list(info.warnings)
    assert data["vulnerabilities"]["meltdown"] == "Mitigation: PTI"
    assert json.loads(json.dumps(data)) == data


def test_bad_root_and_bad_files(tmp_path, fake_sysfs) -> None:
    with pytest.raises(BadInput, match="--sysfs-root"):
        read_system(str(tmp_path))
    root = fake_sysfs("adjacent_smt2", isolated="1-")
    with pytest.raises(BadInput, match="devices/system/cpu/isolated"):
        read_system(root)
    root = fake_sysfs("adjacent_smt2")
    vuln = os.path.join(root, "devices/system/cpu/vulnerabilities/mds")
    os.unlink(vuln)
    os.mkdir(vuln)  # there but unreadable: not the same as absent
    with pytest.raises(BadInput, match="cannot be read"):
        read_system(root)


def test_real_sys() -> None:
    info = read_system(cpus=os.sched_getaffinity(0))
    assert all(isinstance(v, str) for v in info.vulnerabilities.values())
    assert set(info.governors) <= os.sched_getaffinity(0)
    vulns = "/sys/devices/system/cpu/vulnerabilities"
    if os.path.isdir(vulns):
        assert set(info.vulnerabilities) == set(os.listdir(vulns))
    json.dumps(info.to_json())
