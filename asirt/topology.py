"""CPU topology: which CPUs are online, which share a core, which this process may use.

Parsers are pure (``parse_cpu_list``); readers take a sysfs root so tests can point them at
a fake tree. ``read_topology`` reports the machine as it is; ``select_topology`` picks the
cores a run uses (real siblings, or an *emulated* grouping of distinct CPUs when there are
none). Imports only the standard library and ``asirt.errors``.
"""
from __future__ import annotations

import itertools
import os
import re
import textwrap
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

from asirt.errors import BadInput
from shm_layout.sections import MAX_SIBLINGS

if TYPE_CHECKING:
    from asirt.system import SystemInfo

__all__ = ["CpuInfo", "Topology", "parse_cpu_list", "format_cpu_list", "parse_size",
           "read_attr", "sysfs_cpu_dir", "read_topology", "select_topology", "emulated_k",
           "parse_cpu_arg",
           "format_topology", "MAX_CPU", "MAX_EMULATED_K"]

CPU_DIR = "devices/system/cpu"
# The kernel's NR_CPUS tops out at 8192 today; the bound only stops "0-999999999" from
# allocating a list of a billion CPUs.
MAX_CPU = 65535
# The widest real SMT is 8 threads per core (IBM POWER8 and later).
MAX_EMULATED_K = MAX_SIBLINGS   # the region has room for this many lanes per core
_NUMBER = re.compile(r"[0-9]+")


# --- pure parsers -------------------------------------------------------------------------

def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's CPU list format ("0-3,8") into sorted, distinct CPU numbers.

    "" (and a bare newline, as sysfs writes for an empty mask) is the empty list. Raises
    ValueError on anything else that is not a list of N or N-M items with N <= M.
    """
    text = text.strip()
    if not text:
        return []
    cpus: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.partition("-")
        lo = _cpu_number(first, text)
        hi = _cpu_number(last, text) if dash else lo
        if hi < lo:
            raise ValueError(f"CPU range {item.strip()!r} in {text!r} ends before it starts")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def _cpu_number(word: str, text: str) -> int:
    word = word.strip()
    if not _NUMBER.fullmatch(word):
        raise ValueError(f"{word!r} in {text!r} is not a CPU number")
    cpu = int(word)
    if cpu > MAX_CPU:
        raise ValueError(f"CPU {cpu} in {text!r} is above {MAX_CPU}")
    return cpu


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's CPU list format: [0, 1, 2, 3, 8] -> "0-3,8"; no CPUs -> ""."""
    items = []
    for _, run in itertools.groupby(enumerate(sorted(set(cpus))), lambda ic: ic[1] - ic[0]):
        nums = [cpu for _, cpu in run]
        if nums[0] < 0:
            raise ValueError(f"negative CPU number {nums[0]}")
        items.append(str(nums[0]) if len(nums) == 1 else f"{nums[0]}-{nums[-1]}")
    return ",".join(items)


def parse_size(text: str) -> int:
    """A cache size as sysfs writes it ("48K"; drivers/base/cacheinfo.c prints "%uK") in bytes.

    Also accepts M and G suffixes and a bare byte count.
    """
    match = re.fullmatch(r"([0-9]+)\s*([KMG]?)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size like '48K'")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]]


# --- reading sysfs ------------------------------------------------------------------------

