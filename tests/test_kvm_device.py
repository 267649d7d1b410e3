"""The /dev/kvm device layer: the ABI against the kernel headers, probing, every exit of the
guest program, the window the guest samples, the kick, the cleanup, and the C exit floor."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pytest

from asirt import histogram
from asirt.cfloor import compiler
from asirt.errors import BadInput, FeatureMissing
from asirt.kvm import api, guest, vm as kvmvm
from asirt.kvmfloor import CProgram, ExitFloor
from asirt.kvm.guest import (CODE, CODE_GPA, IO_PORT_BASE, MMIO_GPA, SAMPLE_AFTER,
                             SAMPLE_BEFORE, SAMPLE_MAX, WINDOW_MAX, WORK_FOREVER, Request,
                             measure_exit_roundtrip)
from asirt.kvm.vm import (Exit, ExitKind, GuestFailed, Vcpu, Vm, buffer_address, kick,
                          kick_thread, probe)
from tests.kvm_fixtures import (is_mapped, kick_from_process, kick_from_thread, kvm_fds,
                                kvm_mappings, loaded_guest)

pytestmark = pytest.mark.timeout(60)
requires_kvm = pytest.mark.requires_kvm
requires_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler")


# -- the ABI --------------------------------------------------------------------------------

STRUCTS = [(api.KvmRegs, "struct kvm_regs"), (api.KvmSegment, "struct kvm_segment"),
           (api.KvmDtable, "struct kvm_dtable"), (api.KvmSregs, "struct kvm_sregs"),
           (api.KvmUserspaceMemoryRegion, "struct kvm_userspace_memory_region"),
           (api.KvmSignalMask, "struct kvm_signal_mask"), (api.KvmRun, "struct kvm_run")]
RUN_UNION = [("io", api.KvmRunIo), ("mmio", api.KvmRunMmio), ("fail_entry", api.KvmRunFailEntry),
             ("internal", api.KvmRunInternal), ("hw", api.KvmRunHw)]
CONSTANTS = sorted(name for name in vars(api) if name.startswith(("KVM_", "KVMIO"))
                   and isinstance(getattr(api, name), int)
                   and name not in ("KVM_NR_INTERRUPTS",))


def _layout() -> dict[str, int]:
    """Every size, offset and constant this module claims, keyed as the C program prints."""
    out: dict[str, int] = {}
    for cls, cname in STRUCTS:
        out[f"sizeof({cname})"] = ctypes.sizeof(cls)
        for field, *_ in cls._fields_:
            if field != "exit":           # KvmRun's name for the anonymous union
                out[f"offsetof({cname}, {field})"] = getattr(cls, field).offset
    for member, cls in RUN_UNION:
        for field, *_ in cls._fields_:
            out[f"offsetof(struct kvm_run, {member}.{field})"] = (
                api.KvmRun.exit.offset + getattr(cls, field).offset)
    out.update((name, getattr(api, name)) for name in CONSTANTS)
    return out


@requires_cc
def test_structs_and_numbers_match_the_installed_kernel_headers():
    layout = _layout()
    lines = "\n".join(f'    printf("%s=%lu\\n", "{key}", (unsigned long)({key}));'
                      for key in layout)
    source = ("#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvm.h>\n"
              f"int main(void) {{\n{lines}\n    return 0;\n}}\n")
    try:
        program = CProgram("kvmabi", source, {})
    except FeatureMissing as err:
        pytest.skip(f"cannot compile against <linux/kvm.h>: {err}")
    with program:
        printed = dict(line.rsplit("=", 1) for line in program.run([], timeout=60).splitlines())
    assert {k: int(v) for k, v in printed.items()} == layout


def test_ioctl_encoding_follows_asm_generic():
    # _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region): dir 1, size 32, type 0xAE, nr 0x46
    assert api.KVM_SET_USER_MEMORY_REGION == (1 << 30) | (32 << 16) | (0xAE << 8) | 0x46
    assert api.KVM_GET_REGS >> 30 == 2 and (api.KVM_GET_REGS >> 16) & 0x3FFF == 144
    assert api.EXIT_REASON_NAMES[api.KVM_EXIT_INTR] == "KVM_EXIT_INTR"


# -- probing --------------------------------------------------------------------------------

def test_probe_missing_device_says_what_to_check(tmp_path):
    support = probe(str(tmp_path / "kvm"))
    assert not support.usable
    assert "does not exist" in support.reason
    assert "lsmod | grep kvm" in support.reason and "nested" in support.reason


def test_probe_permission_denied_names_the_kvm_group(tmp_path, monkeypatch):
    # root bypasses permission bits, so the EACCES branch is reached through os.open itself
    def refuse(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(os, "open", refuse)
    support = probe(str(tmp_path / "kvm"))
    assert not support.usable and "EACCES" in support.reason and "kvm group" in support.reason


def test_probe_a_file_that_is_not_kvm(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    support = probe(str(fake))
    assert not support.usable
    assert "not a KVM device" in support.reason and "ENOTTY" in support.reason


def _fake_ioctl(monkeypatch, answers):
    real = kvmvm.fcntl.ioctl

    def ioctl(fd, request, *args):
        if request in answers:
            answer = answers[request]
            if isinstance(answer, OSError):
                raise answer
            return answer
        return real(fd, request, *args)
    monkeypatch.setattr(kvmvm.fcntl, "ioctl", ioctl)


def test_probe_wrong_api_version(tmp_path, monkeypatch):
    (tmp_path / "kvm").write_bytes(b"")
    _fake_ioctl(monkeypatch, {api.KVM_GET_API_VERSION: 11})
    support = probe(str(tmp_path / "kvm"))
    assert not support.usable and "returned 11" in support.reason and "12" in support.reason


def test_probe_create_vm_failing(tmp_path, monkeypatch):
    (tmp_path / "kvm").write_bytes(b"")
    _fake_ioctl(monkeypatch, {api.KVM_GET_API_VERSION: 12,
                              api.KVM_CREATE_VM: OSError(errno.EBUSY, "busy")})
    support = probe(str(tmp_path / "kvm"))
    assert not support.usable and "KVM_CREATE_VM failed with EBUSY" in support.reason


@requires_kvm
def test_probe_finds_this_machines_kvm():
    support = probe()
    assert support.usable, support.reason


def test_vm_on_a_missing_device_is_feature_missing_and_leaves_nothing(tmp_path):
    before = kvm_fds()
    with pytest.raises(FeatureMissing, match="does not exist"):
        Vm(path=str(tmp_path / "kvm"))
    assert kvm_fds() == before


# -- exits ----------------------------------------------------------------------------------

def _instruction_before(rip: int, length: int) -> bytes:
    return CODE[rip - CODE_GPA - length:rip - CODE_GPA]


@requires_kvm
@pytest.mark.parametrize("kind, code", [(ExitKind.IO, 0), (ExitKind.IO, 7), (ExitKind.IO, 255),
                                        (ExitKind.MMIO, 0), (ExitKind.MMIO, 0xDEADBEEF),
                                        (ExitKind.HLT, 3)])
def test_each_exit_decodes_with_its_code(kind, code):
    with loaded_guest() as (program, vcpu):
        for seq in (1, 2):      # twice: the guest loops back to the mailbox after each exit
            program.post(Request(seq=seq, exit_kind=kind, exit_code=code))
            exit_ = vcpu.run()
            assert exit_.kind is kind
            assert program.output().seq == seq
            if kind is ExitKind.IO:
                assert exit_ == Exit(kind, code, IO_PORT_BASE + code, api.KVM_EXIT_IO_OUT, 1)
                insn = b"\xee"                                    # out %al, %dx
            elif kind is ExitKind.MMIO:
                assert exit_ == Exit(kind, code, size=4, address=MMIO_GPA, is_write=True)
                insn = b"\x26\x66\xa3\x00\x00"                    # mov %eax, %es:0
            else:
                assert exit_ == Exit(ExitKind.HLT)
                insn = b"\xf4"                                    # hlt
            # RIP is past the instruction, or (IO, MMIO: api.rst allows it until KVM_RUN is
            # re-entered; VMX's fast PIO does it) at it; past it once the exit is completed
            rip = vcpu.get_regs().rip
            assert _instruction_before(rip, len(insn)) == insn or (
                kind is not ExitKind.HLT and CODE[rip - CODE_GPA:].startswith(insn))
            vcpu.complete_io()
            assert _instruction_before(vcpu.get_regs().rip, len(insn)) == insn


@requires_kvm
def test_mailbox_refuses_what_the_guest_cannot_do():
    with loaded_guest() as (program, _):
        with pytest.raises(BadInput, match="choose 0..255"):
            program.post(Request(seq=1, exit_code=256))
        with pytest.raises(BadInput, match="mapped window"):
            program.post(Request(seq=1, sample_len=4))       # no window mapped
        with pytest.raises(BadInput, match="unsigned 32-bit"):
            program.post(Request(seq=-1))
        with pytest.raises(ValueError):
            program.post(Request(seq=1, exit_kind=7))


@requires_kvm
def test_work_iterations_run_before_the_exit():
    with loaded_guest() as (program, vcpu):
        program.post(Request(seq=5, exit_kind=ExitKind.HLT, work_iters=1000))
        assert vcpu.run().kind is ExitKind.HLT and program.output().seq == 5


@requires_kvm
def test_a_guest_that_triple_faults_raises_guest_failed_with_registers():
    # lgdt/lidt with zero limits from the zero descriptor at 0x500, set CR0.PE, then a far
    # jump through the empty GDT: #GP with no IDT -> triple fault (SHUTDOWN) on hardware,
    # an emulation failure (INTERNAL_ERROR) where real mode is emulated
    code = bytes([0x0F, 0x01, 0x16, 0x00, 0x05,        # lgdt 0x500
                  0x0F, 0x01, 0x1E, 0x00, 0x05,        # lidt 0x500
                  0x0F, 0x20, 0xC0, 0x66, 0x83, 0xC8, 0x01, 0x0F, 0x22, 0xC0,  # CR0 |= PE
                  0xEA, 0x00, 0x10, 0x08, 0x00])       # ljmp $8, $0x1000
    with Vm() as vm:
        vm.ram[0x1000:0x1000 + len(code)] = code
        with Vcpu(vm, 0x1000) as vcpu, pytest.raises(GuestFailed) as info:
            for _ in range(3):
                vcpu.run()
    err = info.value
    assert err.reason in ("KVM_EXIT_SHUTDOWN", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_FAIL_ENTRY")
    assert "rip=0x" in str(err) and err.exit_code == 1


# -- the window -----------------------------------------------------------------------------

@requires_kvm
@pytest.mark.parametrize("after", [False, True])
def test_guest_reads_the_window_and_sees_changes(after):
    backing = mmap.mmap(-1, WINDOW_MAX)        # page-aligned, as KVM needs
    buf = np.frombuffer(backing, dtype=np.uint8)
    buf[:] = np.arange(WINDOW_MAX) % 251
    try:
        with loaded_guest() as (program, vcpu):
            program.map_window(buf, 0, WINDOW_MAX)
            request = Request(seq=1, exit_kind=ExitKind.IO, sample_off=0x1FF0, sample_len=300,
                              sample_when=SAMPLE_AFTER if after else SAMPLE_BEFORE,
                              work_iters=10)
            program.post(request)
            assert vcpu.run().kind is ExitKind.IO
            out = program.output()
            assert (out.seq, out.copies, out.data) == (1, 1, bytes(buf[0x1FF0:0x1FF0 + 300]))
            assert (out.after if after else out.before) == out.data
            buf[0x2000:0x2010] = 0xAB                       # the host writes between runs
            program.post(request._replace(seq=2))
            vcpu.run()
            out = program.output()
            assert (out.seq, out.data) == (2, bytes(buf[0x1FF0:0x1FF0 + 300]))
            assert out.data[16:32] == b"\xab" * 16
    finally:
        del buf
        backing.close()


@requires_kvm
def test_a_window_must_be_page_aligned():
    unaligned = np.zeros(2 * 4096 + 8, dtype=np.uint8)[8:]
    if buffer_address(unaligned) % 4096 == 0:
        unaligned = unaligned[8:]
    with loaded_guest() as (program, _), pytest.raises(BadInput, match="page-aligned buffer"):
        program.map_window(unaligned, 0, 4096)
    with pytest.raises(BadInput, match="C-contiguous"):
        buffer_address(np.zeros(8192, dtype=np.uint8)[::2])


@requires_kvm
def test_window_of_a_shared_mmap_at_an_offset():
    shared = mmap.mmap(-1, 4 * 4096)
    try:
        shared[2 * 4096:2 * 4096 + 5] = b"token"
        with loaded_guest() as (program, vcpu):
            program.map_window(shared, 2 * 4096, 4096)
            program.post(Request(seq=9, sample_len=SAMPLE_MAX))
            vcpu.run()
            out = program.output()
            assert out.data[:5] == b"token" and len(out.data) == SAMPLE_MAX
    finally:
        shared.close()     # possible: the Vm kept only the address, not an export


@requires_kvm
def test_clearing_the_answer_hides_the_last_pass_copies():
    """asirt.kvm.real clears the answer before each request: a kick between the guest's echo
    of a new seq and its clearing of the copy count showed the last pass's copies as the new
    pass's (a leak counted twice)."""
    with loaded_guest() as (program, vcpu):
        program.post(Request(seq=1, sample_len=0))
        vcpu.run()
        assert program.output().seq == 1
        program.clear_answer()
        assert (program.output().seq, program.output().copies) == (0, 0)
        program.post(Request(seq=2, sample_len=0))
        vcpu.run()
        assert program.output().seq == 2


