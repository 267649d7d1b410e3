"""Fake sysfs trees for topology and system tests, and the layouts of real machines.

``make_sysfs`` writes the files asirt reads under devices/system/cpu (and optionally a root
cgroup cpuset) the way the kernel lays them out; ``LAYOUTS`` names real machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest

from asirt.topology import format_cpu_list

HOST_VULNERABILITIES = {  # this project's KVM development guest
    "l1tf": "Not affected",
    "mds": "Not affected",
    "meltdown": "Not affected",
    "retbleed": "Vulnerable",
    "spec_store_bypass": "Vulnerable",
    "spectre_v1": "Mitigation: usercopy/swapgs barriers and __user pointer sanitization",
    "spectre_v2": "Mitigation: Retpolines; STIBP: disabled; RSB filling; PBRSB-eIBRS: "
                  "Not affected; BHI: Retpoline",
}
SMT_HOST_VULNERABILITIES = {
    "l1tf": "Mitigation: PTE Inversion; VMX: conditional cache flushes, SMT vulnerable",
    "mds": "Mitigation: Clear CPU buffers; SMT vulnerable",
    "meltdown": "Mitigation: PTI",
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def make_sysfs(root: Path, cores: list[list[int]], *, offline: Sequence[int] = (),
               smt_control: str | None = "on", smt_active: bool | None = None,
               l1d: str | dict[int, str] | None = "48K", governor: str | None = "performance",
               isolated: str | None = "", nohz_full: str | None = "(null)",
               vulnerabilities: dict[str, str] | None = None, legacy: bool = False,
               packages: int = 1, die_id: int = 0, cpuset: str | None = None) -> str:
    """Write a sysfs tree under ROOT and return ROOT as a string (it plays /sys).

    cores: the machine's physical cores as lists of all their CPUs, offline ones included.
    offline: CPUs that are offline: no topology/, cache/ or cpufreq/, and missing from their
        siblings' lists, as after a hot-unplug.
    smt_control None: no smt/ directory (before Linux 4.19). smt_active None: computed.
    l1d: the L1D size of every CPU, per CPU as a dict, or None for no cache/ directories.
    governor None: no cpufreq/ (a VM). isolated/nohz_full None: the file is absent.
    legacy: a kernel before 5.3: thread_siblings_list only, no core_cpus_list, no die_id.
    packages: the cores are split evenly, in order, among this many packages; core_id counts
        from 0 in each package.
    cpuset: written to fs/cgroup/cpuset.cpus.effective (the root cgroup's cpuset).
    """
    cpu_dir = root / "devices" / "system" / "cpu"
    all_cpus = sorted(c for core in cores for c in core)
    assert len(all_cpus) == len(set(all_cpus)), "a CPU in two cores"
    online = [c for c in all_cpus if c not in offline]
    for name, cpus in (("possible", all_cpus), ("present", all_cpus), ("online", online),
                       ("offline", offline)):
        _write(cpu_dir / name, format_cpu_list(cpus))
    if isolated is not None:
        _write(cpu_dir / "isolated", isolated)
    if nohz_full is not None:
        _write(cpu_dir / "nohz_full", nohz_full)
    per_package = -(-len(cores) // packages)
    for index, core in enumerate(cores):
        siblings = format_cpu_list(c for c in core if c not in offline)
        for cpu in core:
            base = cpu_dir / f"cpu{cpu}"
            _write(base / "online", "0" if cpu in offline else "1")
            if cpu in offline:
                continue
            topo = base / "topology"
            _write(topo / "thread_siblings_list", siblings)
            _write(topo / "core_id", str(index % per_package))
            _write(topo / "physical_package_id", str(index // per_package))
            if not legacy:
                _write(topo / "core_cpus_list", siblings)
                _write(topo / "die_id", str(die_id))
            size = l1d.get(cpu) if isinstance(l1d, dict) else l1d
            if size is not None:
                for i, (level, kind, sz) in enumerate(((1, "Data", size),
                                                       (1, "Instruction", "32K"),
                                                       (2, "Unified", "1280K"))):
                    _write(base / "cache" / f"index{i}" / "level", str(level))
                    _write(base / "cache" / f"index{i}" / "type", kind)
                    _write(base / "cache" / f"index{i}" / "size", sz)
            if governor is not None:
                _write(base / "cpufreq" / "scaling_governor", governor)
    if smt_control is not None:
        if smt_active is None:
            smt_active = any(len([c for c in core if c not in offline]) >= 2 for core in cores)
        _write(cpu_dir / "smt" / "control", smt_control)
        _write(cpu_dir / "smt" / "active", "1" if smt_active else "0")
    vulns = HOST_VULNERABILITIES if vulnerabilities is None else vulnerabilities
    for name, text in vulns.items():
        _write(cpu_dir / "vulnerabilities" / name, text)
    if cpuset is not None:
        _write(root / "fs" / "cgroup" / "cpuset.cpus.effective", cpuset)
    return str(root)


def _two_socket(n: int) -> list[list[int]]:
    """Intel/AMD servers: siblings n and n+N/2; the first half of the cores on package 0."""
    return [[i, i + n // 2] for i in range(n // 2)]


# name -> make_sysfs keyword arguments, for machines seen in the field.
LAYOUTS: dict[str, dict] = {
    "two_socket_smt2": dict(cores=_two_socket(16), packages=2,
                            vulnerabilities=SMT_HOST_VULNERABILITIES),
    "adjacent_smt2": dict(cores=[[0, 1], [2, 3], [4, 5], [6, 7]]),
    "power_smt4": dict(cores=[[0, 1, 2, 3], [4, 5, 6, 7]], l1d="32K", die_id=-1,
                       governor="ondemand", vulnerabilities={}),
    "power_smt8": dict(cores=[list(range(0, 8)), list(range(8, 16))], smt_control="8",
                       l1d="32K", die_id=-1),
    # Core i7-12700: 8 P-cores with 2 adjacent threads (48K L1D), 4 E-cores (32K L1D).
    "alder_lake_hybrid": dict(cores=[[2 * i, 2 * i + 1] for i in range(8)]
                              + [[16], [17], [18], [19]],
                              l1d={c: "48K" if c < 16 else "32K" for c in range(20)},
                              governor="powersave"),
    # cpu8 (sibling of cpu0) and both threads of core 3 hot-unplugged.
    "offline_cpus": dict(cores=_two_socket(16), packages=2, offline=[3, 8, 11]),
    # the process's cgroup cpuset leaves cpu0 and core (2,3).
    "cpuset": dict(cores=[[0, 1], [2, 3], [4, 5], [6, 7]], cpuset="0,2-3"),
    # this project's development host: a 2-vCPU KVM guest, no SMT, no cpufreq, no nohz_full.
    "kvm_2cpu_nosmt": dict(cores=[[0], [1]], smt_control="notsupported", governor=None,
                           nohz_full=None),
    # a 4.14-era kernel: thread_siblings_list only, no die_id, no smt/ directory.
    "legacy_kernel": dict(cores=_two_socket(8), legacy=True, smt_control=None,
                          isolated="1-3,5-7", nohz_full="1-3,5-7"),
}


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> Callable[..., str]:
    """make(layout_name_or_None, **overrides) -> the root of a fresh fake sysfs tree."""
    count = 0

    def make(layout: str | None = None, **kwargs: object) -> str:
        nonlocal count
        count += 1
        args = {**(LAYOUTS[layout] if layout else {}), **kwargs}
        return make_sysfs(tmp_path / f"sys{count}", **args)

    return make


__all__ = ["make_sysfs", "LAYOUTS", "fake_sysfs"]
