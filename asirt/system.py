"""What makes measurements on this machine noisy, pyperf-style, read from a sysfs root.

Reports CPU isolation (isolcpus=, nohz_full=), frequency governors, SMT state and the
kernel's vulnerability/mitigation report. The emulated-grouping warning belongs to the
topology (asirt.topology), not here. Imports only the standard library and asirt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from asirt.topology import format_cpu_list, parse_attr, parse_cpu_list, read_attr, sysfs_cpu_dir

__all__ = ["SystemInfo", "read_system"]

_TUNE = "see 'python -m pyperf system tune'"


@dataclass(frozen=True)
class SystemInfo:
    warnings: tuple[str, ...]
    vulnerabilities: dict[str, str]  # file name in devices/system/cpu/vulnerabilities -> text
    isolated_cpus: tuple[int, ...]
    nohz_full_cpus: tuple[int, ...]
    governors: dict[int, str]        # CPUs with a cpufreq driver only

    @property
    def by_governor(self) -> dict[str, list[int]]:
        return _by_governor(self.governors)

    def to_json(self) -> dict:
        return {"warnings": list(self.warnings), "vulnerabilities": dict(self.vulnerabilities),
                "isolated_cpus": list(self.isolated_cpus),
                "nohz_full_cpus": list(self.nohz_full_cpus),
                "governors": {str(cpu): gov for cpu, gov in sorted(self.governors.items())}}


def _cpus_attr(path: str, text: str) -> list[int]:
    return parse_attr(path, text, parse_cpu_list, "a CPU list")


def _isolation(cpu_dir: str, cpus: list[int]) -> tuple[list[int], list[int], list[str]]:
    warnings = []
    # devices/system/cpu/isolated: Linux 4.2 (commit 59f30abe94bf, as pyperf notes).
    path = os.path.join(cpu_dir, "isolated")
    text = read_attr(path)
    isolated = _cpus_attr(path, text) if text is not None else []
    if text is None:
        warnings.append("cannot tell which CPUs are isolated: devices/system/cpu/isolated is "
                        "absent (kernel older than 4.2)")
    elif not isolated:
        warnings.append("no isolated CPUs (isolcpus= is not on the kernel command line): other "
                        "tasks and kernel threads share the measured CPUs; boot with "
                        f"isolcpus=LIST nohz_full=LIST rcu_nocbs=LIST, {_TUNE}")
    elif set(cpus) - set(isolated):
        warnings.append(f"measured CPUs {format_cpu_list(set(cpus) - set(isolated))} are not "
                        f"isolated (isolated: {format_cpu_list(isolated)}); restrict the run "
                        f"with --cpus {format_cpu_list(isolated)}")
    # devices/system/cpu/nohz_full exists only with CONFIG_NO_HZ_FULL. It reads "(null)"
    # when nohz_full= was not given and the mask was never allocated (pyperf's _system.py).
    path = os.path.join(cpu_dir, "nohz_full")
    text = read_attr(path)
    nohz = _cpus_attr(path, text) if text not in (None, "(null)") else []
    if text is None:
        warnings.append("nohz_full is not available (kernel built without CONFIG_NO_HZ_FULL): "
                        "the scheduler tick interrupts the measured CPUs")
    elif not nohz:
        warnings.append("nohz_full is not set: the scheduler tick interrupts the measured CPUs; "
                        f"boot with nohz_full=LIST (the isolcpus= CPUs), {_TUNE}")
    elif set(cpus) - set(nohz):
        warnings.append(f"measured CPUs {format_cpu_list(set(cpus) - set(nohz))} are not in "
                        f"nohz_full ({format_cpu_list(nohz)}): the tick interrupts them")
    return isolated, nohz, warnings


def _by_governor(governors: dict[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for cpu, gov in sorted(governors.items()):
        out.setdefault(gov, []).append(cpu)
    return out


def _governors(cpu_dir: str, cpus: list[int]) -> tuple[dict[int, str], list[str]]:
    # cpuN/cpufreq/ exists only with a cpufreq driver; most VMs have none (the host decides).
    governors = {}
    for cpu in cpus:
        gov = read_attr(os.path.join(cpu_dir, f"cpu{cpu}", "cpufreq", "scaling_governor"))
        if gov is not None:
            governors[cpu] = gov
    warnings = [f"CPU frequency governor of CPUs {format_cpu_list(c)} is {gov!r}: the clock "
                f"follows the load; use 'performance' (cpupower frequency-set -g performance), "
                f"{_TUNE}" for gov, c in sorted(_by_governor(governors).items())
                if gov != "performance"]
    return governors, warnings


def _smt_warning(control: str | None) -> list[str]:
    # smt/control: Linux 4.19 (kernel/cpu.c). Absent on older kernels: nothing to say.
    if control == "notsupported":
        return ["SMT control is 'notsupported' (no SMT on this CPU, or the hypervisor hides "
                "it): there are no real siblings, so sibling runs use an emulated grouping of "
                "distinct CPUs"]
    if control == "off":
        return ["SMT is disabled (smt/control 'off'): enable it with 'echo on > "
                "/sys/devices/system/cpu/smt/control' (as root) to measure real siblings"]
    if control == "forceoff":
        return ["SMT is disabled for this boot (smt/control 'forceoff', nosmt=force): reboot "
                "without nosmt=force to measure real siblings"]
    return []


def _vulnerabilities(cpu_dir: str) -> dict[str, str]:
    # devices/system/cpu/vulnerabilities/: Linux 4.15 (Meltdown/Spectre); one file per issue.
    path = os.path.join(cpu_dir, "vulnerabilities")
    try:
        names = sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for name in names:
        text = read_attr(os.path.join(path, name))
        if text is not None:
            out[name] = text
    return out


def read_system(root: str = "/sys", cpus: Iterable[int] | None = None) -> SystemInfo:
    """Noise sources for the measured CPUs (default: every online CPU) under ROOT."""
    cpu_dir = sysfs_cpu_dir(root)
    if cpus is None:
        path = os.path.join(cpu_dir, "online")
        measured = _cpus_attr(path, read_attr(path) or "")
    else:
        measured = sorted(set(cpus))
    isolated, nohz, warnings = _isolation(cpu_dir, measured)
    governors, gov_warnings = _governors(cpu_dir, measured)
    warnings += gov_warnings
    warnings += _smt_warning(read_attr(os.path.join(cpu_dir, "smt", "control")))
    return SystemInfo(warnings=tuple(warnings), vulnerabilities=_vulnerabilities(cpu_dir),
                      isolated_cpus=tuple(isolated), nohz_full_cpus=tuple(nohz),
                      governors=governors)
