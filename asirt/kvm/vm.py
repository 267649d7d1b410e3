"""A real VM through /dev/kvm: probing, a VM with its guest RAM, and one real-mode vCPU.

Layers and lifetimes: ``Vm`` owns the /dev/kvm fd, the VM fd, the guest RAM (an anonymous
mmap in slot 0 at guest-physical 0) and its vCPUs; ``Vcpu`` owns its fd and the mapping of its
``struct kvm_run``. ``close()`` is idempotent on both, runs on every exit path of the context
managers and of a constructor that fails half-way, and ``Vm.close()`` closes its vCPUs first
(a vCPU fd keeps the VM alive in the kernel).

Quirks this module relies on, with their source:

- **Python's ``fcntl.ioctl`` does not retry on EINTR.** PEP 475 made most syscall wrappers
  retry, but ``fcntl.ioctl`` calls ``ioctl(2)`` once and turns -1 into an exception through
  ``PyErr_SetFromErrno``, which on EINTR first runs the Python signal handlers
  (``PyErr_CheckSignals``): an exception raised by a handler propagates, otherwise
  ``InterruptedError`` is raised (CPython 3.11 Modules/fcntlmodule.c; checked by
  tests/test_kvm_device.py). ``Vcpu.run()`` turns that into ``Exit(INTR)``; it never restarts
  KVM_RUN behind the caller's back, because an EINTR *is* the kick the caller asked for.
- **The kick** (Documentation/virt/kvm/api.rst, KVM_SET_SIGNAL_MASK: "Any unblocked signal
  received [...] will cause KVM_RUN to return with -EINTR. Note the signal will only be
  delivered if not blocked by the original signal mask"). ``enable_kick()`` blocks SIGUSR1 in
  the vCPU thread and gives KVM_RUN a mask with SIGUSR1 unblocked, as QEMU does: a SIGUSR1
  pending before KVM_RUN (KVM checks ``signal_pending()`` before entering the guest) or arriving
  during it makes KVM_RUN return -EINTR at once; the kernel restores the blocked mask before
  returning, so the signal is never delivered, and ``run()`` consumes it with
  ``sigtimedwait(..., 0)``. A Python-level handler alone would race: Python runs handlers
  between bytecodes, so a signal that lands after the caller's last check and before the
  ``ioctl`` enters the kernel is only *noted* by the C handler, and KVM_RUN then enters the
  guest with nothing pending: the kick is seen after the guest's next exit, which for a
  spinning guest is never. (With SIG_DFL and no KVM mask, SIGUSR1 would kill the process;
  before Linux 4.15, commit 20b7035c66ba, a blocked-then-unblocked signal with SIG_DFL
  disposition could also kill it instead of making KVM_RUN return.)
  Seen here: a kick returns -EINTR with exit_reason KVM_EXIT_INTR (x86.c's
  ``kvm_handle_signal_exit``), both when SIGUSR1 was pending before KVM_RUN and when it
  arrived while the guest spun; afterwards SIGUSR1 is still pending, undelivered.
- **immediate_exit** (api.rst, "The kvm_run structure": "polled once when KVM_RUN starts; if
  non-zero, KVM_RUN exits immediately, returning -EINTR"). ``Vcpu.immediate_exit = True``
  makes the next run() return ``Exit(INTR)`` without entering the guest; run() clears it.
  Seen here: exit_reason is *not* updated (it still held the previous KVM_EXIT_IO) and RIP
  is unchanged, so only the EINTR says what happened: run() never reads exit_reason then.
- **Where an exit leaves RIP.** Without an in-kernel irqchip (this VM creates none) HLT exits
  to user space with KVM_EXIT_HLT and RIP already past the ``hlt`` (x86.c skips the
  instruction before exiting), so the next KVM_RUN resumes after it. For KVM_EXIT_IO and
  KVM_EXIT_MMIO api.rst says "the corresponding operations are complete (and guest state is
  consistent) only after userspace has re-entered the kernel with KVM_RUN. The kernel side
  will first finish incomplete operations and then check for pending signals": on VMX/SVM
  the fast-PIO path leaves RIP *at* the ``out`` until then. ``Vcpu.complete_io()`` re-enters
  with immediate_exit set, as the kernel's selftests do (``vcpu_run_complete_io``), so the
  registers are consistent without running the guest. Seen on the development machine
  (kvm_pvm, which emulates real mode): RIP is already past the ``out`` and past the MMIO
  ``mov`` when KVM_RUN returns; an MMIO *write* needs nothing from user space, the data is
  in kvm_run.mmio. tests/test_kvm_device.py checks RIP after each exit and after completion.
- **Kick the thread, not the process.** A process-directed signal (``kill(2)``) goes to any
  thread of the target that does not block it. An asirt process has such threads before it
  runs any code of ours: importing numpy starts OpenBLAS's worker threads (one per extra CPU),
  which never block SIGUSR1. Seen on the development machine: a process-directed SIGUSR1 to a
  process whose vCPU thread had enabled the kick went to an OpenBLAS thread and, SIGUSR1 being
  SIG_DFL, killed the process. So ``kick(pid, tid)`` sends a thread-directed signal with
  tgkill(2) to the vCPU thread (``Vcpu.kick_target``), and ``kick_thread`` does the same
  inside the process; ``kick(pid)`` alone is process-directed and safe only in a process
  whose every thread blocks SIGUSR1 (block it before importing numpy: threads inherit it).

Imports only the standard library, asirt.errors, asirt.proc (tgkill) and asirt.kvm.api.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
from typing import Callable, NamedTuple

from asirt.errors import AsirtError, BadInput, FeatureMissing
from asirt.kvm import api
from asirt.proc import tgkill

__all__ = ["DEFAULT_PATH", "KICK_SIGNAL", "PAGE_SIZE", "KvmSupport", "probe", "Vm", "Vcpu",
           "ExitKind", "Exit", "kick", "kick_thread", "buffer_address", "KvmCallFailed",
           "GuestFailed"]

#: the KVM device; ASIRT_KVM_DEVICE points elsewhere (a test of a host without KVM, a device
#: node in a container)
DEFAULT_PATH = os.environ.get("ASIRT_KVM_DEVICE") or "/dev/kvm"     # empty: unset
KICK_SIGNAL = signal.SIGUSR1
PAGE_SIZE = mmap.PAGESIZE
#: RFLAGS after setup: bit 1 is reserved and always 1; IF = 0, so no interrupt is ever taken
RFLAGS_RESET = 0x2


class KvmCallFailed(AsirtError):
    """An ioctl on a KVM fd failed where the host, not the input, is to blame."""

    exit_code = 1

    def __init__(self, call: str, errno_: int, fix: str = "") -> None:
        super().__init__(call, errno_, fix)
        self.call, self.errno, self.fix = call, errno_, fix

    def message(self) -> str:
        msg = f"{self.call} failed with {_errno_name(self.errno)} ({os.strerror(self.errno)})"
        return f"{msg}; {self.fix}" if self.fix else msg


class GuestFailed(AsirtError):
    """KVM_RUN ended with an exit the guest program never asks for (a triple fault, a failed
    VM entry, an emulation failure...): the guest or its setup is broken."""

    exit_code = 1

    def __init__(self, reason: str, detail: str, registers: str) -> None:
        super().__init__(reason, detail, registers)
        self.reason, self.detail, self.registers = reason, detail, registers

    def message(self) -> str:
        return (f"the guest stopped with {self.reason} ({self.detail}); registers: "
                f"{self.registers}. Check the guest program and the mailbox it was given "
                f"(asirt/kvm/guest.S; rebuild its bytes with "
                f"'python -m asirt.kvm.guest --regenerate' after editing it)")


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, str(number))


# -- opening the device ------------------------------------------------------------------------

class KvmSupport(NamedTuple):
    usable: bool
    reason: str     # why not, naming what to check; or what was found when usable


def _unavailable(path: str, detail: str, fix: str) -> FeatureMissing:
    return FeatureMissing(f"a usable KVM device ({path})", detail, fix)


def _open_device(path: str) -> int:
    """Open the KVM device and check its API version; raise FeatureMissing naming the cause."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise _unavailable(
            path, f"{path} does not exist",
            "either no KVM module is loaded or this machine is a guest without nested "
            "virtualization: check 'ls /dev/kvm' and 'lsmod | grep kvm' (load kvm_intel or "
            "kvm_amd), and on the host 'cat /sys/module/kvm_intel/parameters/nested' (or "
            "kvm_amd) must say Y or 1") from err
    except PermissionError as err:
        raise _unavailable(
            path, f"opening {path} was refused (EACCES)",
            "add this user to the kvm group ('sudo usermod -aG kvm $USER', then log in "
            "again) or run as root") from err
    except OSError as err:
        raise _unavailable(path, f"opening {path} failed: {err.strerror}",
                           f"point at the KVM character device ({DEFAULT_PATH})") from err
    try:
        version = fcntl.ioctl(fd, api.KVM_GET_API_VERSION, 0)
    except OSError as err:
        os.close(fd)
        raise _unavailable(
            path, f"{path} is not a KVM device: KVM_GET_API_VERSION failed with "
            f"{_errno_name(err.errno)}",
            f"point at the KVM character device ({DEFAULT_PATH})") from err
    if version != api.KVM_API_VERSION:
        os.close(fd)
        raise _unavailable(
            path, f"KVM_GET_API_VERSION returned {version}, this runtime speaks "
            f"{api.KVM_API_VERSION} (the stable API since Linux 2.6.22)",
            "use a kernel whose KVM speaks API version 12")
    return fd


