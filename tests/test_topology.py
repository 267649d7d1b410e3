"""Topology reading and selection against fake sysfs trees of real layouts, and this host."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asirt.errors import BadInput
from asirt.system import read_system
from asirt.topology import (MAX_CPU, format_cpu_list, format_topology, parse_cpu_arg,
                            parse_cpu_list, parse_size, read_topology, select_topology)
from tests.sysfs import LAYOUTS

# --- parsers ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, cpus", [
    ("", []), ("\n", []), ("0", [0]), ("0-3,8", [0, 1, 2, 3, 8]), ("0-1\n", [0, 1]),
    ("8,0-1", [0, 1, 8]), ("2,2,1-2", [1, 2]), (" 0 - 1 , 4 ", [0, 1, 4]),
])
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["0-", "-1", "3-1", "a", "0,,1", "1,", "0-2-4", "0x1",
                                  "1.5", "0:2", f"0-{MAX_CPU + 1}", "٣"])
def test_parse_cpu_list_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


@pytest.mark.parametrize("cpus, text", [
    ([], ""), ([0], "0"), ([0, 1], "0-1"), ([0, 1, 2, 3, 8], "0-3,8"), ([8, 0, 1, 1], "0-1,8"),
    ([0, 2, 4], "0,2,4"),
])
def test_format_cpu_list(cpus: list[int], text: str) -> None:
    assert format_cpu_list(cpus) == text


def test_format_cpu_list_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_cpu_list([-1, 0])


@given(st.sets(st.integers(min_value=0, max_value=4096), max_size=64))
def test_cpu_list_round_trip(cpus: set[int]) -> None:
    text = format_cpu_list(cpus)
    assert parse_cpu_list(text) == sorted(cpus)
    assert format_cpu_list(parse_cpu_list(text)) == text


@pytest.mark.parametrize("text, size", [("32K", 32768), ("48K\n", 49152), ("1M", 1 << 20),
                                        ("64", 64)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "32KB", "-1K", "1.5M"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --- real layouts -------------------------------------------------------------------------

def _pairs(n: int) -> tuple[tuple[int, ...], ...]:
    return tuple((i, i + n // 2) for i in range(n // 2))


EXPECTED = {  # layout -> (cores, allowed, usable cores, smt)
    "two_socket_smt2": (_pairs(16), tuple(range(16)), _pairs(16), True),
    "adjacent_smt2": (((0, 1), (2, 3), (4, 5), (6, 7)), tuple(range(8)),
                      ((0, 1), (2, 3), (4, 5), (6, 7)), True),
    "power_smt4": (((0, 1, 2, 3), (4, 5, 6, 7)), tuple(range(8)),
                   ((0, 1, 2, 3), (4, 5, 6, 7)), True),
    "power_smt8": ((tuple(range(8)), tuple(range(8, 16))), tuple(range(16)),
                   (tuple(range(8)), tuple(range(8, 16))), True),
    "alder_lake_hybrid": (tuple((2 * i, 2 * i + 1) for i in range(8)) + ((16,), (17,), (18,),
                                                                            (19,)),
                          tuple(range(20)),
                          tuple((2 * i, 2 * i + 1) for i in range(8)) + ((16,), (17,), (18,),
                                                                            (19,)), True),
    "offline_cpus": (((0,), (1, 9), (2, 10), (4, 12), (5, 13), (6, 14), (7, 15)),
                     (0, 1, 2, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15),
                     ((0,), (1, 9), (2, 10), (4, 12), (5, 13), (6, 14), (7, 15)), True),
    "cpuset": (((0, 1), (2, 3), (4, 5), (6, 7)), (0, 2, 3), ((0,), (2, 3)), True),
    "kvm_2cpu_nosmt": (((0,), (1,)), (0, 1), ((0,), (1,)), False),
    "legacy_kernel": (_pairs(8), tuple(range(8)), _pairs(8), True),
}


def test_every_layout_has_expectations() -> None:
    assert set(EXPECTED) == set(LAYOUTS)


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_layout_parses(fake_sysfs, layout: str) -> None:
    cores, allowed, usable, smt = EXPECTED[layout]
    topo = read_topology(fake_sysfs(layout))
    assert topo.cores == cores
    assert topo.allowed_cpus == allowed
    assert topo.usable_cores == usable
    assert topo.smt is smt
    assert topo.emulated is False
    assert sorted(topo.online_cpus) == sorted(c for core in cores for c in core)
    assert set(topo.cpu_info) == set(topo.online_cpus)
    # auto keeps real siblings wherever a usable core has two
    if smt:
        assert select_topology(topo, "auto") == topo
    json.dumps(topo.to_json())


def test_two_socket_details(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("two_socket_smt2"))
    assert topo.packages == {0: (0, 1, 2, 3, 8, 9, 10, 11), 1: (4, 5, 6, 7, 12, 13, 14, 15)}
    assert topo.cpu_info[12].package == 1 and topo.cpu_info[12].core == 0
    assert topo.cpu_info[12].die == 0
    assert topo.smt_control == "on" and topo.smt_active is True
    assert topo.l1d_bytes == 48 * 1024
    assert topo.core_of(9) == (1, 9)
    assert topo.sibling_pairs() == [(i, i + 8) for i in range(8)]
    with pytest.raises(ValueError):
        topo.core_of(99)


def test_smt4_and_smt8_pairs(fake_sysfs) -> None:
    smt4 = read_topology(fake_sysfs("power_smt4"))
    assert len(smt4.sibling_pairs()) == 2 * 6
    assert smt4.cpu_info[0].die == -1  # architectures without dies report -1
    assert smt4.l1d_bytes == 32 * 1024
    smt8 = read_topology(fake_sysfs("power_smt8"))
    assert smt8.smt_control == "8"
    assert len(smt8.sibling_pairs()) == 2 * 28


def test_hybrid_l1d_and_selection(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("alder_lake_hybrid"))
    assert topo.cpu_info[0].l1d_bytes == 48 * 1024
    assert topo.cpu_info[16].l1d_bytes == 32 * 1024
    # P-core + E-core: one real pair is enough for real SMT
    mixed = select_topology(topo, "auto", [2, 3, 16])
    assert mixed.usable_cores == ((2, 3), (16,)) and mixed.smt and not mixed.emulated
    # E-cores only: no siblings, so auto emulates
    ecores = select_topology(topo, "auto", [16, 17, 18, 19])
    assert ecores.emulated and not ecores.smt
    assert ecores.usable_cores == ((16, 17), (18, 19))
    assert ecores.l1d_bytes == 32 * 1024


def test_offline_cpus_have_no_topology(fake_sysfs) -> None:
    root = fake_sysfs("offline_cpus")
    assert not os.path.exists(os.path.join(root, "devices/system/cpu/cpu8/topology"))
    topo = read_topology(root)
    assert topo.offline_cpus == (3, 8, 11)
    assert 8 not in topo.cpu_info
    assert topo.core_of(0) == (0,)


def test_cpuset_file_narrows_allowed(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("cpuset"))
    assert topo.allowed_cpus == (0, 2, 3)
    assert topo.cores == ((0, 1), (2, 3), (4, 5), (6, 7))  # the machine, not the cpuset
    assert topo.sibling_pairs() == [(2, 3)]
    with pytest.raises(BadInput) as err:
        select_topology(topo, "auto", [1, 2])
    assert "--cpus" in str(err.value) and "0,2-3" in str(err.value)


def test_explicit_allowed(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("adjacent_smt2"), allowed=[1, 2, 3, 99])
    assert topo.allowed_cpus == (1, 2, 3)
    assert topo.usable_cores == ((1,), (2, 3))
    with pytest.raises(BadInput) as err:
        read_topology(fake_sysfs("adjacent_smt2"), allowed=[42])
    assert "allowed CPUs" in str(err.value)


def test_legacy_kernel_falls_back_to_thread_siblings(fake_sysfs) -> None:
    root = fake_sysfs("legacy_kernel")
    assert not os.path.exists(os.path.join(root, "devices/system/cpu/cpu0/topology/core_cpus_list"))
    topo = read_topology(root)
    assert topo.cores == _pairs(8)
    assert topo.cpu_info[0].die is None
    assert topo.smt_control is None and topo.smt_active is None


def test_online_cpu_without_topology_is_its_own_core(fake_sysfs, tmp_path) -> None:
    root = fake_sysfs("adjacent_smt2")
    topo_dir = os.path.join(root, "devices/system/cpu/cpu7/topology")
    for name in os.listdir(topo_dir):
        os.unlink(os.path.join(topo_dir, name))
    os.rmdir(topo_dir)
    # cpu6 still lists cpu7 as a sibling, cpu7 has no list: the tree is inconsistent
    with pytest.raises(BadInput, match="cpu6"):
        read_topology(root)
    root = fake_sysfs(cores=[[0], [1]])
    os.rename(os.path.join(root, "devices/system/cpu/cpu1/topology"),
              os.path.join(root, "devices/system/cpu/cpu1/gone"))
    assert read_topology(root).cores == ((0,), (1,))


def test_cpus_are_the_selected_cpus(fake_sysfs) -> None:
    """allowed_cpus is what the process may use; cpus is what a run measures (--cpus)."""
    root = fake_sysfs("legacy_kernel")            # isolated and nohz_full: 1-3,5-7
    topo = read_topology(root)
    assert topo.cpus == topo.allowed_cpus == tuple(range(8))
    sel = select_topology(topo, "auto", [1, 5])
    assert sel.allowed_cpus == tuple(range(8)) and sel.cpus == (1, 5)
    emu = select_topology(topo, "emulated", [0, 1, 4, 5])   # pseudo-cores (0,1),(4,5)
    assert emu.cpus == (0, 1, 4, 5)
    # the system report of the measured CPUs names only those
    assert not any("isol" in w or "nohz" in w for w in read_system(root, sel.cpus).warnings)
    assert any("measured CPUs 0,4 are not isolated" in w
               for w in read_system(root, emu.cpus).warnings)


# --- emulation ----------------------------------------------------------------------------

def test_kvm_auto_falls_back_to_emulated(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("kvm_2cpu_nosmt"))
    assert topo.smt_control == "notsupported" and topo.smt_active is False
    sel = select_topology(topo, "auto")
    assert sel.emulated is True and sel.smt is False
    assert sel.usable_cores == ((0, 1),)
    assert sel.cores == ((0,), (1,))  # the machine is unchanged
    assert sel.sibling_pairs() == [(0, 1)]
    assert len(sel.warnings) == 1 and "emulated sibling grouping" in sel.warnings[0]
    assert "notsupported" in sel.warnings[0]
    data = sel.to_json()
    assert data["emulated"] is True and data["warnings"] == list(sel.warnings)
    text = format_topology(sel, read_system(topo.sysfs_root))
    assert "emulated         true" in text and "WARNING: emulated sibling grouping" in text


def test_auto_with_one_cpu_has_nothing_to_emulate(fake_sysfs) -> None:
    sel = select_topology(read_topology(fake_sysfs("kvm_2cpu_nosmt")), "auto", [1])
    assert sel.usable_cores == ((1,),) and not sel.emulated and not sel.smt


def test_auto_restricted_to_non_siblings_emulates(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("two_socket_smt2"))
    assert select_topology(topo, "auto", [0, 8]).usable_cores == ((0, 8),)
    sel = select_topology(topo, "auto", [0, 1])
    assert sel.emulated and sel.usable_cores == ((0, 1),)


@pytest.mark.parametrize("layout, mode, cpus, usable", [
    # round-robin over real cores keeps real siblings apart
    ("adjacent_smt2", "emulated", None, ((0, 2), (1, 3), (4, 6), (5, 7))),
    ("adjacent_smt2", "emulated:2", [0, 1, 2, 3], ((0, 2), (1, 3))),
    ("two_socket_smt2", "emulated:4", None, ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11),
                                             (12, 13, 14, 15))),
    ("kvm_2cpu_nosmt", "emulated:2", None, ((0, 1),)),
    # K does not divide the CPU count: one pseudo-core is smaller
    ("power_smt8", "emulated:2", [0, 8, 9], ((0, 8), (9,))),
    ("power_smt8", "emulated:8", None, ((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14,
                                                                       15))),
])
def test_emulated_forced(fake_sysfs, layout: str, mode: str, cpus: list[int] | None,
                         usable: tuple) -> None:
    sel = select_topology(read_topology(fake_sysfs(layout)), mode, cpus)
    assert sel.emulated and not sel.smt
    assert sel.usable_cores == usable
    assert f"--topology {mode}" in sel.warnings[0]


def test_emulated_pseudo_cores_cover_every_cpu_once() -> None:
    from asirt.topology import _emulate
    real = ((0, 8), (1, 9), (2,), (3, 11))
    for k in range(2, 8):
        cpus = [c for core in _emulate(real, k) for c in core]
        assert sorted(cpus) == [0, 1, 2, 3, 8, 9, 11]


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["emul", "real", "emulated:", "emulated:x", "emulated:-2",
                                  "emulated:2:2", "AUTO", ""])
def test_bad_mode_strings(fake_sysfs, mode: str) -> None:
    topo = read_topology(fake_sysfs("adjacent_smt2"))
    with pytest.raises(BadInput) as err:
        select_topology(topo, mode)
    msg = str(err.value)
    assert msg.startswith("--topology:") and repr(mode.strip()) in msg
    assert "auto, emulated, emulated:K with K in 2..8" in msg
    assert err.value.exit_code == 2


@pytest.mark.parametrize("mode, cpus", [("emulated:3", None), ("emulated:9", None),
                                        ("emulated:1", None), ("emulated:0", None),
                                        ("emulated", [0])])
def test_k_does_not_fit(fake_sysfs, mode: str, cpus: list[int] | None) -> None:
    topo = read_topology(fake_sysfs("kvm_2cpu_nosmt"))
    with pytest.raises(BadInput) as err:
        select_topology(topo, mode, cpus)
    msg = str(err.value)
    assert msg.startswith("--topology:") and mode in msg
    if cpus is None:
        assert "valid values: auto, emulated, emulated:K with K in 2..2" in msg


def test_k_up_to_8_on_a_big_machine(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("two_socket_smt2"))
    assert select_topology(topo, "emulated:8").usable_cores[0] == tuple(range(8))
    with pytest.raises(BadInput, match="2..8"):
        select_topology(topo, "emulated:9")


@pytest.mark.parametrize("text, problem", [
    ("0-", "not a CPU list"), ("a", "not a CPU list"), ("3-1", "ends before it starts"),
    ("-1", "not a CPU list"), ("", "empty"), ("0-5", "CPU(s) 2-5 are offline"),
    ("7", "CPU(s) 7 are"),
])
def test_bad_cpu_arg(text: str, problem: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_cpu_arg(text, [0, 1], option="--cpus")
    msg = str(err.value)
    assert msg.startswith("--cpus:") and problem in msg and "0-1" in msg
    assert err.value.exit_code == 2


def test_good_cpu_arg() -> None:
    assert parse_cpu_arg("1,0", range(4)) == [0, 1]
    assert parse_cpu_arg("2-3", [2, 3], option="--pin") == [2, 3]


def test_select_rejects_cpus_outside_allowed(fake_sysfs) -> None:
    topo = read_topology(fake_sysfs("kvm_2cpu_nosmt"))
    with pytest.raises(BadInput) as err:
        select_topology(topo, "auto", [0, 5])
    assert str(err.value).startswith("--cpus:") and "choose among CPUs 0-1" in str(err.value)
    with pytest.raises(BadInput, match="empty"):
        select_topology(topo, "auto", [])


def test_root_that_is_not_sysfs(tmp_path, fake_sysfs) -> None:
    for root in (tmp_path, tmp_path / "missing"):
        with pytest.raises(BadInput) as err:
            read_topology(str(root))
        msg = str(err.value)
        assert msg.startswith("--sysfs-root:") and str(root) in msg
        assert "devices/system/cpu/online" in msg and "/sys" in msg
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput):
        read_topology(str(tmp_path / "file"))
    # a common slip: passing the cpu directory itself
    cpu_dir = os.path.join(fake_sysfs("kvm_2cpu_nosmt"), "devices/system/cpu")
    with pytest.raises(BadInput, match="looks like the devices/system/cpu directory"):
        read_topology(cpu_dir)


def test_damaged_tree(fake_sysfs) -> None:
    root = fake_sysfs("adjacent_smt2")
    with open(os.path.join(root, "devices/system/cpu/cpu2/topology/core_cpus_list"), "w") as f:
        f.write("2-x\n")
    with pytest.raises(BadInput, match="cpu2/topology/core_cpus_list"):
        read_topology(root)
    root = fake_sysfs("adjacent_smt2")
    with open(os.path.join(root, "devices/system/cpu/cpu2/topology/core_cpus_list"), "w") as f:
        f.write("2-4\n")  # cpu2 claims 4, cpu4 says (4,5)
    with pytest.raises(BadInput, match="inconsistent"):
        read_topology(root)


def test_unreadable_is_not_absent(fake_sysfs) -> None:
    root = fake_sysfs("adjacent_smt2")
    path = os.path.join(root, "devices/system/cpu/smt/control")
    os.unlink(path)
    os.mkdir(path)  # EISDIR: there, but unreadable (root ignores chmod, so use a directory)
    with pytest.raises(BadInput) as err:
        read_topology(root)
    assert path in str(err.value) and "cannot be read" in str(err.value)


# --- output -------------------------------------------------------------------------------

def test_to_json_keys(fake_sysfs) -> None:
    data = read_topology(fake_sysfs("two_socket_smt2")).to_json()
    for key in ("cores", "smt", "emulated", "allowed_cpus", "usable_cores", "smt_control",
                "online_cpus", "offline_cpus", "l1d_bytes", "smt_active", "cpus", "warnings"):
        assert key in data
    assert data["cores"][0] == [0, 8] and data["l1d_bytes"] == 49152
    assert json.loads(json.dumps(data)) == data


def test_format_topology(fake_sysfs) -> None:
    root = fake_sysfs("two_socket_smt2")
    text = format_topology(read_topology(root), read_system(root))
    assert "[0,8] [1,9]" in text
    assert "allowed CPUs     0-15" in text
    assert "L1D              48 KiB" in text
    assert "0: CPUs 0-3,8-11; 1: CPUs 4-7,12-15" in text
    assert "mds" in text and "SMT vulnerable" in text
    assert "WARNING: no isolated CPUs" in text
    assert "WARNING: emulated" not in text


# --- this host ----------------------------------------------------------------------------

def test_real_sys() -> None:
    topo = read_topology()
    online = set(topo.online_cpus)
    assert len(online) == os.cpu_count()  # CPython asks sysconf(_SC_NPROCESSORS_ONLN)
    assert set(topo.allowed_cpus) == os.sched_getaffinity(0) & online
    assert sorted(c for core in topo.cores for c in core) == sorted(online)
    assert topo.sysfs_root == "/sys"
    with open("/sys/devices/system/cpu/online") as f:
        assert list(topo.online_cpus) == parse_cpu_list(f.read())
    if topo.l1d_bytes is not None:
        assert 4096 <= topo.l1d_bytes <= 1 << 20
    sel = select_topology(topo, "auto")
    assert sel.emulated == (not topo.smt and len(topo.allowed_cpus) >= 2)
    info = read_system(cpus=topo.allowed_cpus)
    assert set(info.isolated_cpus) <= online
    json.dumps({"topology": sel.to_json(), "system": info.to_json()})
    assert format_topology(sel, info)
