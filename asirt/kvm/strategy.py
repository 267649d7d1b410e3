"""The seven mitigation strategies, as a table of data over the runtime's primitives.

The vCPU loop (asirt.kvm.loop) is written once; a :class:`Strategy` only says which primitive
each of its steps uses. Exact semantics (README.md, "Strategies"):

=========  =====  ===========  ====================  ===========  ============  ==========
strategy   lanes  exits run    siblings stunned      flush        VM entry      cookies
                  in
=========  =====  ===========  ====================  ===========  ============  ==========
none       all    HOST (full)  never                 never        no barrier    no
smt-off    one    HOST (full)  never (no sibling)    when tainted no barrier    no
always     all    HOST (full)  every exit            every entry  B1-B3         no
coresched  all    HOST (full)  never                 when tainted cookie gate   yes
asi        all    ASI (restr.) on asi_exit           on asi_enter B1-B3         no
kcs        all    ASI (full)   before sensitive code when tainted B1-B3         yes
asi+kcs    all    ASI (restr.) on asi_exit           on asi_enter B1-B3         yes
=========  =====  ===========  ====================  ===========  ============  ==========

- *exits run in*: the mode an exit is handled in, and the address space. HOST is the
  unrestricted kernel. ASI(d) in a restricted tree maps only global and VM d's local memory: a
  sensitive access faults out (asi_exit: the class's exit hook stuns the siblings) and the
  handling goes on in HOST until asi_enter (flush if tainted, then the enter hook releases).
  ``kcs`` marks exit handling as non-sensitive KVM code (tagged with the VM's cookie, mode
  ASI(d)) but runs it in the full address space: a known sensitive access is bracketed by an
  untag (the stun) and a retag; a speculative gadget there loads what it touches.
- *flush*: "when tainted" is KVM's conditional L1D flush (asirt.cpu.state's taints: after the
  unrestricted kernel ran or a sensitive frame was loaded).
- *VM entry*: B1-B3 is the VM-entry barrier (asirt.sync.barrier: no active stun, no sibling
  in HOST, no sibling of another VM); the cookie gate is core scheduling of guests
  (asirt.sync.coresched): a vCPU runs only while its siblings run its VM's cookie or idle,
  host tasks (cookie 0) included, forced idle otherwise.
- *cookies*: where the kernel has PR_SCHED_CORE the worker processes are tagged too; otherwise
  the result says the tagging is emulated and why.

Claims: ``none`` and ``coresched`` claim no safety (host data leaks: exits run in HOST beside
sibling guests); ``kcs`` claims it only without gadgets; the others claim it. Two variants are
broken on purpose and still claim safety, so that a run shows the checkers catching them:
``always-noflush`` (no flush anywhere: the stun's R6, the barrier's and the entry's are all
off) and ``asi-noack`` (the stun does not wait for the siblings' acks: naive).

Variants (Chartre's reply to the ASI RFC), for the ASI strategies:
- ``stun_at``: ``hooks`` (default: the stun in the ASI class hooks, only for exits that leave
  the restricted space) or ``exit`` (stun at every VM exit, release at VM entry);
- ``interrupts``: ``stay`` (default: an interrupt is handled in the restricted space and
  faults out only on a sensitive access) or ``exit`` (leave ASI explicitly at interrupt entry).
"""
from __future__ import annotations

from dataclasses import dataclass

from asirt.errors import BadInput

__all__ = ["Strategy", "STRATEGIES", "NAMES", "BROKEN", "ALL_NAMES", "STUN_AT", "INTERRUPTS",
           "get"]

STUN_AT = ("hooks", "exit")
INTERRUPTS = ("stay", "exit")


@dataclass(frozen=True)
class Strategy:
    name: str
    one_lane: bool            # only the first lane of each core runs vCPUs (SMT off)
    restricted: bool          # exits run in the VM's restricted ASI tree
    exit_in_asi: bool         # the mode while handling an exit: ASI(d) (else HOST)
    stun_every_exit: bool     # stun the siblings at every VM exit, release at VM entry
    stun_sensitive: bool      # stun before sensitive code (ASI: in the exit hook; kcs: untag)
    flush_every_entry: bool   # flush at every VM entry, tainted or not
    flush_tainted: bool       # flush at VM entry / asi_enter when the taints ask for it
    barrier: bool             # the VM-entry barrier B1-B3
    cookies: bool             # core scheduling of vCPUs (the cookie gate, force idle)
    claims: str               # "yes", "no" or "without gadgets"
    protocol: str = "strict"  # the stun handshake's variant (asirt.sync.stun.PROTOCOL)

    def claims_safety(self, gadgets: float) -> bool:
        return self.claims == "yes" or (self.claims == "without gadgets" and gadgets == 0)


STRATEGIES = {s.name: s for s in (
    Strategy("none", False, False, False, False, False, False, False, False, False, "no"),
    Strategy("smt-off", True, False, False, False, False, False, True, False, False, "yes"),
    Strategy("always", False, False, False, True, False, True, True, True, False, "yes"),
    Strategy("coresched", False, False, False, False, False, False, True, False, True, "no"),
    Strategy("asi", False, True, True, False, True, False, True, True, False, "yes"),
    Strategy("kcs", False, False, True, False, True, False, True, True, True,
             "without gadgets"),
    Strategy("asi+kcs", False, True, True, False, True, False, True, True, True, "yes"),
)}
NAMES = tuple(STRATEGIES)
#: deliberately broken variants that still claim safety, to see the checkers catch them (never
#: run unless named): ``always`` without any flush, ``asi`` whose stun does not wait for acks
BROKEN = {s.name: s for s in (
    Strategy("always-noflush", False, False, False, True, False, False, False, True, False,
             "yes", "noflush"),
    Strategy("asi-noack", False, True, True, False, True, False, True, True, False, "yes",
             "naive"),
)}
ALL_NAMES = NAMES + tuple(BROKEN)


def get(name: str) -> Strategy:
    try:
        return STRATEGIES.get(name) or BROKEN[name]
    except KeyError:
        raise BadInput(f"strategy {name!r}", "is not one asirt knows",
                       f"choose from {', '.join(NAMES)} (comma-separated; "
                       f"{', '.join(BROKEN)} are broken on purpose)") from None