def _create_vm(sys_fd: int, path: str) -> int:
    try:
        return fcntl.ioctl(sys_fd, api.KVM_CREATE_VM, 0)
    except OSError as err:
        raise _unavailable(
            path, f"KVM_CREATE_VM failed with {_errno_name(err.errno)} "
            f"({err.strerror})",
            "another hypervisor may hold the virtualization extensions (stop it), or the "
            "kernel refused the VM: see 'dmesg | grep -i kvm'") from err


def probe(path: str = DEFAULT_PATH) -> KvmSupport:
    """Whether a VM can be created through ``path``, and if not, why (never raises)."""
    try:
        fd = _open_device(path)
        try:
            os.close(_create_vm(fd, path))
        finally:
            os.close(fd)
    except FeatureMissing as err:
        return KvmSupport(False, str(err))
    return KvmSupport(True, f"{path}: KVM API {api.KVM_API_VERSION}, KVM_CREATE_VM works")


def _ioctl(fd: int, request: int, arg: object, call: str, fix: str = "") -> int:
    try:
        return fcntl.ioctl(fd, request, arg)  # type: ignore[call-overload]
    except OSError as err:
        raise KvmCallFailed(call, err.errno or 0, fix) from err


def buffer_address(buf: object) -> int:
    """The address of a writable buffer's first byte (an mmap, a memoryview slice of one, a
    bytearray) or of a numpy array's data. The caller keeps the buffer alive and mapped as
    long as a VM maps it: KVM keeps only the address."""
    iface = getattr(buf, "__array_interface__", None)
    if iface is not None:
        if iface.get("strides") is not None:
            raise BadInput("numpy array", "is not C-contiguous", "map a contiguous array")
        return int(iface["data"][0])
    view = memoryview(buf)  # type: ignore[arg-type]
    try:
        if view.readonly or not view.c_contiguous or view.nbytes == 0:
            raise BadInput("buffer", "is read-only, empty or not contiguous",
                           "pass a writable mmap, bytearray or numpy array")
        # from_buffer exports the buffer; dropping it at once lets the owner close it later.
        return ctypes.addressof((ctypes.c_char * view.nbytes).from_buffer(view))
    finally:
        view.release()