@requires_kvm
def test_the_window_is_read_only_to_the_guest_and_can_be_remapped():
    first, second = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    first[:4], second[:4] = b"one!", b"two!"
    # mov $WINDOW_GPA >> 4, %ax; mov %ax, %ds; movb $0x42, 0x10; hlt
    store = bytes([0xB8, 0x00, 0x10, 0x8E, 0xD8, 0xC6, 0x06, 0x10, 0x00, 0x42, 0xF4])
    try:
        with loaded_guest() as (program, vcpu):
            program.map_window(first)
            program.vm.ram[0x8000:0x8000 + len(store)] = store
            with Vcpu(program.vm, 0x8000, index=1) as writer:
                assert writer.run() == Exit(ExitKind.MMIO, 0x42, size=1,
                                            address=guest.WINDOW_GPA + 0x10, is_write=True)
            assert first[0x10] == 0                         # KVM_MEM_READONLY held
            program.post(Request(seq=1, sample_len=4))
            vcpu.run()
            assert program.output().data == b"one!"
            program.vm.unmap(guest.WINDOW_SLOT)
            program.map_window(second)
            program.post(Request(seq=2, sample_len=4))
            vcpu.run()
            assert program.output().data == b"two!"
    finally:
        first.close()
        second.close()


@requires_kvm
def test_map_refuses_misaligned_or_overlapping_slots():
    with Vm() as vm:
        with pytest.raises(BadInput, match="multiple of the page size"):
            vm.map(1, 0x10000, 0x1000, 100)
        with pytest.raises(BadInput, match="already mapped"):
            vm.map(0, 0x10000, buffer_address(vm.ram), 4096)
        with pytest.raises(BadInput, match="overlaps slot 0"):
            vm.map(1, 0x0, buffer_address(vm.ram), 4096)


