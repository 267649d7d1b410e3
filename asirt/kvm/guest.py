"""asirt's guest program: its bytes, its guest-physical layout, and the host's side of it.

The source is ``guest.S`` beside this file (16-bit real mode, GNU as syntax, commented);
``CODE`` below is its assembled ``.text``. Rebuild the literal after editing the source with::

    python -m asirt.kvm.guest --regenerate     # needs binutils: as, objcopy, objdump

(tests/test_kvm_device.py assembles guest.S again and checks the bytes equal ``CODE``.)

Guest-physical layout (all below 1 MiB, every segment base 0 except where noted)::

    0x00000-0x0ffff  RAM (slot 0, the Vm's anonymous mapping)
      0x1000  CODE_GPA     the program; the vCPU starts here
      0x2000  MAILBOX_GPA  the host's request, written before each KVM_RUN (Request)
      0x3000  OUTPUT_GPA   the guest's answer: a 16-byte header (seq, copies finished, 8
                           bytes reserved), then the copy before the work (OUT_BEFORE) and
                           the copy after it (OUT_AFTER), SAMPLE_MAX bytes each
      0x4000  STACK_GPA    one page of stack, SP starts at STACK_TOP = 0x5000
    0x10000-0x13fff  WINDOW_GPA, at most WINDOW_MAX bytes, read-only (slot 1): a window of a
                     host buffer (e.g. the core buffer of a shared region); the guest reads it
                     through DS = WINDOW_GPA >> 4
    0x20000          MMIO_GPA: nothing is mapped; the guest's MMIO exit writes exit_code here

Mailbox (little-endian u32 words at MAILBOX_GPA, in ``Request`` field order): seq,
exit_kind (ExitKind: 0 IO, 1 MMIO, 2 HLT), exit_code, sample_len, sample_off, sample_when
(SAMPLE_BEFORE: copy before the work, SAMPLE_AFTER: after it, both: two copies; sample_len
is whole dwords, copied four bytes at a time), work_iters (WORK_FOREVER = 0xffffffff: spin until
the host changes it). The guest echoes seq into the output header on every pass (a pass that
spun echoes the seq that started it).

Exits: IO = ``out %al, %dx`` to port IO_PORT_BASE + exit_code with data byte exit_code (so
IO codes are 0..255); MMIO = a 4-byte write of exit_code to MMIO_GPA; HLT = ``hlt``. Each
decodes through ``Vcpu.run()`` with ``Exit.code == exit_code`` for IO and MMIO.

Where KVM runs real mode by emulating it, guest instructions are slow. The development
machine's KVM is kvm_pvm (no VMX in the CPU flags; timings say real mode goes through the
instruction emulator): a `nop` costs ~0.27 us there, a `mov` from memory ~0.55 us, a 4-word
`rep movsl` ~3 us, one work iteration (`dec; jnz`) ~0.45 us. So the loop's hot path (no work,
no sample, IO exit) is kept to 11 instructions: the whole IO exit round trip measured 13.6 us
from C against 9.5 us for a bare `out; jmp` guest.

Imports only the standard library and asirt (errors, kvm.vm).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from asirt.errors import BadInput, FeatureMissing
from asirt.kvm.vm import ExitKind, GuestFailed, Vcpu, Vm, buffer_address

__all__ = ["CODE", "CODE_GPA", "MAILBOX_GPA", "OUTPUT_GPA", "STACK_GPA", "STACK_TOP",
           "RAM_SIZE", "WINDOW_GPA", "WINDOW_MAX", "WINDOW_SLOT", "MMIO_GPA", "IO_PORT_BASE",
           "IO_CODES", "SAMPLE_MAX", "SAMPLE_BEFORE", "SAMPLE_AFTER", "WORK_FOREVER", "Request",
           "Output", "Mailbox",
           "read_output", "GuestProgram", "measure_exit_roundtrip", "assemble", "SOURCE"]

PAGE = 0x1000
CODE_GPA = 0x1000
MAILBOX_GPA = 0x2000
OUTPUT_GPA = 0x3000
STACK_GPA = 0x4000
STACK_TOP = STACK_GPA + PAGE
RAM_SIZE = 0x10000            # slot 0: everything above, up to the window
WINDOW_GPA = 0x10000
WINDOW_MAX = 4 * PAGE
WINDOW_SLOT = 1
MMIO_GPA = 0x20000
IO_PORT_BASE = 0x1000
IO_CODES = 256                # IO exit codes 0..255 (the data byte)
WORK_FOREVER = 0xFFFFFFFF


#: Request.sample_when: copy the window before the work, after it, or both
SAMPLE_BEFORE, SAMPLE_AFTER = 1, 2


class Request(NamedTuple):
    """The mailbox, one little-endian u32 per field in this order."""

    seq: int
    exit_kind: ExitKind = ExitKind.IO
    exit_code: int = 0
    sample_len: int = 0
    sample_off: int = 0
    sample_when: int = SAMPLE_BEFORE
    work_iters: int = 0


class Output(NamedTuple):
    """The output page: the echoed ``seq``, how many copies of the window this pass finished
    (a pass a kick interrupted may have finished none or one), and the copies made before and
    after the work (as many bytes as the mailbox's sample_len asked for)."""

    seq: int
    copies: int
    before: bytes
    after: bytes

    @property
    def data(self) -> bytes:
        """The copy the request asked for (the one after the work when it asked for both)."""
        return self.after if self.after else self.before


_MAILBOX = struct.Struct("<" + "I" * len(Request._fields))
_HEADER = struct.Struct("<II8x")     # seq, copies, then reserved up to the 16-byte aligned data
OUT_SEQ = 0
OUT_COPIES = 4
OUT_BEFORE = _HEADER.size
SAMPLE_MAX = (PAGE - OUT_BEFORE) // 2 // 4 * 4     # two copies fit, in whole dwords
OUT_AFTER = OUT_BEFORE + SAMPLE_MAX
assert RAM_SIZE <= WINDOW_GPA and WINDOW_GPA + WINDOW_MAX <= MMIO_GPA < 1 << 20
assert WINDOW_GPA % 16 == 0 and WINDOW_MAX <= 0x10000     # one real-mode segment
assert IO_PORT_BASE + IO_CODES <= 0x10000


def _symbols() -> dict[str, int]:
    """The constants guest.S is assembled with (``--defsym``)."""
    syms = {"MAILBOX": MAILBOX_GPA, "OUTPUT": OUTPUT_GPA, "STACK_TOP": STACK_TOP,
            "WINDOW_SEG": WINDOW_GPA >> 4, "MMIO_SEG": MMIO_GPA >> 4, "MMIO_OFF": MMIO_GPA & 0xF,
            "IO_PORT_BASE": IO_PORT_BASE, "SAMPLE_MAX": SAMPLE_MAX, "OUT_SEQ": OUT_SEQ,
            "OUT_COPIES": OUT_COPIES, "OUT_BEFORE": OUT_BEFORE, "OUT_AFTER": OUT_AFTER,
            "SAMPLE_BEFORE": SAMPLE_BEFORE, "SAMPLE_AFTER": SAMPLE_AFTER,
            "WORK_FOREVER": WORK_FOREVER}
    syms.update((f"MB_{name.upper()}", 4 * i) for i, name in enumerate(Request._fields))
    syms.update((f"EXIT_{kind.name}", kind.value) for kind in (ExitKind.IO, ExitKind.MMIO,
                                                                ExitKind.HLT))
    return syms


# BEGIN CODE: generated by `python -m asirt.kvm.guest --regenerate` from guest.S
CODE = (
    b"\xfa\x31\xc0\x8e\xd8\x8e\xc0\x8e\xd0\xbc\x00\x50\xfc\xeb\x0b\x8b"
    b"\x16\x08\x20\x88\xd0\x81\xc2\x00\x10\xee\x66\xa1\x00\x20\x66\xa3"
    b"\x00\x30\x66\x8b\x0e\x18\x20\x66\x0b\x0e\x0c\x20\x75\x27\x66\x83"
    b"\x3e\x04\x20\x00\x74\xd9\x66\x83\x3e\x04\x20\x01\x75\x14\x66\xa1"
    b"\x08\x20\xbb\x00\x20\x8e\xc3\x26\x66\xa3\x00\x00\x31\xdb\x8e\xc3"
    b"\xeb\xc8\xf4\xeb\xc5\x66\xc7\x06\x04\x30\x00\x00\x00\x00\x66\x8b"
    b"\x0e\x0c\x20\x67\xe3\x14\x66\xf7\x06\x14\x20\x01\x00\x00\x00\x74"
    b"\x09\x66\xbf\x10\x30\x00\x00\xe8\x3a\x00\x66\x8b\x0e\x18\x20\x67"
    b"\xe3\x0a\x66\x83\xf9\xff\x74\x22\x66\x49\x75\xfc\x66\x8b\x0e\x0c"
    b"\x20\x67\xe3\x9a\x66\xf7\x06\x14\x20\x02\x00\x00\x00\x74\x8f\x66"
    b"\xbf\x08\x38\x00\x00\xe8\x0c\x00\xeb\x84\x66\x83\x3e\x18\x20\xff"
    b"\x74\xf8\xeb\xd8\x66\x81\xf9\xf8\x07\x00\x00\x76\x06\x66\xb9\xf8"
    b"\x07\x00\x00\x66\xc1\xe9\x02\x66\x8b\x36\x10\x20\x67\x66\x8d\x74"
    b"\x8e\xfc\x67\x66\x8d\x7c\x8f\xfc\x1e\xb8\x00\x10\x8e\xd8\xfd\x67"
    b"\x66\xf3\xa5\xfc\x1f\x66\xff\x06\x04\x30\xc3"
)
# END CODE


class Mailbox:
    """The host's writer of the mailbox in guest RAM. ``window_size`` bounds the samples a
    request may ask for (0: no window mapped, no sampling)."""

    def __init__(self, ram: memoryview | bytearray | object, window_size: int = 0) -> None:
        self.ram = ram
        self.window_size = window_size

    def post(self, request: Request) -> None:
        """Write ``request`` for the guest's next pass; checked first (BadInput)."""
        kind = ExitKind(request.exit_kind)
        if kind not in (ExitKind.IO, ExitKind.MMIO, ExitKind.HLT):
            raise BadInput(f"exit_kind {kind.name}", "is not an exit the guest can make",
                           "choose IO, MMIO or HLT")
        if kind is ExitKind.IO and not 0 <= request.exit_code < IO_CODES:
            raise BadInput(f"IO exit_code {request.exit_code}", "is the data byte of the "
                           "`out`", f"choose 0..{IO_CODES - 1}")
        if request.sample_len:
            end = request.sample_off + request.sample_len
            if (request.sample_len > SAMPLE_MAX or end > self.window_size
                    or request.sample_len % 4):
                raise BadInput(f"sample [{request.sample_off}, {end})",
                               f"must lie in the mapped window ({self.window_size} bytes), be "
                               f"whole dwords and at most {SAMPLE_MAX} bytes",
                               "map a window or sample less")
        try:
            _MAILBOX.pack_into(self.ram, MAILBOX_GPA, *request)  # type: ignore[arg-type]
        except struct.error as err:
            raise BadInput(f"mailbox request {request}", str(err),
                           "every field is an unsigned 32-bit word") from err


def read_output(ram: object) -> Output:
    """The guest's answer to the request in the mailbox: the echoed seq and the sample."""
    seq, copies = _HEADER.unpack_from(ram, OUTPUT_GPA)  # type: ignore[arg-type]
    request = Request(*_MAILBOX.unpack_from(ram, MAILBOX_GPA))  # type: ignore[arg-type]
    n = min(request.sample_len, SAMPLE_MAX) // 4 * 4

    def area(flag: int, at: int) -> bytes:
        start = OUTPUT_GPA + at
        return bytes(ram[start:start + n]) if request.sample_when & flag else b""  # type: ignore[index]
    return Output(seq, copies, area(SAMPLE_BEFORE, OUT_BEFORE), area(SAMPLE_AFTER, OUT_AFTER))


class GuestProgram:
    """The program loaded into ``vm`` (whose RAM must cover RAM_SIZE), with its mailbox."""

    def __init__(self, vm: Vm) -> None:
        if vm.ram is None or vm.ram_size < RAM_SIZE:
            raise BadInput("Vm", f"has {vm.ram_size if vm.ram else 0:#x} bytes of RAM",
                           f"create it with Vm(ram_size={RAM_SIZE:#x}) or more")
        self.vm = vm
        vm.ram[CODE_GPA:CODE_GPA + len(CODE)] = CODE
        self.mailbox = Mailbox(vm.ram)

    def map_window(self, buffer: object, offset: int = 0, size: int = PAGE) -> None:
        """Map ``size`` bytes of ``buffer`` from ``offset`` (page-aligned) read-only at
        WINDOW_GPA. The buffer must stay mapped while the VM lives (KVM keeps its address)."""
        if not 0 < size <= WINDOW_MAX:
            raise BadInput(f"window size {size:#x}", f"must be in (0, {WINDOW_MAX:#x}]",
                           "map fewer pages")
        if offset + size > memoryview(buffer).nbytes:  # type: ignore[arg-type]
            raise BadInput(f"window [{offset:#x}, {offset + size:#x})", "runs past the buffer",
                           "map a window inside it")
        self.vm.map(WINDOW_SLOT, WINDOW_GPA, buffer_address(buffer) + offset, size,
                    readonly=True)
        self.mailbox.window_size = size

    def vcpu(self, *, kick: bool = False) -> Vcpu:
        """A vCPU at the program's entry with its stack; ``kick`` as for Vcpu."""
        return Vcpu(self.vm, CODE_GPA, stack=STACK_TOP, kick=kick)

    def post(self, request: Request) -> None:
        self.mailbox.post(request)

    def clear_answer(self) -> None:
        """Zero the answer header (seq, copies). Only between passes, when the guest starts
        its next one from the top: it echoes the seq there before it clears the copy count."""
        _HEADER.pack_into(self.vm.ram, OUTPUT_GPA, 0, 0)  # type: ignore[arg-type]

    def output(self) -> Output:
        return read_output(self.vm.ram)


def measure_exit_roundtrip(vcpu: Vcpu, n: int, kind: ExitKind = ExitKind.IO) -> list[int]:
    """``n`` exit round trips of ``kind`` in ns: CLOCK_MONOTONIC around each ``vcpu.run()``,
    so a sample is the guest's exit, the kernel's and this process's handling of it, the
    decoding, and the entry back into the guest's loop (work_iters 0, nothing sampled).
    A kick (Exit INTR) is not a sample; any other exit raises GuestFailed."""
    if vcpu.vm.ram is None:
        raise ValueError("the vCPU's Vm is closed")
    Mailbox(vcpu.vm.ram).post(Request(seq=0, exit_kind=kind, exit_code=kind.value))
    run, clock = vcpu.run, time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    while len(samples) < n:
        t0 = clock()
        e = run()
        t1 = clock()
        if e.kind == kind:
            append(t1 - t0)
        elif e.kind != ExitKind.INTR:
            raise GuestFailed(f"a {e.kind.name} exit", f"{e} while measuring {kind.name} exits",
                              vcpu.describe_registers())
    return samples


# -- building the bytes ---------------------------------------------------------------------------

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest.S")
_TOOLS = ("as", "objcopy", "objdump")


def assemble(source: str = SOURCE) -> bytes:
    """Assemble ``source`` with the system's binutils into the flat bytes of its .text."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise FeatureMissing("binutils", f"no {', '.join(missing)} on PATH",
                             "install binutils (apt-get install binutils)")
    with tempfile.TemporaryDirectory(prefix="asirt-guest-") as tmp:
        obj, flat = os.path.join(tmp, "guest.o"), os.path.join(tmp, "guest.bin")
        defsyms = [arg for name, value in _symbols().items()
                   for arg in ("--defsym", f"{name}={value:#x}")]
        _tool(["as", "--32", *defsyms, "-o", obj, source])
        relocs = _tool(["objdump", "-r", obj])
        if re.search(r"^RELOCATION RECORDS", relocs, re.M):
            raise BadInput(source, f"needs relocations:\n{relocs.strip()}",
                           "use only relative jumps and absolute constants (the bytes are "
                           "loaded without a linker)")
        _tool(["objcopy", "-O", "binary", "-j", ".text", obj, flat])
        with open(flat, "rb") as f:
            return f.read()


def _tool(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise BadInput(" ".join(cmd[:1] + cmd[-1:]), res.stderr.strip()[:2000],
                       "fix the assembly source")
    return res.stdout


def code_literal(code: bytes) -> str:
    """``CODE = (...)`` as it stands between the markers in this file."""
    lines = ['    b"' + "".join(f"\\x{b:02x}" for b in code[i:i + 16]) + '"'
             for i in range(0, len(code), 16)]
    return "CODE = (\n" + "\n".join(lines) + "\n)\n"


_MARKED = re.compile(r"(# BEGIN CODE[^\n]*\n).*?(# END CODE\n)", re.S)


def regenerate(module_path: str = __file__, source: str = SOURCE) -> bool:
    """Rewrite the CODE literal in ``module_path`` from ``source``; True when it changed."""
    with open(module_path) as f:
        text = f.read()
    new = _MARKED.sub(lambda m: m.group(1) + code_literal(assemble(source)) + m.group(2), text,
                      count=1)
    if new != text:
        with open(module_path, "w") as f:
            f.write(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asirt.kvm.guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--regenerate", action="store_true",
                       help="assemble guest.S and rewrite the CODE literal in guest.py")
    group.add_argument("--check", action="store_true",
                       help="exit 1 if CODE differs from a fresh assembly of guest.S")
    group.add_argument("--symbols", action="store_true",
                       help="print the layout constants guest.S is assembled with")
    args = parser.parse_args(argv)
    if args.symbols:
        for name, value in _symbols().items():
            print(f"{name} = {value:#x}")
        return 0
    if args.check:
        same = assemble() == CODE
        print("CODE matches guest.S" if same else "CODE is stale: run with --regenerate")
        return 0 if same else 1
    print("rewrote CODE" if regenerate() else "CODE was up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