# -- the VM -------------------------------------------------------------------------------------

class MemorySlot(NamedTuple):
    slot: int
    gpa: int
    host_addr: int
    size: int
    readonly: bool


class Vm:
    """One VM with ``ram_size`` bytes of RAM at guest-physical 0 (slot 0); a context manager."""

    RAM_SLOT = 0

    def __init__(self, ram_size: int = 0x10000, *, path: str = DEFAULT_PATH) -> None:
        self.path = path
        self._sys_fd = self._vm_fd = -1
        self.ram: mmap.mmap | None = None
        self.slots: dict[int, MemorySlot] = {}
        self._vcpus: list[Vcpu] = []
        try:
            _check_pages("ram_size", ram_size, allow_zero=False)
            self._sys_fd = _open_device(path)
            self._vm_fd = _create_vm(self._sys_fd, path)
            self.vcpu_mmap_size = _ioctl(self._sys_fd, api.KVM_GET_VCPU_MMAP_SIZE, 0,
                                         "KVM_GET_VCPU_MMAP_SIZE")
            self.ram = mmap.mmap(-1, ram_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.map(self.RAM_SLOT, 0, buffer_address(self.ram), ram_size)
        except BaseException:
            self.close()
            raise

    @property
    def ram_size(self) -> int:
        return self.slots[self.RAM_SLOT].size

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on this VM: 0 when absent, else a capability-specific value."""
        return _ioctl(self._vm_fd, api.KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def map(self, slot: int, gpa: int, host_addr: int, size: int, readonly: bool = False) -> None:
        """Map ``size`` bytes at ``host_addr`` (see ``buffer_address``) into the guest at
        ``gpa`` as memory slot ``slot``. ``readonly`` maps it with KVM_MEM_READONLY: guest
        reads see the host's current bytes, guest writes exit as KVM_EXIT_MMIO."""
        if slot in self.slots:
            raise BadInput(f"memory slot {slot}", "is already mapped",
                           f"choose a slot not in {sorted(self.slots)} or unmap it first")
        _check_pages("gpa", gpa, allow_zero=True)
        _check_pages("size", size, allow_zero=False)
        _check_pages("host_addr", host_addr, allow_zero=True,
                     fix="map a page-aligned buffer: an mmap, or a numpy view of one "
                     "(np.frombuffer(mm, np.uint8)), at a page-aligned offset")
        for other in self.slots.values():
            if gpa < other.gpa + other.size and other.gpa < gpa + size:
                raise BadInput(f"guest-physical range [{gpa:#x}, {gpa + size:#x})",
                               f"overlaps slot {other.slot} at [{other.gpa:#x}, "
                               f"{other.gpa + other.size:#x})", "map it elsewhere")
        flags = 0
        if readonly:
            if not self.check_extension(api.KVM_CAP_READONLY_MEM):
                raise FeatureMissing("KVM_CAP_READONLY_MEM", "this KVM cannot map read-only "
                                     "memory", "map the window writable (readonly=False)")
            flags = api.KVM_MEM_READONLY
        region = api.KvmUserspaceMemoryRegion(slot, flags, gpa, size, host_addr)
        _ioctl(self._vm_fd, api.KVM_SET_USER_MEMORY_REGION, bytes(region),
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, {size:#x} bytes)",
               "check the slot against KVM_CAP_NR_MEMSLOTS")
        self.slots[slot] = MemorySlot(slot, gpa, host_addr, size, readonly)

    def unmap(self, slot: int) -> None:
        """Delete a memory slot (KVM_SET_USER_MEMORY_REGION with memory_size 0)."""
        old = self.slots.pop(slot)
        region = api.KvmUserspaceMemoryRegion(slot, 0, old.gpa, 0, old.host_addr)
        _ioctl(self._vm_fd, api.KVM_SET_USER_MEMORY_REGION, bytes(region),
               f"KVM_SET_USER_MEMORY_REGION(delete slot {slot})")

    def _create_vcpu(self, index: int) -> int:
        return _ioctl(self._vm_fd, api.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})",
                      "each vCPU index may be created once per VM")

    def close(self) -> None:
        for vcpu in list(self._vcpus):
            vcpu.close()
        for attr in ("_vm_fd", "_sys_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        self.slots.clear()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_pages(name: str, value: int, allow_zero: bool,
                 fix: str = "KVM maps whole pages (api.rst, KVM_SET_USER_MEMORY_REGION)") -> None:
    if value < 0 or value % PAGE_SIZE or (value == 0 and not allow_zero):
        raise BadInput(f"{name} {value:#x}", f"must be a {'' if allow_zero else 'positive '}"
                       f"multiple of the page size ({PAGE_SIZE:#x})", fix)