# -- the kick -------------------------------------------------------------------------------

def _no_kick_pending() -> bool:
    return signal.SIGUSR1 not in signal.sigpending()


@requires_kvm
def test_kick_from_a_thread_takes_a_spinning_guest_out():
    with loaded_guest(kick=True) as (program, vcpu):
        latencies = kick_from_thread(program, vcpu, rounds=5)
        assert len(latencies) == 5 and all(lat > 0 for lat in latencies)
        assert _no_kick_pending()                           # consumed, never delivered
        assert vcpu.run().kind is ExitKind.IO               # the guest goes on afterwards
        assert program.output().seq == 1                    # the pass that spun, finished


@requires_kvm
@pytest.mark.multiprocess
def test_kick_from_another_process():
    with loaded_guest(kick=True) as (program, vcpu):
        latencies = kick_from_process(program, vcpu, rounds=3)
        assert len(latencies) == 3
        assert _no_kick_pending()
        assert vcpu.run().kind is ExitKind.IO


@requires_kvm
def test_kick_pending_before_kvm_run_is_not_lost():
    with loaded_guest(kick=True) as (program, vcpu):
        program.post(Request(seq=1, work_iters=WORK_FOREVER))
        kick(*vcpu.kick_target)                  # before KVM_RUN: blocked, so pending
        assert signal.SIGUSR1 in signal.sigpending()
        assert vcpu.run().kind is ExitKind.INTR
        assert _no_kick_pending()
        program.post(Request(seq=2))
        assert vcpu.run().kind is ExitKind.IO