def read_attr(path: str) -> str | None:
    """A sysfs attribute's contents without surrounding whitespace, or None if it is absent.

    Absent (the kernel lacks the feature, or the CPU is offline) is an answer. Unreadable
    (EACCES, EIO) is not: it becomes BadInput naming the file.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise BadInput(path, f"cannot be read ({err.strerror or err})",
                       "run as a user who can read it, or point --sysfs-root at a readable "
                       "copy of the tree") from err


#: the fix for a sysfs file that does not hold what Linux writes there
DAMAGED = ("this is not what Linux writes there: if the tree is a copy or a fake "
           "(--sysfs-root), recopy or fix that file")

T = TypeVar("T")


def parse_attr(path: str, text: str, parse: Callable[[str], T], what: str) -> T:
    """``parse(text)`` of the attribute at ``path``; BadInput naming the file if it fails."""
    try:
        return parse(text)
    except ValueError as err:
        raise BadInput(path, f"holds {text!r}, not {what} ({err})", DAMAGED) from err


def read_parsed(path: str, parse: Callable[[str], T], what: str) -> T | None:
    """The attribute at ``path`` parsed, or None when the file is absent (see read_attr)."""
    text = read_attr(path)
    return None if text is None else parse_attr(path, text, parse, what)


def _read_cpus(path: str) -> list[int] | None:
    return read_parsed(path, parse_cpu_list, "a CPU list")


def _read_int(path: str) -> int | None:
    return read_parsed(path, int, "an integer")


def sysfs_cpu_dir(root: str) -> str:
    """ROOT/devices/system/cpu, or BadInput if ROOT is not a sysfs tree."""
    cpu_dir = os.path.join(root, CPU_DIR)
    if not os.path.isfile(os.path.join(cpu_dir, "online")):
        hint = ""
        if os.path.isfile(os.path.join(root, "online")):
            hint = f" (it looks like the {CPU_DIR} directory of one)"
        raise BadInput("--sysfs-root", f"{root!r} is not a sysfs tree{hint}: "
                       f"{os.path.join(cpu_dir, 'online')} does not exist",
                       f"pass the directory that plays the role of /sys (the one that holds "
                       f"{CPU_DIR}/online), or leave --sysfs-root out to read /sys")
    return cpu_dir


@dataclass(frozen=True)
class CpuInfo:
    """Where one online CPU sits. None: the kernel does not export that file."""

    package: int | None     # topology/physical_package_id
    die: int | None         # topology/die_id (Linux 5.3+; -1 on architectures without dies)
    core: int | None        # topology/core_id: unique only within a package, never a key
    l1d_bytes: int | None   # cache/index*/ with level 1, type Data


@dataclass(frozen=True)
class Topology:
    """The machine's cores and the part of them a run uses. Build it with read_topology."""

    cores: tuple[tuple[int, ...], ...]         # every online CPU, grouped by physical core
    allowed_cpus: tuple[int, ...]              # online CPUs this process may run on
    usable_cores: tuple[tuple[int, ...], ...]  # cores a run uses (pseudo-cores if emulated)
    smt: bool                                  # some usable core has >= 2 real siblings
    emulated: bool                             # usable_cores are pseudo-cores of distinct CPUs
    smt_control: str | None                    # smt/control; None before Linux 4.19
    smt_active: bool | None                    # smt/active; None before Linux 4.19
    online_cpus: tuple[int, ...]
    offline_cpus: tuple[int, ...]
    cpu_info: dict[int, CpuInfo]               # per online CPU
    sysfs_root: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def cpus(self) -> tuple[int, ...]:
        """The CPUs a run measures: every CPU of usable_cores, sorted (--cpus narrows them)."""
        return tuple(sorted(itertools.chain.from_iterable(self.usable_cores)))

    @property
    def l1d_bytes(self) -> int | None:
        """L1D size of the first usable CPU (hybrid machines differ between core types)."""
        first = self.usable_cores[0][0] if self.usable_cores else None
        info = self.cpu_info.get(first) if first is not None else None
        return info.l1d_bytes if info else None

    @property
    def packages(self) -> dict[int | None, tuple[int, ...]]:
        """Online CPUs of each physical package."""
        out: dict[int | None, list[int]] = {}
        for cpu in self.online_cpus:
            out.setdefault(self.cpu_info[cpu].package, []).append(cpu)
        return {pkg: tuple(cpus) for pkg, cpus in out.items()}

    def sibling_pairs(self) -> list[tuple[int, int]]:
        """Every unordered pair of (real or emulated) siblings in usable_cores."""
        return [pair for core in self.usable_cores for pair in itertools.combinations(core, 2)]

    def core_of(self, cpu: int) -> tuple[int, ...]:
        """The usable core (pseudo-core when emulated) that holds cpu; ValueError if none."""
        for core in self.usable_cores:
            if cpu in core:
                return core
        raise ValueError(f"CPU {cpu} is in no usable core "
                         f"(usable CPUs: {format_cpu_list(self.cpus)})")

    def to_json(self) -> dict:
        return {
            "sysfs_root": self.sysfs_root,
            "cores": [list(c) for c in self.cores],
            "usable_cores": [list(c) for c in self.usable_cores],
            "smt": self.smt,
            "emulated": self.emulated,
            "allowed_cpus": list(self.allowed_cpus),
            "online_cpus": list(self.online_cpus),
            "offline_cpus": list(self.offline_cpus),
            "smt_control": self.smt_control,
            "smt_active": self.smt_active,
            "l1d_bytes": self.l1d_bytes,
            "cpus": [{"cpu": cpu, "package": i.package, "die": i.die, "core": i.core,
                      "l1d_bytes": i.l1d_bytes} for cpu, i in sorted(self.cpu_info.items())],
            "warnings": list(self.warnings),
        }