# -- the vCPU -----------------------------------------------------------------------------------

class ExitKind(enum.IntEnum):
    """Why run() returned. IO, MMIO and HLT are also the guest mailbox's ``exit_kind`` codes."""

    IO = 0
    MMIO = 1
    HLT = 2
    INTR = 3      # KVM_RUN returned EINTR / KVM_EXIT_INTR: kicked, or immediate_exit


class Exit(NamedTuple):
    kind: ExitKind
    code: int = 0           # what the guest wrote with the exit: IO or MMIO data, little-endian
    port: int = 0           # IO: the port
    direction: int = 0      # IO: api.KVM_EXIT_IO_OUT or api.KVM_EXIT_IO_IN
    size: int = 0           # IO, MMIO: bytes per access
    address: int = 0        # MMIO: the guest-physical address
    is_write: bool = False  # MMIO


_HLT = Exit(ExitKind.HLT)
_INTR = Exit(ExitKind.INTR)
# kvm_run from its start: exit_reason, then kvm_run.io (direction, size, port, count,
# data_offset), read in one call whatever the exit; kvm_run.mmio: phys_addr, data, len, is_write
_HEAD = struct.Struct(f"<{api.RUN_EXIT_REASON}xI{api.RUN_EXIT_UNION - api.RUN_EXIT_REASON - 4}x"
                      "BBHIQ")