@requires_kvm
def test_immediate_exit_returns_without_entering_the_guest():
    with loaded_guest() as (program, vcpu):
        program.post(Request(seq=1))
        vcpu.run()
        vcpu.complete_io()                  # itself an immediate exit: finishes the `out`
        rip = vcpu.get_regs().rip
        vcpu.immediate_exit = True
        assert vcpu.run().kind is ExitKind.INTR
        assert vcpu.get_regs().rip == rip and not vcpu.immediate_exit
        assert vcpu.run().kind is ExitKind.IO


@requires_kvm
def test_without_the_kick_mask_python_runs_the_handler_and_kvm_run_is_not_restarted():
    """fcntl.ioctl raises InterruptedError after running the handler (no PEP 475 retry)."""
    handled = []
    old = signal.signal(signal.SIGUSR1, lambda signo, frame: handled.append(signo))
    try:
        with loaded_guest() as (program, vcpu):
            program.post(Request(seq=1, work_iters=WORK_FOREVER))
            me = threading.get_ident()
            timer = threading.Timer(0.05, kick_thread, (me,))
            timer.start()
            try:
                assert vcpu.run().kind is ExitKind.INTR     # not restarted: it would spin on
            finally:
                timer.join()
            assert handled == [signal.SIGUSR1]

            class Stop(Exception):
                pass

            def raise_stop(signo, frame):
                raise Stop
            signal.signal(signal.SIGUSR1, raise_stop)
            timer = threading.Timer(0.05, kick_thread, (me,))
            timer.start()
            try:
                with pytest.raises(Stop):                   # a handler's exception propagates
                    vcpu.run()
            finally:
                timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)


