"""The /dev/kvm ABI this runtime uses: ioctl numbers, exit reasons, and struct layouts.

Everything here is transcribed from the kernel's UAPI headers and asserted where it can be:

- ioctl numbers are *computed* with the encoding of include/uapi/asm-generic/ioctl.h
  (``_IO``/``_IOR``/``_IOW``/``_IOWR``) from the ``KVMIO`` type and the struct sizes below,
  exactly as include/uapi/linux/kvm.h writes them, never copied as magic numbers;
- every struct is one ``ctypes.Structure`` whose ``sizeof`` is asserted at import against the
  size the x86-64 kernel headers give it (tests/test_kvm_device.py also compiles a C program
  against the installed <linux/kvm.h> and compares sizes and offsets, where a compiler is found).

Only x86-64 is described: ``kvm_regs``/``kvm_sregs`` come from arch/x86/include/uapi/asm/kvm.h
and ``kvm_run``'s union has the x86 size. The meaning of fields is documented in
Documentation/virt/kvm/api.rst ("The kvm_run structure", "KVM_RUN", "KVM_SET_SIGNAL_MASK").

Imports only the standard library.
"""
from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

# -- ioctl encoding: include/uapi/asm-generic/ioctl.h (x86 uses the generic one) --------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    assert 0 <= size < (1 << _IOC_SIZEBITS), size
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
            | (size << _IOC_SIZESHIFT))


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _check_size(struct: type, expected: int, source: str) -> None:
    size = ctypes.sizeof(struct)
    assert size == expected, f"{struct.__name__}: {size} bytes here, {expected} in {source}"


# -- structs ------------------------------------------------------------------------------------