def _read_siblings(cpu_dir: str, cpu: int, online: set[int]) -> tuple[int, ...]:
    topo = os.path.join(cpu_dir, f"cpu{cpu}", "topology")
    # Method #1: core_cpus_list (Linux 5.3, commit 2e4c54dac7b3 "topology: Create core_cpus
    # and die_cpus sysfs attributes"). Method #2: thread_siblings_list, its older, deprecated
    # name, the only one before 5.3. Both list only online CPUs; intersect anyway.
    for name in ("core_cpus_list", "thread_siblings_list"):
        siblings = _read_cpus(os.path.join(topo, name))
        if siblings is not None:
            if cpu not in siblings:
                raise BadInput(os.path.join(topo, name), f"does not list CPU {cpu} itself",
                               DAMAGED)
            return tuple(sorted(set(siblings) & online))
    # No topology/ for an online CPU (a stripped-down tree): a core of its own.
    return (cpu,)


def _read_l1d(cpu_dir: str, cpu: int) -> int | None:
    cache = os.path.join(cpu_dir, f"cpu{cpu}", "cache")
    try:
        names = sorted(n for n in os.listdir(cache) if n.startswith("index"))
    except (FileNotFoundError, NotADirectoryError):
        return None  # no cacheinfo for this CPU (some VMs and arm64 firmware)
    for name in names:
        index = os.path.join(cache, name)
        if read_attr(os.path.join(index, "level")) == "1" and \
                read_attr(os.path.join(index, "type")) == "Data":
            return read_parsed(os.path.join(index, "size"), parse_size, "a cache size")
    return None


def _allowed(root: str, online: list[int], allowed: Iterable[int] | None) -> list[int]:
    if allowed is not None:
        return sorted(set(allowed) & set(online))
    if os.path.realpath(root) == "/sys":
        # A cpuset can hide CPUs that sysfs shows online (cgroup v2 cpuset.cpus.effective,
        # Documentation/admin-guide/cgroup-v2.rst); sched_getaffinity already reflects it,
        # and taskset/numactl masks too.
        return sorted(os.sched_getaffinity(0) & set(online))
    # A fake tree is not this machine: its online CPUs, narrowed by the root cgroup's cpuset
    # when the tree has one.
    cpuset = _read_cpus(os.path.join(root, "fs/cgroup/cpuset.cpus.effective"))
    return sorted(set(online) & set(cpuset)) if cpuset is not None else online


def read_topology(root: str = "/sys", allowed: Iterable[int] | None = None) -> Topology:
    """Read the machine's cores from ROOT (a sysfs tree) and the CPUs this process may use.

    allowed None: sched_getaffinity when ROOT is /sys, the tree's online CPUs (narrowed by
    ROOT/fs/cgroup/cpuset.cpus.effective if present) otherwise. usable_cores are the real
    cores narrowed to the allowed CPUs; select_topology may replace them.
    """
    cpu_dir = sysfs_cpu_dir(root)
    online = _read_cpus(os.path.join(cpu_dir, "online")) or []
    # "offline" appeared with CPU hotplug sysfs (Linux 2.6.x); an empty mask reads "\n".
    offline = _read_cpus(os.path.join(cpu_dir, "offline")) or []
    online_set = set(online)
    # Offline CPUs have no topology/ (the kernel removes it at hot-unplug), so the cores are
    # built from online CPUs only. Sibling numbering is arbitrary (n and n+N/2 on most x86
    # servers, adjacent on others): group by the sibling lists, never by core_id.
    core_by_cpu = {cpu: _read_siblings(cpu_dir, cpu, online_set) for cpu in online}
    for cpu, core in core_by_cpu.items():
        for other in core:
            if core_by_cpu[other] != core:
                raise BadInput(os.path.join(cpu_dir, f"cpu{cpu}", "topology"),
                               f"CPU {cpu} lists siblings {format_cpu_list(core)} but CPU "
                               f"{other} lists {format_cpu_list(core_by_cpu[other])}",
                               f"the tree is inconsistent; {DAMAGED}")
    cores = tuple(sorted(set(core_by_cpu.values())))
    cpu_info = {}
    for cpu in online:
        topo = os.path.join(cpu_dir, f"cpu{cpu}", "topology")
        cpu_info[cpu] = CpuInfo(package=_read_int(os.path.join(topo, "physical_package_id")),
                                die=_read_int(os.path.join(topo, "die_id")),
                                core=_read_int(os.path.join(topo, "core_id")),
                                l1d_bytes=_read_l1d(cpu_dir, cpu))
    allowed_cpus = _allowed(root, online, allowed)
    if not allowed_cpus:
        raise BadInput("allowed CPUs", f"none of them is online (online: "
                       f"{format_cpu_list(online)})",
                       "run the process with an affinity mask or cpuset that includes online CPUs")
    # smt/control and smt/active: Linux 4.19 (the L1TF "SMT knobs", kernel/cpu.c). control
    # is on, off, forceoff, notsupported or notimplemented, or a thread count (Linux 6.6+).
    smt_control = read_attr(os.path.join(cpu_dir, "smt", "control"))
    active = _read_int(os.path.join(cpu_dir, "smt", "active"))
    usable = _narrow(cores, allowed_cpus)
    return Topology(cores=cores, allowed_cpus=tuple(allowed_cpus), usable_cores=usable,
                    smt=any(len(c) >= 2 for c in usable), emulated=False,
                    smt_control=smt_control, smt_active=None if active is None else active != 0,
                    online_cpus=tuple(online), offline_cpus=tuple(offline), cpu_info=cpu_info,
                    sysfs_root=root)