_MMIO = struct.Struct("<Q8sIB")
assert _HEAD.size == api.RUN_EXIT_UNION + ctypes.sizeof(api.KvmRunIo)
assert _MMIO.size == api.KvmRunMmio.is_write.offset + 1


def _signal_set(signals: set[int]) -> bytes:
    """The kernel's sigset: bit (signo - 1), KERNEL_SIGSET_BYTES little-endian bytes."""
    bits = sum(1 << (int(s) - 1) for s in signals if 0 < int(s) <= 8 * api.KERNEL_SIGSET_BYTES)
    return bits.to_bytes(api.KERNEL_SIGSET_BYTES, "little")


class Vcpu:
    """vCPU ``index`` of ``vm`` in real mode (CS base 0, RIP ``entry``, RSP ``stack``,
    RFLAGS 0x2); a context manager. ``kick=True`` calls ``enable_kick()``: construct it in the
    thread that will call ``run()``. An index can be created once per VM: KVM destroys vCPUs
    only with the VM, so after ``close()`` KVM_CREATE_VCPU of the same index fails (EEXIST)."""

    def __init__(self, vm: Vm, entry: int, *, stack: int = 0, index: int = 0,
                 kick: bool = False) -> None:
        self.vm, self.index = vm, index
        self._fd_cell = [-1]     # run() reads the fd from here; close() sets it to -1
        self._run: mmap.mmap | None = None
        self._kick_thread: int | None = None
        self._kick_target = (0, 0)
        self._saved_mask: set[int] = set()
        try:
            self._fd_cell[0] = vm._create_vcpu(index)
            self._run = mmap.mmap(self._fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            vm._vcpus.append(self)
            self.run = self._runner()
            self.reset(entry, stack)
            if kick:
                self.enable_kick()
        except BaseException:
            self.close()
            raise

    @property
    def _fd(self) -> int:
        return self._fd_cell[0]

    # -- registers --
    def get_regs(self) -> api.KvmRegs:
        regs = api.KvmRegs()
        _ioctl(self._fd, api.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: api.KvmRegs) -> None:
        _ioctl(self._fd, api.KVM_SET_REGS, bytes(regs), "KVM_SET_REGS")

    def get_sregs(self) -> api.KvmSregs:
        sregs = api.KvmSregs()
        _ioctl(self._fd, api.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def reset(self, entry: int, stack: int = 0) -> None:
        """Real mode at ``entry``: every segment base and selector 0 (the reset state has CS
        base 0xffff0000, selector 0xf000; limits stay 0xffff), general registers 0."""
        sregs = self.get_sregs()
        for name in api.SEGMENTS:
            seg = getattr(sregs, name)
            seg.base, seg.selector = 0, 0
        _ioctl(self._fd, api.KVM_SET_SREGS, bytes(sregs), "KVM_SET_SREGS")
        self.set_regs(api.KvmRegs(rip=entry, rsp=stack, rflags=RFLAGS_RESET))

    # -- running --
    #: Enter the guest until its next exit and decode it (see ``_runner``).
    run: Callable[[], Exit]

    def _runner(self) -> Callable[[], Exit]:
        """Build ``run()``, a closure whose every name is a local or a cell: after a VM exit
        the interpreter runs cache-cold, so each module or attribute lookup it avoids is
        worth ~0.1 us here (a method with global lookups measured ~1 us slower per exit).

        KVM_RUN's argument must be 0 (virt/kvm/kvm_main.c: ``if (arg) goto out;`` ->
        EINVAL), and it is *omitted* rather than passed: CPython 3.11's ``fcntl.ioctl``
        parses a given ``arg`` as a writable buffer, then a read-only buffer, then an int,
        raising and clearing a TypeError for each miss; with no ``arg`` it calls
        ``ioctl(fd, request, 0)`` directly. Measured here: 2 us less per exit (15.0 vs
        17.0 us p50 with a 13.9 us C floor)."""
        fd_cell, mapping, interrupted, failure = self._fd_cell, self._mapping(), \
            self._interrupted, self._failure
        ioctl, kvm_run, head, mmio = fcntl.ioctl, api.KVM_RUN, _HEAD.unpack_from, \
            _MMIO.unpack_from
        union, make = api.RUN_EXIT_UNION, tuple.__new__     # Exit without its Python __new__
        exit_io, exit_mmio, exit_hlt = api.KVM_EXIT_IO, api.KVM_EXIT_MMIO, api.KVM_EXIT_HLT
        exit_intr, kind_io, kind_mmio, hlt = api.KVM_EXIT_INTR, ExitKind.IO, ExitKind.MMIO, _HLT

        def run() -> Exit:
            """Enter the guest until its next exit; decode it. ``Exit(INTR)`` when kicked or
            for immediate_exit; raises GuestFailed on SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR
            and any other exit the guest program never makes."""
            try:
                ioctl(fd_cell[0], kvm_run)   # no arg: see _runner
            except InterruptedError:
                return interrupted()
            except ValueError:      # fcntl refuses the fd -1 that close() leaves
                raise ValueError("run() on a closed Vcpu") from None
            except OSError as err:
                raise KvmCallFailed("KVM_RUN", err.errno or 0, "a memory slot's host mapping "
                                    "may have gone away (EFAULT), or the vCPU state is "
                                    "invalid") from err
            reason, direction, size, port, _count, offset = head(mapping)
            if reason == exit_io:
                code = mapping[offset] if size == 1 else int.from_bytes(
                    mapping[offset:offset + size], "little")
                return make(Exit, (kind_io, code, port, direction, size, 0, False))
            if reason == exit_mmio:
                address, data, size, is_write = mmio(mapping, union)
                return make(Exit, (kind_mmio, int.from_bytes(data[:size], "little"), 0, 0,
                                   size, address, is_write != 0))
            if reason == exit_hlt:
                return hlt
            if reason == exit_intr:   # x86 pairs it with -EINTR; kept for other paths
                return interrupted()
            raise failure(reason)
        return run

    def _interrupted(self) -> Exit:
        run = self._run
        assert run is not None
        run[api.RUN_IMMEDIATE_EXIT] = 0
        if self._kick_thread is not None:
            _drain_kicks()
        return _INTR

    def _failure(self, reason: int) -> GuestFailed:
        view = api.KvmRun.from_buffer_copy(self._run[:ctypes.sizeof(api.KvmRun)])  # type: ignore[index]
        name = api.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        if reason == api.KVM_EXIT_FAIL_ENTRY:
            detail = (f"hardware_entry_failure_reason "
                      f"{view.fail_entry.hardware_entry_failure_reason:#x} on CPU "
                      f"{view.fail_entry.cpu}")
        elif reason == api.KVM_EXIT_INTERNAL_ERROR:
            sub = view.internal.suberror
            data = [hex(view.internal.data[i]) for i in range(min(view.internal.ndata, 16))]
            detail = f"{api.INTERNAL_ERROR_NAMES.get(sub, f'suberror {sub}')}, data {data}"
        elif reason == api.KVM_EXIT_SHUTDOWN:
            detail = "a triple fault: real mode has no handler for the exception the guest took"
        elif reason == api.KVM_EXIT_UNKNOWN:
            detail = f"hardware exit reason {view.hw.hardware_exit_reason:#x}"
        else:
            detail = "an exit this runtime's guest never makes"
        return GuestFailed(name, detail, self.describe_registers())

    def describe_registers(self) -> str:
        """The general registers as ``rax=0x0 ... rflags=0x2``, for error messages."""
        try:
            regs = self.get_regs()
        except KvmCallFailed as err:
            return f"unavailable ({err})"
        return " ".join(f"{n}={getattr(regs, n):#x}" for n, *_ in api.KvmRegs._fields_)

    def complete_io(self) -> None:
        """Finish the last IO or MMIO exit without running the guest (KVM_RUN with
        immediate_exit set): afterwards the registers are consistent (see the module
        docstring). A pending kick is consumed too."""
        self.immediate_exit = True
        exit_ = self.run()
        if exit_.kind is not ExitKind.INTR:     # the kernel entered the guest after all
            raise GuestFailed(f"a {exit_.kind.name} exit", "KVM_RUN with immediate_exit set "
                              "entered the guest", self.describe_registers())

    @property
    def immediate_exit(self) -> bool:
        return bool(self._mapping()[api.RUN_IMMEDIATE_EXIT])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """Set: the next KVM_RUN returns at once (Exit INTR) without entering the guest;
        run() clears it when that happens. Safe to set from another thread."""
        self._mapping()[api.RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def _mapping(self) -> mmap.mmap:
        if self._run is None:
            raise ValueError("the Vcpu is closed")
        return self._run

    # -- the kick --
    def enable_kick(self) -> None:
        """Make SIGUSR1 kick this vCPU out of KVM_RUN, race-free (see the module docstring).
        Call it from the thread that calls run(); it blocks SIGUSR1 in that thread until
        close()."""
        me = threading.get_ident()
        if self._kick_thread is not None:
            if self._kick_thread != me:
                raise ValueError("enable_kick() was called from another thread already")
            return
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        try:
            during_run = {int(s) for s in saved} - {int(KICK_SIGNAL)}
            arg = bytes(api.KvmSignalMask(api.KERNEL_SIGSET_BYTES)) + _signal_set(during_run)
            _ioctl(self._fd, api.KVM_SET_SIGNAL_MASK, arg, "KVM_SET_SIGNAL_MASK")
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
            raise
        self._saved_mask = {int(s) for s in saved}
        self._kick_thread = me
        self._kick_target = (os.getpid(), threading.get_native_id())

    @property
    def kick_target(self) -> tuple[int, int]:
        """``(pid, tid)`` of the vCPU thread, for ``kick(pid, tid)`` from another process."""
        if self._kick_thread is None:
            raise ValueError("enable_kick() first: without it SIGUSR1 does not kick this vCPU")
        return self._kick_target

    @property
    def kick_enabled(self) -> bool:
        return self._kick_thread is not None

    def close(self) -> None:
        """Idempotent. From the thread that enabled kicks it also consumes a pending kick and
        restores that thread's signal mask (a SIGUSR1 sent after that is delivered normally)."""
        if self._kick_thread is not None and self._kick_thread == threading.get_ident():
            _drain_kicks()
            signal.pthread_sigmask(signal.SIG_SETMASK, self._saved_mask)
        self._kick_thread = None
        if self._run is not None:
            self._run.close()
            self._run = None
        if self._fd >= 0:
            fd, self._fd_cell[0] = self._fd, -1
            os.close(fd)
        if self in self.vm._vcpus:
            self.vm._vcpus.remove(self)

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain_kicks() -> None:
    """Consume every pending kick (one process-directed and one thread-directed may both be
    pending: standard signals do not queue) so none is delivered later."""
    while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
        pass


def kick(pid: int, tid: int | None = None) -> None:
    """Kick the vCPU thread ``tid`` of process ``pid`` out of KVM_RUN: a thread-directed
    SIGUSR1 (tgkill(2)); ``Vcpu.kick_target`` is the pair to pass. Without ``tid`` the signal
    is process-directed (see the module docstring for when that is safe)."""
    if tid is None:
        os.kill(pid, KICK_SIGNAL)
    else:
        tgkill(pid, tid, int(KICK_SIGNAL))


def kick_thread(thread_id: int) -> None:
    """Kick the vCPU run by thread ``thread_id`` of this process (``threading.get_ident()``)."""
    signal.pthread_kill(thread_id, KICK_SIGNAL)
