"""The sibling-stun handshake, strict and naive, as one CPU runs it.

The steps of model/stun.pml (labels in brackets; model/README.md explains each step and the
orders it relies on), over the region, with timeouts everywhere. The stun plugs into the CPU
(asirt.cpu): it answers at the CPU's safe point (:meth:`Stun.answer`), changes modes only
through the CPU's state writer, and waits with the CPU's waiter.

Requester (asi_exit ... asi_enter), from IDLE or ASI(d):
  [R1] ``gen += 1`` (odd: a request is active), then deliver an IPI to every sibling, and
       kick every sibling in guest mode on a real vCPU (``CpuParams.kick``: it cannot poll
       there; a thread-directed signal makes its KVM_RUN return);
  [R2] strict only: wait until every sibling's ``ack[me] == gen``, acknowledging the
       siblings' own pending requests meanwhile (so simultaneous requesters cannot
       deadlock); naive skips this: it proceeds as soon as the IPIs are sent;
  [R3] mode := HOST (publishes ``host_ns``/``host_gen`` for naive's exposure window);
  [R4] sensitive work; may change domain;
  [R5] leave HOST: mode := ASI(d), or IDLE when d = 0;
  [R6] flush the core buffer;
  [R7] ``release_ns := now``, ``gen += 1`` (even: released).
Target, at every safe point (``answer``) -- a request of sibling j is *pending* when
``gen[j]`` is odd and not yet in my ``ack[j]``:
  [H1] IDLE (or HOST: not running guest code either): acknowledge every pending request;
  [H2] ASI or GUEST: mode := STUNNED, then
  [H3] ``ack[j] := gen[j]`` for every pending j (the store of the mode comes first);
  [P1] stay parked until every sibling's generation is even, acknowledging new requests at
       once, and answering the CPU's other mechanisms (a TLB shootdown) meanwhile;
  [P2] mode := ASI(d); the VM-entry barrier (asirt.sync.barrier) runs again before GUEST.

Ordering: every field has one writer; on x86-TSO message passing needs no fence, and no step's
safety depends on "store my flag, then load yours" (model/README.md). The ``sem`` transport
posts to *every* sibling, so an idle CPU never has to announce IDLE and then check (Dekker).
The kick is such a pattern (R1's store, then a load of the sibling's mode; the vCPU's store of
GUEST, then a load of the generations), so both sides fence; but it only bounds how long the
requester waits: a strict requester waits for the ack whether the kick came or not.

Variants, as data (:data:`PROTOCOL`): ``strict`` and ``naive`` are the two the benchmarks
compare; ``nobarrier`` (no VM-entry barrier), ``noflush`` (no flush on release) and
``lateflush`` (release R7 *before* the flush R6: the model's own S3 mutation) are deliberately
broken, so the tests can show each checker catching them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from asirt.clock import now
from asirt.cpu import ASI, GUEST, HOST, IDLE, Cpu
from asirt.cpu.guard import NO_LIMIT
from asirt.cpu.transport import IPI_SIGNAL
from asirt.cpu.wait import Outcome
from asirt.fence import fence
from asirt.proc import tgkill
from shm_layout.counters import COUNTER
from shm_layout.cpu import EventKind, Phase, Source, Word

__all__ = ["Protocol", "PROTOCOL", "PROTOCOLS", "BROKEN_PROTOCOLS", "ALL_PROTOCOLS",
           "SAFE_PROTOCOLS", "Stun"]


@dataclass(frozen=True)
class Protocol:
    """A variant of the handshake as data."""
    name: str
    waits_for_acks: bool = True        # R2 (naive: IPI delivery only)
    barrier: bool = True               # the VM-entry barrier's B1-B3
    flushes: bool = True               # R6
    flush_before_release: bool = True  # R6 before R7
    claims_safety: bool = False


PROTOCOL = {p.name: p for p in (
    Protocol("strict", claims_safety=True),
    Protocol("naive", waits_for_acks=False),
    Protocol("nobarrier", barrier=False),
    Protocol("noflush", flushes=False),
    Protocol("lateflush", flush_before_release=False),
)}
PROTOCOLS = ("strict", "naive")
BROKEN_PROTOCOLS = ("nobarrier", "noflush", "lateflush")
ALL_PROTOCOLS = PROTOCOLS + BROKEN_PROTOCOLS
SAFE_PROTOCOLS = tuple(p for p in ALL_PROTOCOLS if PROTOCOL[p].claims_safety)

_C = {k: COUNTER[f"stun.{k}"] for k in ("requests", "acks", "parks", "aborts", "flushes",
                                        "exposed", "parked_ns")}


class Stun:
    """One CPU's side of the handshake (module docstring)."""

    def __init__(self, cpu: Cpu, protocol: str = "strict") -> None:
        if protocol not in PROTOCOL:
            raise ValueError(f"protocol {protocol!r}; choose from {', '.join(ALL_PROTOCOLS)}")
        self.cpu, self.proto = cpu, PROTOCOL[protocol]
        self.strict = self.proto.waits_for_acks
        region, slot, lane = cpu.region, cpu.slot, cpu.lane
        self.w = w = cpu.w
        wi = region.word_index
        lanes = cpu.slot_of
        self.i_gen = wi("stun_cpu", slot, "gen")
        self.i_release = wi("stun_cpu", slot, "release_ns")
        self.i_park = wi("stun_cpu", slot, "park_ns")
        self.i_host_ns = wi("stun_cpu", slot, "host_ns")
        self.i_host_gen = wi("stun_cpu", slot, "host_gen")
        self.s_gen = [wi("stun_cpu", s, "gen") for s in lanes]
        self.s_ack_me = [wi("stun_cpu", s, "ack") + lane for s in lanes]   # ack[me] in j's
        self.my_ack_of = [wi("stun_cpu", slot, "ack") + j for j in range(cpu.nlanes)]
        self.s_release = [wi("stun_cpu", s, "release_ns") for s in lanes]
        self.s_park = [wi("stun_cpu", s, "park_ns") for s in lanes]
        self.c = {k: cpu.cnt + v for k, v in _C.items()}
        self.c_flushes = self.c["flushes"]
        self.g = w[self.i_gen]
        self.acked = [w[i] for i in self.my_ack_of]
        self.index = cpu.safepoint.register(self.answer)
        self.others = len(cpu.sibs) > 1
        #: the IPI delivery, bound once (None for spin: nothing is sent)
        self.deliver = cpu.transport.deliver if cpu.transport.kind != "spin" else None
        #: siblings that run a real vCPU cannot poll while in guest mode: kick them (R1)
        self.kicks = cpu.params.kick
        self.s_tid = [wi("stun_cpu", s, "vcpu_tid") for s in lanes]
        self.i_kick_ns = wi("stun_cpu", slot, "kick_ns")
        self.s_kick_ns = [wi("stun_cpu", s, "kick_ns") for s in lanes]
        self.park1 = -1 if self.strict else self.i_park
        self.limit = cpu.waiter.limit
        #: optional histogram recorders (asirt.histogram.recorder), set by the worker
        self.rec_resume: Callable[[int], None] | None = None
        self.rec_exposure: Callable[[int], None] | None = None
        self._declare_words()

    def _declare_words(self) -> None:
        """Its published words, to the CPU's corruption guard (asirt.cpu.guard): a sibling's
        generation and its acks of this CPU's requests are never negative, and this CPU's own
        hold what it last wrote (``g``, ``acked``)."""
        guard, acked = self.cpu.guard, self.acked
        guard.declare(Word.GEN, self.s_gen, 0, NO_LIMIT)
        guard.declare(Word.ACK, self.s_ack_me, 0, NO_LIMIT)
        guard.mine(Word.GEN, self.i_gen, lambda: self.g)
        for k, i in enumerate(self.my_ack_of):
            guard.mine(Word.ACK, i, lambda k=k: acked[k])

    # -- target side ------------------------------------------------------------------------
    def pending(self) -> bool:
        w, acked, gen = self.w, self.acked, self.s_gen
        for j in self.cpu.live:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                return True
        return False

    def ack_pending(self) -> int:
        """Acknowledge every pending request (the model's ACK_PENDING); how many."""
        w, acked, gen, mine = self.w, self.acked, self.s_gen, self.my_ack_of
        n = 0
        for j in self.cpu.live:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                w[mine[j]] = g
                acked[j] = g
                n += 1
        if n:
            w[self.c["acks"]] += n
        return n

    def answer(self) -> bool:
        """The safe point's stun answer [H1-H3, P1, P2]. True when this CPU parked (it is then
        back in ASI, and a CPU that was in GUEST must run the barrier again)."""
        # pending() inline: this runs at every safe point, nearly always to find nothing
        w, acked, gen = self.w, self.acked, self.s_gen
        for j in self.cpu.live:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                break
        else:
            return False
        cpu = self.cpu
        if cpu.dl:
            cpu.dl()
        mode = cpu.state.mode
        if mode == IDLE or mode == HOST:                             # H1
            if not self.strict:
                w[self.i_park] = now()
            self.ack_pending()
            return False
        # No guest-exit assertion here: this is the round trip's critical path, and an S1
        # violation at a stun exit (a requester already in HOST) is the requester's own
        # HOST-entry assertion's to find.
        self.park()
        return True

    def park(self) -> None:
        """H2, H3, P1, P2: park, ack, wait for every release, resume in ASI(dom)."""
        w, acked, gen, mine = self.w, self.acked, self.s_gen, self.my_ack_of
        acks = []
        for j in self.cpu.live:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                acks.append((mine[j], g))
                acked[j] = g
        self.parked(acks)

    def parked(self, acks: list[tuple[int, int]]) -> None:
        """H2+H3 (the state writer stores STUNNED, then these acks), then P1 and P2."""
        self.cpu.state.stunned(acks, self.park1)
        self.after_park(len(acks))

    def after_park(self, nack: int) -> None:
        """P1 and P2, once STUNNED and acked."""
        cpu, w = self.cpu, self.w
        t_park = now()
        w[self.c["parks"]] += 1
        w[self.c["acks"]] += nack
        if cpu.dl:
            cpu.dl()
        stopped = self._wait_released()
        if cpu.dl:
            cpu.dl()
        t = now()                                                       # P2
        if self.rec_resume is not None and not stopped:
            rel = max((w[self.s_release[j]] for j in cpu.live), default=0)
            if rel > t_park:
                self.rec_resume(t - rel)
        dom = cpu.state.dom
        cpu.state.set(ASI if dom else IDLE, dom)
        w[self.c["parked_ns"]] += now() - t_park

    def _wait_released(self) -> bool:
        """P1: out of GUEST until every live sibling's generation is even, acking new
        requests at once and answering the CPU's other mechanisms. True if the run stopped."""
        cpu, w = self.cpu, self.w
        acked, gen, limit = self.acked, self.s_gen, cpu.waiter.limit
        sp, index = cpu.safepoint, self.index
        answer_others = len(sp) > 1
        for j in list(cpu.live):
            gj = gen[j]
            n = 0
            wait = None
            while True:
                g = w[gj]
                if not g & 1:
                    break
                if g != acked[j] or (self.others and self.pending()):
                    self.ack_pending()
                n += 1
                if n >= limit:
                    if wait is None:
                        wait = cpu.waiter.begin(j, Phase.PARK)
                    if answer_others:
                        sp.others(index)
                    r = wait.slow()
                    if r == Outcome.STOP:
                        wait.done()
                        return True
                    if r == Outcome.FENCED:
                        break
                elif answer_others and not n & 63:
                    sp.others(index)
            if wait is not None:
                wait.done()
        return False

    # -- requester side ---------------------------------------------------------------------
    def request(self) -> bool:
        """R1 and R2: ask every sibling to park; strict waits for every ack (acking the
        siblings' requests meanwhile). False when the request was given up (released unused)
        or the run is stopping; the caller must then not enter HOST."""
        w = self.w
        g = self.g + 1
        self.g = g
        w[self.i_gen] = g                                               # R1
        if self.deliver is not None:
            self.deliver(self.cpu.live)
        if self.kicks:
            self.kick()
        if not self.strict:
            return True
        live = self.cpu.live
        if len(live) == 1 and self.cpu.dl is None:
            # R2 for one sibling, inline (a call here is paid on every round trip): poll its
            # ack of g, and every 8th poll look for its own request (acked within 8 polls, so
            # two requesters still both get through; a poll of one word sees the ack sooner);
            # the general loop takes the slow path
            j = live[0]
            ia, gk, acked = self.s_ack_me[j], self.s_gen[j], self.acked
            n, limit = 0, self.limit
            while w[ia] != g:
                n += 1
                if not n & 7:
                    x = w[gk]
                    if x & 1 and x != acked[j]:
                        self.ack_pending()
                    if n >= limit:
                        return self.wait_acks()
            return True
        return self.wait_acks()

    def kick(self) -> None:
        """R1 for siblings in guest mode on a real vCPU: a thread-directed IPI_SIGNAL to the
        vCPU thread makes its KVM_RUN return (asirt.kvm.real), and it parks. The fence orders
        R1's store before the loads of the siblings' modes; the vCPU fences between its
        store of GUEST and its look for a pending request before KVM_RUN: so a sibling that
        enters guest mode now either is kicked or sees this request (store buffering cannot
        hide both)."""
        fence()
        cpu, w = self.cpu, self.w
        for j in cpu.live:
            if w[cpu.s_mode[j]] == GUEST:
                tid = w[self.s_tid[j]]
                if tid:
                    w[self.i_kick_ns] = now()
                    try:
                        tgkill(w[cpu.s_pid[j]], tid, IPI_SIGNAL)
                    except ProcessLookupError:
                        pass            # it died: the ack wait's liveness check fences it

    def wait_acks(self) -> bool:
        """R2 (strict). False: given up (and released), or stopping."""
        cpu, w, g = self.cpu, self.w, self.g
        limit = cpu.waiter.limit
        if cpu.dl:
            cpu.dl()
        sp, index = cpu.safepoint, self.index
        answer_others = len(sp) > 1
        for j in list(cpu.live):                                        # R2
            ia = self.s_ack_me[j]
            n = 0
            wait = None
            while w[ia] != g:
                if self.pending():           # a sibling's own request: ack it at once
                    self.ack_pending()
                n += 1
                if n >= limit:
                    if wait is None:
                        wait = cpu.waiter.begin(j, Phase.REQUEST, give_up=True)
                    if answer_others:
                        sp.others(index)
                    r = wait.slow()
                    if r == Outcome.FENCED:
                        break
                    if r != Outcome.GO_ON:
                        wait.done()
                        self._abort(r)
                        return False
                elif answer_others and not n & 63:
                    sp.others(index)
            if wait is not None:
                wait.done()
        return True

    def _abort(self, why: Outcome) -> None:
        if why == Outcome.GIVE_UP:
            self.w[self.c["aborts"]] += 1
            self.cpu.events.emit(EventKind.ABORT, Source.LIVENESS, -1, Phase.REQUEST, 0, 0)
        self.release()

    def enter_host(self) -> None:
        """R3."""
        w = self.w
        self.cpu.state.enter_host()
        w[self.i_host_ns] = now()
        w[self.i_host_gen] = self.g

    def leave_host(self) -> None:
        """R5 (asi_enter's mode store): back to ASI(d), or IDLE when d = 0."""
        state = self.cpu.state
        state.set(ASI if state.dom else IDLE, state.dom)

    def flush(self) -> None:
        """R6: flush what this CPU's HOST period left in the core buffer (its taints say so;
        nothing to flush when a flush since has cleared them). The one flush: asirt.cpu.state."""
        if self.proto.flushes and self.cpu.state.taint:
            self.cpu.state.flush(self.c_flushes)

    def release(self) -> None:
        """R7 (and naive's exposure window, measured just before it)."""
        w = self.w
        g = self.g
        t = now()
        if not self.strict:
            self._exposure(t, g)
        w[self.i_release] = t
        g += 1
        self.g = g
        w[self.i_gen] = g
        w[self.c["requests"]] += 1      # counted here, off the round trip's timed path

    def unstun(self) -> None:
        """R6 and R7 in the protocol's order (``lateflush`` releases first: broken)."""
        first, then = ((self.flush, self.release) if self.proto.flush_before_release
                       else (self.release, self.flush))
        first()
        if self.cpu.dl:
            self.cpu.dl()
        then()

    def _exposure(self, t: int, g: int) -> None:
        """Naive: for each sibling, how long this CPU was in HOST before the sibling parked
        (the whole HOST period when it never did)."""
        w = self.w
        if w[self.i_host_gen] != g:
            return                       # never entered HOST with this request
        host = w[self.i_host_ns]
        exposed = 0
        for j in self.cpu.live:
            window = (w[self.s_park[j]] if w[self.s_ack_me[j]] == g else t) - host
            if window > 0:
                exposed = 1
            if self.rec_exposure is not None:
                self.rec_exposure(window if window > 0 else 0)
        if exposed:
            w[self.c["exposed"]] += 1

    def sensitive(self, work: Callable[[], None] | None = None,
                  new_dom: int | None = None) -> bool:
        """A whole sensitive section: R1-R7. False if the request was given up."""
        dl = self.cpu.dl
        if not self.request():
            return False
        if dl:
            dl()
        self.enter_host()
        if dl:
            dl()
        if work is not None:
            work()
        if new_dom is not None and new_dom != self.cpu.state.dom:
            self.cpu.state.set_domain(new_dom)
            if dl:
                dl()
        self.leave_host()
        if dl:
            dl()
        self.unstun()
        return True

    # -- the end of a run -------------------------------------------------------------------
    def finish(self) -> None:
        """Leave the core cleanly (through HOST to IDLE) and keep answering requests until
        every live sibling has finished too, so no sibling waits on one that has left.
        Unfinished siblings that die or stay stopped meanwhile are fenced off; returns at
        once when the run is stopping."""
        cpu, w = self.cpu, self.w
        if cpu.state.mode != IDLE and not cpu.stopping():
            self.sensitive(None, 0)
        w[cpu.i_phase] = Phase.FINISHED
        cpu.publish_progress()
        while not cpu.stopping():
            w[cpu.i_phase] = Phase.FINISHED       # a park on the way resets it
            waiting = [j for j in cpu.live if w[cpu.s_phase[j]] != Phase.FINISHED]
            if not waiting:
                return
            j = waiting[0]
            wait = cpu.waiter.begin(j, Phase.FINISHED)    # every poll here is a slow one
            while w[cpu.s_phase[j]] != Phase.FINISHED and j in cpu.live:
                cpu.idle_wait(1_000_000)
                if wait.slow() in (Outcome.STOP, Outcome.FENCED):
                    break