@requires_kvm
def test_kick_setup_is_undone_by_close():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with loaded_guest(kick=True) as (_, vcpu):
        assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        kick_thread(threading.get_ident())                  # left pending at close
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before and _no_kick_pending()
    with pytest.raises(ValueError):
        vcpu.kick_target


# -- cleanup --------------------------------------------------------------------------------

@requires_kvm
def test_no_fd_or_mapping_is_left_after_a_run():
    before, maps_before = kvm_fds(), kvm_mappings()
    with loaded_guest(kick=True) as (program, vcpu):
        ram = buffer_address(program.vm.ram)
        program.post(Request(seq=1))
        vcpu.run()
        assert len(kvm_fds()) > len(before) and len(kvm_mappings()) > len(maps_before)
    assert kvm_fds() == before and kvm_mappings() == maps_before
    assert not is_mapped(ram)
    vcpu.close()                                            # idempotent
    program.vm.close()
    with pytest.raises(ValueError, match="closed"):
        vcpu.run()


@requires_kvm
def test_a_constructor_failing_half_way_leaves_nothing():
    before = kvm_fds()
    with pytest.raises(BadInput):
        Vm(ram_size=100)
    with Vm() as vm:
        Vcpu(vm, 0x1000).close()
        fds = kvm_fds()
        with pytest.raises(kvmvm.KvmCallFailed, match="EEXIST"):
            Vcpu(vm, 0x1000)                                # index 0 exists until the VM goes
        assert kvm_fds() == fds
    assert kvm_fds() == before


# -- measuring ------------------------------------------------------------------------------

@requires_kvm
@pytest.mark.parametrize("kind", [ExitKind.IO, ExitKind.MMIO, ExitKind.HLT])
def test_measure_exit_roundtrip(kind):
    with loaded_guest() as (_, vcpu):
        samples = measure_exit_roundtrip(vcpu, 50, kind)
    assert len(samples) == 50 and all(s > 0 for s in samples)


# -- the guest's bytes ----------------------------------------------------------------------

@pytest.mark.skipif(any(shutil.which(t) is None for t in ("as", "objcopy", "objdump")),
                    reason="needs binutils (as, objcopy, objdump)")
def test_code_is_guest_s_assembled():
    assert guest.assemble() == CODE, "run: python -m asirt.kvm.guest --regenerate"


# -- the exit floor -------------------------------------------------------------------------