class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (include/uapi/linux/kvm.h): KVM_SET_USER_MEMORY_REGION."""

    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


_check_size(KvmUserspaceMemoryRegion, 32, "struct kvm_userspace_memory_region")


class KvmSignalMask(ctypes.Structure):
    """struct kvm_signal_mask (include/uapi/linux/kvm.h): ``__u32 len`` then a flexible
    ``sigset[]`` of ``len`` bytes. Its sizeof (4) is what the ioctl number encodes; the
    argument actually passed is this header followed by the kernel's sigset (see
    ``KERNEL_SIGSET_BYTES``)."""

    _fields_ = [("len", c_uint32)]


_check_size(KvmSignalMask, 4, "struct kvm_signal_mask")

#: sizeof(sigset_t) *in the kernel* on x86-64 (_NSIG = 64 signals, one bit each): the only
#: ``len`` KVM_SET_SIGNAL_MASK accepts (virt/kvm/kvm_main.c: ``if (kvm_sigmask.len !=
#: sizeof(sigset)) goto out;`` -> EINVAL). Not glibc's 128-byte sigset_t.
KERNEL_SIGSET_BYTES = 8


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (arch/x86/include/uapi/asm/kvm.h): KVM_GET_REGS / KVM_SET_REGS."""

    _fields_ = [(name, c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


_check_size(KvmRegs, 144, "struct kvm_regs")


class KvmSegment(ctypes.Structure):
    """struct kvm_segment (arch/x86/include/uapi/asm/kvm.h)."""

    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
                ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
                ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
                ("unusable", c_uint8), ("padding", c_uint8)]


_check_size(KvmSegment, 24, "struct kvm_segment")


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable (arch/x86/include/uapi/asm/kvm.h): GDT/IDT base and limit."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


_check_size(KvmDtable, 16, "struct kvm_dtable")

KVM_NR_INTERRUPTS = 256   # arch/x86/include/uapi/asm/kvm.h


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (arch/x86/include/uapi/asm/kvm.h): KVM_GET_SREGS / KVM_SET_SREGS."""

    _fields_ = ([(name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                                  "apic_base")]
                + [("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


_check_size(KvmSregs, 312, "struct kvm_sregs")

#: the data segments a real-mode setup resets beside CS
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")


# struct kvm_run's exit union members (include/uapi/linux/kvm.h). Only the ones this runtime
# decodes are spelled out; ``padding`` fixes the union's size as the header does.
class KvmRunIo(ctypes.Structure):
    """kvm_run.io (KVM_EXIT_IO): the data is at ``data_offset`` bytes from the start of
    kvm_run (inside the vCPU mapping), ``count`` items of ``size`` bytes."""

    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16),
                ("count", c_uint32), ("data_offset", c_uint64)]


class KvmRunMmio(ctypes.Structure):
    """kvm_run.mmio (KVM_EXIT_MMIO): ``len`` bytes of ``data`` at ``phys_addr``."""

    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class KvmRunFailEntry(ctypes.Structure):
    """kvm_run.fail_entry (KVM_EXIT_FAIL_ENTRY): the hardware's VM-entry failure reason."""

    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class KvmRunInternal(ctypes.Structure):
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR): ``suberror`` (KVM_INTERNAL_ERROR_*) and
    ``ndata`` words of debug data."""

    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunHw(ctypes.Structure):
    """kvm_run.hw (KVM_EXIT_UNKNOWN): the hardware exit reason KVM could not handle."""

    _fields_ = [("hardware_exit_reason", c_uint64)]


class KvmRunExit(ctypes.Union):
    _fields_ = [("hw", KvmRunHw), ("fail_entry", KvmRunFailEntry), ("io", KvmRunIo),
                ("mmio", KvmRunMmio), ("internal", KvmRunInternal), ("padding", c_char * 256)]


_check_size(KvmRunExit, 256, "struct kvm_run's exit union (char padding[256])")

SYNC_REGS_SIZE_BYTES = 2048   # include/uapi/linux/kvm.h


class KvmRun(ctypes.Structure):
    """struct kvm_run (include/uapi/linux/kvm.h), the start of the vCPU fd's mmap (whose full
    length is KVM_GET_VCPU_MMAP_SIZE: the PIO data page and more follow it)."""

    _anonymous_ = ("exit",)
    _fields_ = [
        # in
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        # out
        ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8), ("flags", c_uint16),
        # in (pre_kvm_run), out (post_kvm_run)
        ("cr8", c_uint64), ("apic_base", c_uint64),
        ("exit", KvmRunExit),
        ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64),
        ("s", c_char * SYNC_REGS_SIZE_BYTES),
    ]


_check_size(KvmRun, 2352, "struct kvm_run (x86-64)")

#: offsets into the vCPU mapping that the hot path reads with struct.unpack_from
RUN_IMMEDIATE_EXIT = KvmRun.immediate_exit.offset
RUN_EXIT_REASON = KvmRun.exit_reason.offset
RUN_EXIT_UNION = KvmRun.exit.offset
assert (RUN_IMMEDIATE_EXIT, RUN_EXIT_REASON, RUN_EXIT_UNION) == (1, 8, 32)

# -- constants of include/uapi/linux/kvm.h ----------------------------------------------------
KVM_API_VERSION = 12
KVMIO = 0xAE

KVM_MEM_READONLY = 1 << 1                     # kvm_userspace_memory_region.flags

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136

# system ioctls (on the /dev/kvm fd)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)              # returns a VM fd
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)        # also a VM ioctl
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)     # in bytes
# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)            # returns a vCPU fd
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KvmUserspaceMemoryRegion)
# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, KvmRegs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, KvmRegs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, KvmSregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, KvmSregs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, KvmSignalMask)

# Spot checks of the encoding against the values the kernel headers produce (printed by
# `printf("%#lx", KVM_...)` against <linux/kvm.h>); the rest follow from the same code.
assert KVM_RUN == 0xAE80 and KVM_CREATE_VM == 0xAE01
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46 and KVM_GET_REGS == 0x8090AE81
assert KVM_SET_SREGS == 0x4138AE84 and KVM_SET_SIGNAL_MASK == 0x4004AE8B

# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

#: exit_reason -> its name, for messages
EXIT_REASON_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")}

# kvm_run.internal.suberror (KVM_EXIT_INTERNAL_ERROR)
INTERNAL_ERROR_NAMES: dict[int, str] = {
    1: "KVM_INTERNAL_ERROR_EMULATION", 2: "KVM_INTERNAL_ERROR_SIMUL_EX",
    3: "KVM_INTERNAL_ERROR_DELIVERY_EV", 4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"}
