"""What each VM-exit reason's handler touches: the stated default footprints.

A ``perf kvm stat`` table says how often each exit happens and how long its handler runs;
it says nothing about the memory the handler touches, whether it goes out to the user-space
VMM, or how a real guest would produce it. This module holds those answers as data, one
entry per exit reason with a one-line rationale, so that every profile built from a table
can say which numbers are measured (shares, handler times) and which are these defaults.

Memory classes are the ASI ones (see DESIGN.md): ``global`` is globally non-sensitive kernel
memory (KVM's code and data, per-CPU state), ``local`` the VM's own memory (its vCPU state,
VMCS/VMCB, its MMU pages), ``sensitive`` anything else of the host (the scheduler's run
queues, other tasks, the page allocator); under ASI a touch of ``sensitive`` leaves the
restricted address space. ``p_to_user`` is the chance the exit is forwarded to the VMM in
user space. ``kind`` is how a real guest produces a comparable exit for the /dev/kvm backend:
``io`` (an OUT to a port: the generic short synchronous exit), ``mmio`` (a write to an
unmapped guest-physical page), ``hlt`` (HLT).

Reason names are normalised (``normalise``): upper case, ``-`` as ``_``, and the spellings
that name the same exit mapped to one key (SVM's ``intr``/``interrupt`` and arm64's ``IRQ``
are EXTERNAL_INTERRUPT, SVM's ``io`` is IO_INSTRUCTION, older perf's PENDING_INTERRUPT is
today's INTERRUPT_WINDOW, ...). Imports only the standard library.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Footprint", "FOOTPRINTS", "ALIASES", "FALLBACK", "KINDS", "normalise", "lookup"]

KINDS = ("io", "mmio", "hlt")


@dataclass(frozen=True)
class Footprint:
    """The default memory footprint of one exit reason, and why."""

    p_global: float
    p_local: float
    p_sensitive: float
    p_to_user: float
    kind: str
    why: str


def _fp(g: float, loc: float, s: float, u: float, kind: str, why: str) -> Footprint:
    return Footprint(g, loc, s, u, kind, why)


# p_global, p_local, p_sensitive, p_to_user, kind, rationale
FOOTPRINTS: dict[str, Footprint] = {
    "HLT": _fp(1.0, 1.0, 1.0, 0.0, "hlt",
               "the vCPU blocks in kvm_vcpu_block(): the scheduler runs another task (sensitive)"),
    "IO_INSTRUCTION": _fp(1.0, 1.0, 0.0, 1.0, "io",
                          "port I/O to an emulated device is forwarded to the VMM in user space"),
    "EPT_VIOLATION": _fp(1.0, 1.0, 0.1, 0.0, "mmio",
                         "KVM's MMU maps the VM's own memory (local + global); faulting the "
                         "backing page in on the host now and then is sensitive"),
    "EPT_MISCONFIG": _fp(1.0, 1.0, 0.5, 0.5, "mmio",
                         "MMIO to an emulated device: half to the VMM in user space, half to an "
                         "ioeventfd that wakes a host thread (sensitive)"),
    "NPF": _fp(1.0, 1.0, 0.1, 0.1, "mmio",
               "SVM nested page fault: mostly KVM's MMU on the VM's memory, some emulated MMIO"),
    "EXTERNAL_INTERRUPT": _fp(1.0, 0.0, 0.5, 0.0, "io",
                              "a host interrupt handler runs and may touch anything: some "
                              "sensitive"),
    "EXCEPTION_NMI": _fp(1.0, 1.0, 0.5, 0.0, "io",
                         "a host NMI or a guest exception KVM must look at: like an interrupt, "
                         "some sensitive"),
    "INTERRUPT_WINDOW": _fp(1.0, 1.0, 0.0, 0.0, "io",
                            "KVM injects the pending interrupt from the vCPU's own APIC state"),
    "MSR_WRITE": _fp(1.0, 1.0, 0.2, 0.0, "io",
                     "mostly TSC-deadline and x2APIC ICR writes in KVM's LAPIC; an IPI that "
                     "wakes a halted vCPU goes through the scheduler (sensitive)"),
    "MSR_READ": _fp(1.0, 1.0, 0.0, 0.0, "io", "KVM reads the vCPU's own MSR state"),
    "MSR": _fp(1.0, 1.0, 0.1, 0.0, "io",
               "SVM reports MSR reads and writes as one exit: between MSR_READ and MSR_WRITE"),
    "CPUID": _fp(1.0, 1.0, 0.0, 0.0, "io", "KVM answers from the VM's CPUID table"),
    "PAUSE_INSTRUCTION": _fp(1.0, 1.0, 1.0, 0.0, "io",
                             "pause-loop exiting: kvm_vcpu_on_spin() yields to another vCPU "
                             "through the scheduler (sensitive)"),
    "PREEMPTION_TIMER": _fp(1.0, 1.0, 0.0, 0.0, "io",
                            "the VMX preemption timer emulates the guest's LAPIC timer in KVM"),
    "APIC_ACCESS": _fp(1.0, 1.0, 0.0, 0.0, "mmio",
                       "KVM emulates an xAPIC register access on the vCPU's own APIC page"),
    "APIC_WRITE": _fp(1.0, 1.0, 0.2, 0.0, "mmio",
                      "a trapped APIC register write, often the ICR: an IPI that may wake a "
                      "halted vCPU through the scheduler"),
    "EOI_INDUCED": _fp(1.0, 1.0, 0.0, 0.0, "mmio",
                       "KVM completes an EOI for a level-triggered vector in its IOAPIC"),
    "TPR_BELOW_THRESHOLD": _fp(1.0, 1.0, 0.0, 0.0, "io",
                               "KVM re-evaluates the vCPU's pending interrupts"),
    "AVIC_INCOMPLETE_IPI": _fp(1.0, 1.0, 0.5, 0.0, "mmio",
                               "AVIC could not deliver an IPI: KVM kicks the target vCPU, "
                               "waking it through the scheduler when it is halted"),
    "AVIC_UNACCELERATED_ACCESS": _fp(1.0, 1.0, 0.0, 0.0, "mmio",
                                     "KVM emulates an APIC register AVIC does not accelerate"),
    "VMCALL": _fp(1.0, 1.0, 0.5, 0.0, "io",
                  "Linux's hypercalls (PV send-IPI, PV sched-yield, kick) wake or yield to "
                  "another vCPU through the scheduler"),
    "DR_ACCESS": _fp(1.0, 1.0, 0.0, 0.0, "io", "KVM switches the vCPU's debug registers"),
    "CR_ACCESS": _fp(1.0, 1.0, 0.0, 0.0, "io",
                     "KVM emulates a control-register access on the vCPU's state"),
    "INVLPG": _fp(1.0, 1.0, 0.0, 0.0, "io", "KVM's MMU flushes the VM's own mappings"),
    "XSETBV": _fp(1.0, 1.0, 0.0, 0.0, "io", "KVM updates the vCPU's XCR0"),
    "RDPMC": _fp(1.0, 1.0, 0.2, 0.0, "io",
                 "the vPMU reads a host perf event (perf core data is sensitive)"),
    "WBINVD": _fp(1.0, 1.0, 0.0, 0.0, "io", "KVM flushes caches for the VM's own memory"),
}

ALIASES: dict[str, str] = {
    "INTR": "EXTERNAL_INTERRUPT", "INTERRUPT": "EXTERNAL_INTERRUPT",
    "IRQ": "EXTERNAL_INTERRUPT",                                     # arm64
    "IO": "IO_INSTRUCTION", "IOIO": "IO_INSTRUCTION",
    "PENDING_INTERRUPT": "INTERRUPT_WINDOW", "VINTR": "INTERRUPT_WINDOW",
    "NMI_WINDOW": "INTERRUPT_WINDOW",
    "NMI": "EXCEPTION_NMI",
    "PAUSE": "PAUSE_INSTRUCTION",
    "HYPERCALL": "VMCALL", "VMMCALL": "VMCALL", "HVC64": "VMCALL",  # SVM, arm64
    "WFX": "HLT",                                                    # arm64 WFI/WFE
    "EPT_MISCONFIGURATION": "EPT_MISCONFIG",
    "PREEMPTION_TIMER_EXPIRED": "PREEMPTION_TIMER",
    "MOV_DR": "DR_ACCESS",
}

FALLBACK = _fp(1.0, 1.0, 0.5, 0.0, "io",
               "assume the handler touches the VM's state and, half the time, host-sensitive "
               "data (the conservative middle)")

_SEPARATORS = re.compile(r"[\s\-]+")


def normalise(name: str) -> str:
    """The key of an exit reason as ``perf kvm stat`` spells it in any version or vendor."""
    key = _SEPARATORS.sub("_", name.strip()).upper()
    return ALIASES.get(key, key)


def lookup(name: str) -> tuple[Footprint, bool]:
    """The default footprint of ``name`` and whether it has an entry of its own."""
    key = normalise(name)
    fp = FOOTPRINTS.get(key)
    return (fp, True) if fp is not None else (FALLBACK, False)