@requires_kvm
@requires_cc
@pytest.mark.multiprocess
def test_exit_floor_measures_real_exits_and_buckets_like_python():
    values = [0, 1, 127, 128, 255, 256, 12345, 10**9, 2**41, 2**50, -5]
    values += [int(v) for v in np.random.default_rng(2).integers(0, 2**42, 200)]
    cpu = max(os.sched_getaffinity(0))
    with ExitFloor() as floor:
        directory = floor.directory
        assert floor.bucket(values) == [histogram.bucket_index(v) for v in values]
        summary = histogram.summarize(floor.measure(cpu, 0.2))
    assert summary.count > 100 and 0 < summary.p50 <= summary.p99
    assert not os.path.exists(directory)


# Starts an exit floor measurement that would run for a minute and says its directory.
FLOOR_PARENT = """
import os, sys
from asirt.kvmfloor import ExitFloor
floor = ExitFloor()
print(floor.directory, flush=True)
floor.measure(max(os.sched_getaffinity(0)), 60)
"""


@requires_kvm
@requires_cc
@pytest.mark.multiprocess
def test_exit_floor_child_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", FLOOR_PARENT], stdout=subprocess.PIPE,
                              text=True)
    directory = ""
    try:
        directory = parent.stdout.readline().strip()
        deadline = time.monotonic() + 30
        while not (floors := psutil.Process(parent.pid).children()):
            assert time.monotonic() < deadline, "the floor program never started"
            time.sleep(0.05)
        parent.kill()                       # SIGKILL: no Python cleanup runs in the parent
        parent.wait()
        _, alive = psutil.wait_procs(floors, timeout=10)
        assert not alive, "PR_SET_PDEATHSIG did not kill the floor program"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        if directory.startswith(tempfile.gettempdir()):
            shutil.rmtree(directory, ignore_errors=True)    # a SIGKILLed owner cannot


@requires_kvm
def test_exit_floor_removes_its_directory_when_the_compile_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(FeatureMissing, match="working C compiler"):
        ExitFloor()
    assert os.listdir(tmp_path) == []


def test_exit_floor_needs_kvm(tmp_path):
    with pytest.raises(FeatureMissing, match="does not exist"):
        ExitFloor(path=str(tmp_path / "kvm"))


@requires_kvm
def test_kick_latency_is_bounded_generously():
    """A spinning guest leaves KVM_RUN soon after a kick (a bound for a loaded CI machine,
    not a target: bench/test_bench_kvm_exit.py reports the numbers)."""
    with loaded_guest(kick=True) as (program, vcpu):
        start = time.monotonic()
        latencies = kick_from_thread(program, vcpu, rounds=3)
    assert max(latencies) < 5e9 and time.monotonic() - start < 30


@requires_kvm
def test_a_pass_copies_the_window_before_and_after_its_work_and_counts_each_copy():
    backing = mmap.mmap(-1, WINDOW_MAX)
    try:
        backing[:8] = b"earlier!"
        with loaded_guest() as (program, vcpu):
            program.map_window(backing, 0, WINDOW_MAX)
            program.post(Request(seq=3, exit_kind=ExitKind.HLT, sample_len=8,
                                 sample_when=SAMPLE_BEFORE | SAMPLE_AFTER, work_iters=10))
            assert vcpu.run().kind is ExitKind.HLT
            out = program.output()
            assert (out.seq, out.copies, out.before, out.after) == (3, 2, b"earlier!",
                                                                   b"earlier!")
            program.post(Request(seq=4, exit_kind=ExitKind.HLT, sample_len=8,
                                 sample_when=SAMPLE_BEFORE | SAMPLE_AFTER,
                                 work_iters=WORK_FOREVER))
            threading.Timer(0.05, lambda: backing.__setitem__(slice(0, 8), b"later!!!")).start()
            threading.Timer(0.1, lambda: program.post(Request(
                seq=4, exit_kind=ExitKind.HLT, sample_len=8,
                sample_when=SAMPLE_BEFORE | SAMPLE_AFTER))).start()
            assert vcpu.run().kind is ExitKind.HLT
            out = program.output()
            assert (out.seq, out.copies, out.before, out.after) == (4, 2, b"earlier!",
                                                                   b"later!!!")
    finally:
        backing.close()