def _narrow(cores: Iterable[tuple[int, ...]], cpus: Iterable[int]) -> tuple[tuple[int, ...], ...]:
    keep = set(cpus)
    return tuple(n for n in (tuple(c for c in core if c in keep) for core in cores) if n)


# --- choosing the cores a run uses --------------------------------------------------------

def parse_cpu_arg(text: str, allowed: Iterable[int], option: str = "--cpus") -> list[int]:
    """A user's CPU list, checked against the CPUs this process may use."""
    allowed_set = set(allowed)
    choices = f"this process may use CPUs {format_cpu_list(allowed_set)}"
    try:
        cpus = parse_cpu_list(text)
    except ValueError as err:
        raise BadInput(option, f"{text!r} is not a CPU list ({err})",
                       f"write CPUs as in '0-3,8'; {choices}") from err
    if not cpus:
        raise BadInput(option, "the CPU list is empty", f"name at least one CPU; {choices}")
    _check_allowed(cpus, allowed_set, option)
    return cpus


def _check_allowed(cpus: Iterable[int], allowed: set[int], option: str) -> None:
    outside = sorted(set(cpus) - allowed)
    if outside:
        raise BadInput(option, f"CPU(s) {format_cpu_list(outside)} are offline, outside this "
                       f"process's affinity mask or hidden by its cpuset",
                       f"choose among CPUs {format_cpu_list(allowed)}")


def emulated_k(mode: str) -> int | None:
    """K of an ``emulated[:K]`` mode (2 for plain ``emulated``), None for ``auto``; BadInput
    for anything else. K is checked against MAX_EMULATED_K only, not against the CPUs (a
    stress run may cycle more siblings than CPUs over them: asirt.scenarios.common)."""
    valid = f"auto, emulated, emulated:K with K in 2..{MAX_EMULATED_K}"
    mode = mode.strip()
    if mode == "auto":
        return None
    name, colon, k_text = mode.partition(":")
    if name != "emulated" or (colon and not _NUMBER.fullmatch(k_text)):
        raise BadInput("--topology", f"{mode!r} is not a topology mode", f"valid values: {valid}")
    k = int(k_text) if colon else 2
    if not 2 <= k <= MAX_EMULATED_K:
        raise BadInput("--topology", f"{mode}: K must be between 2 and {MAX_EMULATED_K}",
                       f"valid values: {valid}")
    return k


def _parse_mode(mode: str, ncpus: int) -> int | None:
    """None for auto, K for emulated[:K] (at most the ``ncpus`` selected); BadInput otherwise."""
    kmax = min(MAX_EMULATED_K, ncpus)
    valid = "auto, emulated" + (f", emulated:K with K in 2..{kmax}" if kmax >= 2 else "")
    try:
        k = emulated_k(mode)
    except BadInput as err:
        raise BadInput(err.what, err.problem, f"valid values: {valid}") from None
    if k is None:
        return None
    if ncpus < 2:
        raise BadInput("--topology", f"{mode} groups CPUs into pseudo-cores but only "
                       f"{ncpus} CPU is selected",
                       "select at least 2 CPUs with --cpus, or use --topology auto")
    if k > kmax:
        raise BadInput("--topology", f"{mode}: K must be between 2 and {MAX_EMULATED_K} and at "
                       f"most the {ncpus} selected CPUs", f"valid values: {valid}")
    return k


def _emulate(real: tuple[tuple[int, ...], ...], k: int) -> tuple[tuple[int, ...], ...]:
    """Pseudo-cores of K distinct CPUs, taking one thread of each real core in turn.

    Round-robin over the real cores keeps real siblings apart where the count allows (on
    (0,1),(2,3) K=2 gives (0,2),(1,3)); on a machine without SMT it is simply consecutive
    CPUs. When K does not divide the CPU count, one pseudo-core is smaller (possibly a
    single CPU, which then runs like a core without siblings) so that every selected CPU runs.
    """
    order = [c for layer in itertools.zip_longest(*real) for c in layer if c is not None]
    return tuple(sorted(tuple(sorted(order[i:i + k])) for i in range(0, len(order), k)))


def select_topology(topo: Topology, mode: str, cpus: list[int] | None = None) -> Topology:
    """The cores a run uses: mode "auto", "emulated" (K=2) or "emulated:K" (2 <= K <= 8).

    cpus narrows the allowed CPUs (BadInput naming --cpus if any is not allowed). auto uses
    real siblings when some selected core has two of them, else pseudo-cores of K=2; with a
    single selected CPU it returns that CPU as a core without siblings (nothing to emulate).
    """
    if cpus is not None:
        if not cpus:
            raise BadInput("--cpus", "the CPU list is empty",
                           f"choose among CPUs {format_cpu_list(topo.allowed_cpus)}")
        _check_allowed(cpus, set(topo.allowed_cpus), "--cpus")
    selected = sorted(set(topo.allowed_cpus if cpus is None else cpus))
    k = _parse_mode(mode.strip(), len(selected))
    real = _narrow(topo.cores, selected)
    has_siblings = any(len(c) >= 2 for c in real)
    if k is None and (has_siblings or len(selected) < 2):
        return replace(topo, usable_cores=real, smt=has_siblings, emulated=False, warnings=())
    if k is None:
        k, why = 2, f"no selected core has two usable SMT siblings (smt/control " \
                    f"{topo.smt_control or 'absent'})"
    else:
        why = f"forced by --topology {mode.strip()}"
    pseudo = _emulate(real, k)
    warning = (f"emulated sibling grouping: {why}, so distinct CPUs are grouped into pseudo-cores "
               f"{_cores_text(pseudo)}; handshake and "
               f"IPI latencies are real cross-CPU numbers, but pseudo-siblings share no L1D or "
               f"fill buffers")
    return replace(topo, usable_cores=pseudo, smt=False, emulated=True, warnings=(warning,))


# --- human output -------------------------------------------------------------------------

def _cores_text(cores: Iterable[tuple[int, ...]]) -> str:
    return " ".join("[" + ",".join(map(str, c)) + "]" for c in cores)


def format_topology(topo: Topology, system: SystemInfo) -> str:
    """What `asirt topology` prints: the machine, what a run uses, and what makes it noisy."""
    def row(label: str, value: str) -> list[str]:
        return textwrap.wrap(value, width=100, initial_indent=f"{label:<17}",
                             subsequent_indent=" " * 17) or [label]

    l1d = topo.l1d_bytes
    smt = f"control {topo.smt_control or 'absent'}, active " + \
        {None: "unknown", True: "yes", False: "no"}[topo.smt_active]
    packages = "; ".join(f"{'?' if p is None else p}: CPUs {format_cpu_list(c)}"
                         for p, c in topo.packages.items())
    usable = _cores_text(topo.usable_cores) + (" (EMULATED: not real siblings)"
                                               if topo.emulated else "")
    lines = [
        *row("sysfs root", topo.sysfs_root),
        *row("online CPUs", f"{format_cpu_list(topo.online_cpus)} (offline: "
                            f"{format_cpu_list(topo.offline_cpus) or 'none'})"),
        *row("allowed CPUs", format_cpu_list(topo.allowed_cpus)),
        *row("packages", packages),
        *row(f"cores ({len(topo.cores)})", _cores_text(topo.cores)),
        *row("SMT", smt),
        *row("usable cores", usable),
        *row("real SMT in use", "yes" if topo.smt else "no"),
        *row("emulated", "true" if topo.emulated else "false"),
        *row("L1D", "unknown" if l1d is None else f"{l1d // 1024} KiB"),
        *row("isolated CPUs", format_cpu_list(system.isolated_cpus) or "none"),
        *row("nohz_full CPUs", format_cpu_list(system.nohz_full_cpus) or "none"),
        *row("governors", "; ".join(f"{g}: CPUs {format_cpu_list(c)}"
                                    for g, c in system.by_governor.items()) or "no cpufreq"),
        "vulnerabilities:" if system.vulnerabilities else "vulnerabilities: not reported",
    ]
    width = max((len(name) for name in system.vulnerabilities), default=0)
    lines += [f"  {name:<{width}}  {text}" for name, text in system.vulnerabilities.items()]
    for warning in (*topo.warnings, *system.warnings):
        lines += textwrap.wrap(warning, width=100, initial_indent="WARNING: ",
                               subsequent_indent="  ")
    return "\n".join(lines)
