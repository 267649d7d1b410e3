"""The sibling-stun handshake, strict and naive, as one CPU (one pinned worker) runs it.

A :class:`StunCpu` is one CPU's handle on its core: its own fields in ``stun_cpu`` /
``stun_buf`` and the word indices of its siblings'. It implements the steps of
model/stun.pml (labels in brackets; model/README.md explains each step and the orders it
relies on) over the shared region, with timeouts everywhere. Safe points (where requests
are acked) are only the main loop, the guest loop's poll, the R2 wait and the P1 park --
never between B1 and B4:

Requester (asi_exit ... asi_enter), from IDLE or ASI(d):
  [R1] ``gen += 1`` (odd: a request is active), then deliver an IPI to every sibling;
  [R2] strict only: wait until every sibling's ``ack[me] == gen``, acknowledging the
       siblings' own pending requests meanwhile (so simultaneous requesters cannot
       deadlock); naive skips this: it proceeds as soon as the IPIs are sent;
  [R3] mode := HOST (publishes ``host_ns``/``host_gen`` for naive's exposure window);
  [R4] sensitive work; may change domain (``set_domain``);
  [R5] leave HOST: mode := ASI(d), or IDLE when d = 0;
  [R6] flush the core buffer;
  [R7] ``release_ns := now``, ``gen += 1`` (even: released).
Target, at every safe point and in the signal handler (``safe_point``):
  a request of sibling j is *pending* when ``gen[j]`` is odd and not yet in my ``ack[j]``;
  [H1] IDLE: acknowledge every pending request and go back to sleep;
  [H2] otherwise mode := STUNNED (leaving GUEST or ASI), then
  [H3] ``ack[j] := gen[j]`` for every pending j (the store of the mode comes first);
  [P1] stay parked until every sibling's generation is even, acknowledging new
       requests at once;
  [P2] mode := ASI(d); the VM-entry barrier (asirt.barrier) runs again before GUEST.
VM-entry barrier [B1-B4] (asirt.barrier): per sibling, no active request (gen even), not
  in HOST, no other domain; the core buffer holds nothing d may not see; then mode := GUEST.

Ordering and fences. Every field has one writer. On x86-TSO stores become visible in
program order and loads are not reordered with older loads, so message passing needs no
fence: the requester enters HOST only after it has *read* each sibling's ack, and a sibling
writes its ack only after its store of STUNNED (or while IDLE, or while itself requesting
in ASI) and then does not enter GUEST until it has *read* the requester's generation even
again (P1, and B1 on every entry). Nothing in the strict handshake is "store my flag, then
load yours" (Dekker): no step's safety depends on a load that follows the same CPU's store
to a different word. The one place that pattern would appear -- an idle CPU announcing
IDLE and then checking for requests before it sleeps, racing a requester that stores its
generation and then reads the mode to decide whom to wake -- is avoided by construction:
the ``sem`` transport posts to *every* sibling, and a semaphore post/wait pair synchronizes
(glibc: atomic fetch-add / compare-exchange, locked instructions on x86). CPython gives no
plain fence (there is no ``__sync_synchronize`` to call), so where a real one is wanted --
the optional fenced transition-time assertions -- asirt.invariants.Fence posts and waits on a
private POSIX semaphore. The interpreter cannot reorder the accesses: each memoryview load
or store is its own C call on an opaque pointer.

Transports (delivery of the IPI; the protocol is the same for all three):
  spin    nothing is sent; the target polls the requesters' generations at its safe points;
  signal  SIGUSR1 to each sibling; the handler parks the CPU when it interrupts a running
          guest (or acks when it interrupts an idle sleep); interrupted mid-transition it
          does nothing, and the interrupted code reaches its next safe point within steps;
  sem     a post on each sibling's ``wake<slot>`` semaphore, which wakes an idle CPU
          blocked in the kernel: it acks (H1) and goes back to sleep.

Timeouts and fencing: every wait polls (spin, then yield on every poll) and, past the ack
timeout, checks the liveness of the CPU it waits for: a dead one is *fenced off* (its lane
is set in this CPU's ``fenced`` mask and ignored from then on); a stopped one is killed first
(STONITH: it must never resume in a stale mode), then fenced; a live one is waited on, up to
``give_up_ns`` for a requester, after which the request is released unused (an abort is
always safe). Every wait also ends when the parent asks the workers to stop.

Protocol variants: ``strict`` and ``naive`` are the two the benchmarks compare; ``nobarrier``
(no VM-entry barrier) and ``noflush`` (no flush on release, no buffer check at entry) are
deliberately broken so the tests can show each checker catching them.
"""
from __future__ import annotations

import enum
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import posix_ipc

from asirt.clock import now
from asirt.fence import fence
from asirt.invariants import EventRing, TransitionChecker
from asirt.spin import spin_limit
from shm_layout.region import pid_alive, sem_wait
from shm_layout import Region
from shm_layout.header import STOP_WORD
from shm_layout.sections import Mode
from shm_layout.stun import COUNTER, NCLASS, EventKind, Source

__all__ = ["PROTOCOLS", "BROKEN_PROTOCOLS", "ALL_PROTOCOLS", "SAFE_PROTOCOLS", "TRANSPORTS",
           "Phase", "StunConfig", "StunCpu", "Wait", "liveness"]

PROTOCOLS = ("strict", "naive")
BROKEN_PROTOCOLS = ("nobarrier", "noflush")
ALL_PROTOCOLS = PROTOCOLS + BROKEN_PROTOCOLS
SAFE_PROTOCOLS = ("strict",)
TRANSPORTS = ("spin", "signal", "sem")

IDLE, HOST, ASI, GUEST, STUNNED = (int(m) for m in (Mode.IDLE, Mode.HOST, Mode.ASI, Mode.GUEST,
                                                    Mode.STUNNED))
C_REQUESTS, C_ACKS, C_PARKS, C_CHECKS = (COUNTER[k] for k in ("requests", "acks", "parks", "checks"))
ALIVE_FOR_NS = 1_000_000       # sibling_counts reuses a "process alive" answer this long
C_HOST_ENTRIES, C_GUEST_ENTRIES, C_FLUSHES = (COUNTER[k] for k in ("host_entries", "guest_entries",
                                                                   "flushes"))


class Phase(enum.IntEnum):
    """Where a CPU is (``stun_cpu.phase``; also what a TIMEOUT event waited in)."""
    MAIN = 0
    PARK = 1        # P1: parked, waiting for the requesters to release
    REQUEST = 2     # R2: waiting for acks
    HOST = 3
    BARRIER = 4     # waiting for a sibling's state to change before re-checking
    GUEST = 5
    IDLE = 6
    RENDEZVOUS = 7
    CORESCHED = 8   # forced idle, waiting for the core's cookie
    LOCK = 9        # waiting for the core lock
    FINISHED = 10   # done with its own work; idle, answering requests until its siblings are


class Wait(enum.IntEnum):
    """What one slow-path tick of a wait loop says."""
    GO_ON = 0
    STOP = 1        # the parent asked every worker to stop
    FENCED = 2      # the CPU waited for was fenced off
    GIVE_UP = 3     # waited past give_up_ns for a live CPU


@dataclass(frozen=True)
class StunConfig:
    protocol: str = "strict"
    transport: str = "spin"
    oversubscribed: bool = False      # more workers than CPUs: yield after a few polls
    ack_timeout_ns: int = 50_000_000  # past this, a wait checks the liveness of whom it waits for
    give_up_ns: int = 5_000_000_000   # a request still unacknowledged by a live sibling: abort
    check: bool = True                # transition-time assertions (asirt.invariants)
    check_fence: bool = False         # ... with a real fence before their loads
    classes: int = 3                  # deposit classes in use: host + domains 1..classes-1
    stonith: bool = True              # kill a stopped sibling that does not answer, then fence it

    def __post_init__(self) -> None:
        if self.protocol not in ALL_PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}; choose from {', '.join(ALL_PROTOCOLS)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r}; choose from {', '.join(TRANSPORTS)}")
        if not 2 <= self.classes <= NCLASS:
            raise ValueError(f"classes {self.classes}: between 2 and {NCLASS}")


def liveness(pid: int) -> str:
    """"dead", "stopped" or "alive" (from /proc; a zombie is dead)."""
    if not pid_alive(pid):
        return "dead"
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return "dead"
    if state in (b"T", b"t"):
        return "stopped"
    return "alive"


class StunCpu:
    """One CPU's side of the handshake (see the module docstring for the steps)."""

    def __init__(self, region: Region, slot: int, lanes: list[int], cfg: StunConfig,
                 delay: Callable[[], None] | None = None, domain: int = 0,
                 mode: int = IDLE, leak_hook: object | None = None) -> None:
        if slot not in lanes:
            raise ValueError(f"slot {slot} is not in its core's lanes {lanes}")
        self.region, self.cfg, self.slot = region, cfg, slot
        self.w = w = region.words
        wi = region.word_index
        self.lane = lane = lanes.index(slot)
        self.nlanes = n = len(lanes)
        self.slot_of = list(lanes)
        self.sibs = [j for j in range(n) if j != lane]
        self.strict = cfg.protocol != "naive"
        self.barrier_on = cfg.protocol != "nobarrier"
        self.flush_on = cfg.protocol != "noflush"
        self.dl = delay
        self.limit = spin_limit(cfg.oversubscribed)
        # my words
        self.i_gen = wi("stun_cpu", slot, "gen")
        self.i_ack = wi("stun_cpu", slot, "ack")
        self.i_release = wi("stun_cpu", slot, "release_ns")
        self.i_park = wi("stun_cpu", slot, "park_ns")
        self.i_host_ns = wi("stun_cpu", slot, "host_ns")
        self.i_host_gen = wi("stun_cpu", slot, "host_gen")
        self.i_mseq = wi("stun_cpu", slot, "mseq")
        self.i_fenced = wi("stun_cpu", slot, "fenced")
        self.i_phase = wi("stun_cpu", slot, "phase")
        self.i_heartbeat = wi("stun_cpu", slot, "heartbeat_ns")
        self.cnt = wi("stun_cpu", slot, "counters")
        self.i_mode = wi("slots", slot, "mode")
        self.i_dom = wi("slots", slot, "domain")
        self.i_progress = wi("slots", slot, "progress")
        # every lane's words (index = lane; my own lane included where useful)
        self.s_gen = [wi("stun_cpu", s, "gen") for s in lanes]
        self.s_ack_me = [wi("stun_cpu", s, "ack") + lane for s in lanes]   # ack[me] in j's record
        self.my_ack_of = [self.i_ack + j for j in range(n)]                   # ack[j] in mine
        self.s_mode = [wi("slots", s, "mode") for s in lanes]
        self.s_dom = [wi("slots", s, "domain") for s in lanes]
        self.s_mseq = [wi("stun_cpu", s, "mseq") for s in lanes]
        self.s_release = [wi("stun_cpu", s, "release_ns") for s in lanes]
        self.s_park = [wi("stun_cpu", s, "park_ns") for s in lanes]
        self.s_pid = [wi("slots", s, "pid") for s in lanes]
        self.s_fenced = [wi("stun_cpu", s, "fenced") for s in lanes]
        self._alive_at = [-ALIVE_FOR_NS] * len(lanes)   # see sibling_counts
        self.s_phase = [wi("stun_cpu", s, "phase") for s in lanes]
        classes = cfg.classes
        self.classes = classes
        dep = [wi("stun_buf", s, "dep") for s in lanes]
        flushed = [wi("stun_buf", s, "flushed") for s in lanes]
        self.dep_of = [[dep[j] + k for k in range(classes)] for j in range(n)]
        #: flushed_of[j][k]: every lane x's mark of lane j, class k
        self.flushed_of = [[[flushed[x] + j * NCLASS + k for x in range(n)] for k in range(classes)]
                           for j in range(n)]
        self.my_marks = [[flushed[lane] + j * NCLASS + k for k in range(classes)] for j in range(n)]
        self.i_dep = dep[lane]
        #: (lane, class, its deposit word, every lane's flush mark of it): what S3 reads
        self.buf_cells = [(j, k, self.dep_of[j][k], tuple(self.flushed_of[j][k]))
                          for j in range(n) for k in range(classes)]
        # local mirrors of fields only this CPU writes
        self.g = w[self.i_gen]
        self.acked = [w[i] for i in self.my_ack_of]
        self.mseq = w[self.i_mseq]
        self.dep = [w[dep[lane] + k] for k in range(classes)]
        self.fenced_mask = w[self.i_fenced]
        self.live_sibs = [j for j in self.sibs if not self.fenced_mask >> j & 1]
        self.mode, self.dom, self.cls = mode, domain, -1
        self.ntrans = 0
        self.ring = EventRing(region, slot)
        self.checker = (TransitionChecker(self, self.ring,
                                          fence if cfg.check_fence else None)
                        if cfg.check else None)
        self.leak_hook = leak_hook
        #: the hook's own flush (asirt.uarch.CoreBuffer.flush: clears it, evicts one L1D)
        self._hook_flush: Callable[[], None] | None = getattr(leak_hook, "flush", None)
        self._deliver: Callable[[], None] | None = None
        self._wake = None
        self.steady = False        # signal transport: the handler may act (running guest / idle)
        self.interrupted = False   # signal transport: the handler parked this CPU
        self._set(mode, domain)
        #: optional histogram recorders (asirt.histogram.recorder), set by the worker
        self.rec_resume: Callable[[int], None] | None = None
        self.rec_exposure: Callable[[int], None] | None = None

    # -- counters, events, liveness ------------------------------------------------------
    def count(self, name: str, k: int = 1) -> None:
        self.w[self.cnt + COUNTER[name]] += k

    def publish_progress(self) -> None:
        w = self.w
        w[self.cnt + COUNTER["transitions"]] = self.ntrans
        w[self.i_progress] = self.ntrans
        w[self.i_heartbeat] = now()

    def sibling_counts(self, j: int) -> bool:
        """Whether lane j still takes part (a violation involving it is real): not fenced off by
        any sibling, process alive. Called only when reporting a violation, but under a broken
        protocol that is often (7% of checks in a naive stress run), so a live answer is
        reused for ALIVE_FOR_NS: /proc costs ~7 us a read, paid inside HOST. A sibling that
        died within that window may be counted once more; its mode was real until it died."""
        if j == self.lane:
            return True
        w = self.w
        for i in self.s_fenced:
            if w[i] >> j & 1:
                return False
        t = now()
        if t - self._alive_at[j] < ALIVE_FOR_NS:
            return True
        alive = pid_alive(w[self.s_pid[j]])
        if alive:
            self._alive_at[j] = t
        return alive

    def fence(self, j: int, state: str) -> None:
        """Fence lane j off: never wait for it again, ignore it in every check."""
        if self.fenced_mask >> j & 1:
            return
        pid = self.w[self.s_pid[j]]
        kind = EventKind.FENCE_DEAD
        if state == "stopped":
            kind = EventKind.FENCE_STOPPED
            if self.cfg.stonith:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.fenced_mask |= 1 << j
        self.w[self.i_fenced] = self.fenced_mask
        self.live_sibs = [k for k in self.live_sibs if k != j]
        self.count("fenced")
        self.ring.emit(kind, Source.LIVENESS, self.slot_of[j], self.w[self.i_phase], 0, pid)

    def tick(self, start: int, j: int, phase: Phase, state: list[int]) -> Wait:
        """The slow path of every wait loop, after its spin limit: yield, and past the ack
        timeout check whether lane j (whom it waits for) is alive. ``state`` is the loop's
        own [next liveness check time]."""
        w = self.w
        if w[STOP_WORD]:
            return Wait.STOP
        t = now()
        if t >= state[0]:
            if state[0] == 0:        # first slow tick of this wait: just arm the timer
                state[0] = start + self.cfg.ack_timeout_ns
                w[self.i_phase] = phase
            else:
                state[0] = t + self.cfg.ack_timeout_ns
                self.count("timeouts")
                life = liveness(w[self.s_pid[j]]) if j >= 0 else "alive"
                if life != "alive":
                    self.ring.emit(EventKind.TIMEOUT, Source.LIVENESS, self.slot_of[j], phase,
                                   t - start, 1)
                    self.fence(j, life)
                    return Wait.FENCED
                self.count("slow")
                self.ring.emit(EventKind.TIMEOUT, Source.LIVENESS,
                               self.slot_of[j] if j >= 0 else -1, phase, t - start, 0)
                # An orphaned worker needs no check here: workers/__main__.py asks the kernel
                # (PR_SET_PDEATHSIG) to SIGKILL it when the orchestrator dies.
            if t - start > self.cfg.give_up_ns:
                self.ring.emit(EventKind.TIMEOUT, Source.LIVENESS,
                               self.slot_of[j] if j >= 0 else -1, phase, t - start, 0)
                return Wait.GIVE_UP
        os.sched_yield()
        return Wait.GO_ON

    # -- transitions ---------------------------------------------------------------------
    def _set(self, mode: int, dom: int) -> None:
        """Publish a new mode and domain under the seqlock, and keep the deposit record."""
        w = self.w
        cls = 0 if mode == HOST else dom if (mode == ASI or mode == GUEST) and dom > 0 else -1
        old = self.cls
        if cls != old and cls >= 0:          # a deposit period starts before the mode shows
            v = self.dep[cls] + 1
            self.dep[cls] = v
            w[self.i_dep + cls] = v
        s = self.mseq + 1
        w[self.i_mseq] = s
        w[self.i_mode] = mode
        w[self.i_dom] = dom
        w[self.i_mseq] = s + 1
        self.mseq = s + 1
        self.mode, self.dom = mode, dom
        if cls != old:
            if old >= 0:                      # ... and ends after the mode changed
                v = self.dep[old] + 1
                self.dep[old] = v
                w[self.i_dep + old] = v
            self.cls = cls
        self.ntrans += 1

    # -- target side: safe points --------------------------------------------------------
    def pending(self) -> bool:
        w, acked, gen = self.w, self.acked, self.s_gen
        for j in self.live_sibs:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                return True
        return False

    def ack_pending(self) -> int:
        """Acknowledge every pending request (the model's ack_pending); returns how many."""
        w, acked, gen, mine = self.w, self.acked, self.s_gen, self.my_ack_of
        n = 0
        for j in self.live_sibs:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                w[mine[j]] = g
                acked[j] = g
                n += 1
        if n:
            self.w[self.cnt + C_ACKS] += n
        return n

    def safe_point(self) -> bool:
        """Handle pending stun requests [H1-H3, P1, P2]. True when this CPU parked (it is then
        back in ASI, or IDLE; a CPU that was in GUEST must run the barrier again)."""
        # pending() inline: this runs at every safe point of the guest loop, nearly always
        # to find nothing, so a call here would be paid on every poll.
        w, acked, gen = self.w, self.acked, self.s_gen
        for j in self.live_sibs:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                break
        else:
            return False
        dl = self.dl
        if dl:
            dl()
        mode = self.mode
        if mode == IDLE:                                        # H1
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
        w, dl = self.w, self.dl
        # H2: mode := STUNNED (the seqlock inline: this is on the round trip's critical path)
        s = self.mseq + 1
        w[self.i_mseq] = s
        w[self.i_mode] = STUNNED
        if not self.strict:
            w[self.i_park] = now()          # naive's exposure window reads it after the ack
        if dl:
            dl()
        # H3: ack what is pending -- ack_pending() written inline: a call here would be paid
        # on every stun round trip.
        acked, gen, mine = self.acked, self.s_gen, self.my_ack_of
        nack = 0
        for j in self.live_sibs:
            g = w[gen[j]]
            if g & 1 and g != acked[j]:
                w[mine[j]] = g
                acked[j] = g
                nack += 1
        w[self.i_mseq] = s + 1
        self._parked(s + 1, nack)

    def _parked(self, mseq: int, nack: int) -> None:
        """After H3 (the CPU is STUNNED and has acked): bookkeeping, then P1 and P2."""
        w, dl = self.w, self.dl
        t_park = now()
        self.mseq = mseq
        self.mode = STUNNED
        cls = self.cls
        if cls >= 0:
            v = self.dep[cls] + 1
            self.dep[cls] = v
            w[self.i_dep + cls] = v
            self.cls = -1
        self.ntrans += 1
        c = self.cnt
        w[c + C_PARKS] += 1
        w[c + C_ACKS] += nack
        if dl:
            dl()
        # P1: out of GUEST until every sibling's generation is even, acking new requests
        acked, gen, limit = self.acked, self.s_gen, self.limit
        stopped = False
        for j in list(self.live_sibs):
            gj = gen[j]
            n = 0
            start = 0
            state = [0]
            others = len(self.live_sibs) > 1
            while True:
                g = w[gj]
                if not g & 1:
                    break
                if g != acked[j] or (others and self.pending()):
                    self.ack_pending()
                n += 1
                if n >= limit:
                    if not start:
                        start = now()
                    r = self.tick(start, j, Phase.PARK, state)
                    if r == Wait.STOP:
                        stopped = True
                        break
                    if r == Wait.FENCED:
                        break
                    # GIVE_UP: a live requester still holds its request: keep waiting
            if stopped:
                break
        if dl:
            dl()
        # P2
        t = now()
        if self.rec_resume is not None and not stopped:
            rel = 0
            for j in self.live_sibs:
                x = w[self.s_release[j]]
                if x > rel:
                    rel = x
            if rel > t_park:
                self.rec_resume(t - rel)
        dom = self.dom
        self._set(ASI if dom else IDLE, dom)
        w[self.i_phase] = Phase.MAIN

    # -- requester side ------------------------------------------------------------------
    def start(self) -> None:
        """After the start barrier (every sibling's pid is known): bind the IPI delivery."""
        self._deliver = self._make_deliver()

    def _make_deliver(self) -> Callable[[], None] | None:
        t = self.cfg.transport
        if t == "spin":
            return None
        c_ipis = self.cnt + COUNTER["ipis"]
        w = self.w
        if t == "signal":
            kill, sig = os.kill, signal.SIGUSR1
            pids = {j: w[self.s_pid[j]] for j in self.sibs}

            def deliver() -> None:
                for j in self.live_sibs:
                    try:
                        kill(pids[j], sig)
                    except ProcessLookupError:
                        pass
                w[c_ipis] += len(self.live_sibs)
        else:
            posts = {j: self.region.semaphore(f"wake{self.slot_of[j]}").release
                     for j in self.sibs}

            def deliver() -> None:
                for j in self.live_sibs:
                    posts[j]()
                w[c_ipis] += len(self.live_sibs)
        return deliver

    def request(self) -> bool:
        """R1 and R2: ask every sibling to park; strict waits for every ack (acking others'
        requests meanwhile). False when the request was given up (released unused) or the
        run is stopping; the caller must then not enter HOST."""
        w = self.w
        g = self.g + 1
        self.g = g
        w[self.i_gen] = g                                        # R1
        deliver = self._deliver
        if deliver is not None:
            deliver()
        if not self.strict:
            return True
        return self.wait_acks()

    def wait_acks(self) -> bool:
        """R2 (strict): wait until every live sibling acknowledged this CPU's generation,
        acknowledging the siblings' own requests meanwhile (so two requesters that wait at
        the same time both get through). False: given up and released, or stopping."""
        w, g = self.w, self.g
        dl = self.dl
        acked, limit = self.acked, self.limit
        live = self.live_sibs
        if len(live) == 1 and dl is None:
            # One sibling, no injected delays: the benchmark's fast path of R2.
            j = live[0]
            ia, gk = self.s_ack_me[j], self.s_gen[j]
            n = 0
            while w[ia] != g:
                x = w[gk]
                if x & 1 and x != acked[j]:
                    self.ack_pending()
                n += 1
                if n >= limit:
                    break                    # slow: the general loop below takes over
            else:
                return True
        if dl:
            dl()
        for j in list(live):                                   # R2
            ia = self.s_ack_me[j]
            others = [(k, self.s_gen[k]) for k in live]
            n = 0
            start = 0
            state = [0]
            while w[ia] != g:
                for k, gk in others:             # a sibling's own request: ack it at once
                    x = w[gk]
                    if x & 1 and x != acked[k]:
                        self.ack_pending()
                        break
                n += 1
                if n >= limit:
                    if not start:
                        start = now()
                    r = self.tick(start, j, Phase.REQUEST, state)
                    if r == Wait.FENCED:
                        break
                    if r != Wait.GO_ON:
                        self._abort(r)
                        return False
            if start:
                w[self.i_phase] = Phase.MAIN
        return True

    def _abort(self, why: Wait) -> None:
        if why == Wait.GIVE_UP:
            self.count("aborts")
            self.ring.emit(EventKind.ABORT, Source.LIVENESS, -1, Phase.REQUEST, 0, 0)
        self.release()

    def enter_host(self) -> None:
        """R3."""
        w = self.w
        self._set(HOST, self.dom)
        w[self.i_host_ns] = now()
        w[self.i_host_gen] = self.g
        w[self.cnt + C_HOST_ENTRIES] += 1
        if self.checker is not None:
            self.checker.host_entry()

    def set_domain(self, dom: int) -> None:
        """R4: only in HOST (schedule() picks another vCPU, or idles with dom 0)."""
        assert self.mode == HOST, self.mode
        self._set(HOST, dom)

    def leave_host(self) -> None:
        """R5: asi_enter."""
        self._set(ASI if self.dom else IDLE, self.dom)

    def flush(self) -> None:
        """R6: flush the core buffer: record every lane's deposits as seen now. This is the
        bookkeeping of the flush only; the cache-evicting work of a real L1D flush is the
        ASI model's (asirt.uarch.CoreBuffer.flush), done here too when the leak hook is one."""
        if not self.flush_on:
            return
        w = self.w
        for j in range(self.nlanes):
            marks, deps = self.my_marks[j], self.dep_of[j]
            for k in range(self.classes):
                w[marks[k]] = w[deps[k]]
        if self._hook_flush is not None:
            self._hook_flush()
        w[self.cnt + C_FLUSHES] += 1

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
        w[self.cnt + C_REQUESTS] += 1      # counted here, off the round trip's timed path

    def _exposure(self, t: int, g: int) -> None:
        """Naive: for each sibling, how long this CPU was in HOST before the sibling parked
        (the whole HOST period when it never did)."""
        w = self.w
        if w[self.i_host_gen] != g:
            return                       # never entered HOST with this request
        host = w[self.i_host_ns]
        exposed = 0
        for j in self.live_sibs:
            if w[self.s_ack_me[j]] == g:
                window = w[self.s_park[j]] - host
            else:
                window = t - host
            if window > 0:
                exposed = 1
            if self.rec_exposure is not None:
                self.rec_exposure(window if window > 0 else 0)
        if exposed:
            w[self.cnt + COUNTER["exposed"]] += 1

    def sensitive(self, work: Callable[[], None] | None = None, new_dom: int | None = None) -> bool:
        """A whole sensitive section: R1-R7. False if the request was given up."""
        dl = self.dl
        if not self.request():
            return False
        if dl:
            dl()
        self.enter_host()
        if dl:
            dl()
        if work is not None:
            work()
        if new_dom is not None and new_dom != self.dom:
            self.set_domain(new_dom)
            if dl:
                dl()
        self.leave_host()
        if dl:
            dl()
        self.flush()
        if dl:
            dl()
        self.release()
        return True

    # -- guest ---------------------------------------------------------------------------
    def guest_poll(self, until: Callable[[], bool], check_every: int = 256) -> bool:
        """Run guest code in GUEST, polling the siblings' generations at every safe point
        (the spin and sem transports). True if a stun request parked the CPU (it is then in
        ASI), False when ``until()`` (asked every ``check_every`` polls) said stop (it is
        still in GUEST)."""
        w = self.w
        yield_too = self.cfg.oversubscribed
        sched_yield = os.sched_yield
        live = self.live_sibs
        n = 0
        if len(live) == 1 and self.dl is None:
            # One sibling, no injected delays (the benchmark): H2 and H3 inline, since the
            # steps between seeing the request and acking it are the round trip.
            j = live[0]
            gi, ia = self.s_gen[j], self.my_ack_of[j]
            im, imode, ipark = self.i_mseq, self.i_mode, self.i_park
            acked, naive = self.acked, not self.strict
            s0 = w[gi]
            while True:
                g = w[gi]
                if g != s0:
                    if g & 1 and g != acked[j]:
                        s = self.mseq + 1
                        w[im] = s                           # H2
                        w[imode] = STUNNED
                        if naive:
                            w[ipark] = now()
                        w[ia] = g                           # H3
                        w[im] = s + 1
                        acked[j] = g
                        self._parked(s + 1, 1)
                        return True
                    s0 = g
                n += 1
                if n >= check_every:
                    n = 0
                    if until():
                        return False
                    if yield_too:
                        sched_yield()
        gens = [self.s_gen[j] for j in live]
        seen = [w[i] for i in gens]
        while True:
            for k, gi in enumerate(gens):
                if w[gi] != seen[k]:
                    if self.safe_point():
                        return True
                    seen = [w[i] for i in gens]
                    break
            n += 1
            if n >= check_every:
                n = 0
                if until():
                    return False
                if yield_too:
                    sched_yield()

    def guest_busy(self, until: Callable[[], bool], check_every: int = 256) -> bool:
        """A guest that never polls (the signal transport): only the SIGUSR1 handler stops it.
        Same return value as :meth:`guest_poll`."""
        self.interrupted = False
        self.steady = True
        # A signal that arrived before ``steady`` was set found the CPU mid-transition and
        # left it alone: this safe point picks its request up.
        if self.pending():
            self.steady = False
            if self.safe_point():
                return True
            self.steady = True
        n = 0
        yield_too = self.cfg.oversubscribed
        sched_yield = os.sched_yield
        while not self.interrupted:
            n += 1
            if n >= check_every:
                n = 0
                if until():
                    break
                if yield_too:
                    sched_yield()
        self.steady = False
        return self.interrupted

    def enter_guest(self) -> int:
        """B4 (after a barrier said yes). Returns the clock read just after the mode store,
        before the transition-time assertion runs: where the barrier's wait ends (the
        assertion's own cost is counted apart, in ``check_ns``)."""
        self._set(GUEST, self.dom)
        t = now()
        self.w[self.cnt + C_GUEST_ENTRIES] += 1
        if self.checker is not None:
            self.checker.guest_entry()
        return t

    def exit_guest(self) -> None:
        """An ordinary VM exit: GUEST -> ASI."""
        if self.checker is not None:
            self.checker.guest_exit()
        self._set(ASI, self.dom)

    def buffer_dirty(self, d: int) -> tuple[int, int] | None:
        """(lane, class) of the first deposit in the core buffer that domain d may not see
        (host data, or another domain's), or None when it is clean for d."""
        w = self.w
        fenced = self.fenced_mask
        for j, k, di, marks in self.buf_cells:
            if k == d:
                continue
            v = w[di]
            if v == 0:
                continue
            if v & 1:
                if not fenced >> j & 1:
                    return (j, k)
                continue
            for i in marks:
                if w[i] >= v:
                    break
            else:
                if not fenced >> j & 1:
                    return (j, k)
        return None

    def sample_leaks(self) -> int:
        """Checker (c): while in GUEST(d), look at the core buffer; count what d may not see."""
        d = self.dom
        found = 0
        dirty = self.buffer_dirty(d)
        if dirty is not None and self.sibling_counts(dirty[0]):
            found += 1
            self.ring.emit(EventKind.LEAK, Source.BUFFER, self.slot_of[dirty[0]], dirty[0],
                           dirty[1], d)
        hook = self.leak_hook
        if hook is not None:
            tokens = hook.leaks(d)
            if tokens:
                found += len(tokens)
                self.ring.emit(EventKind.LEAK, Source.BUFFER, -1, -1, tokens[0], d)
        if found:
            self.w[self.cnt + COUNTER["leaks"]] += found
        return found

    # -- the end of a run ----------------------------------------------------------------
    def finish(self) -> None:
        """Leave the core cleanly (through HOST to IDLE) and keep answering requests until
        every live sibling has finished too, so no sibling waits on one that has left.
        Unfinished siblings that die or stop meanwhile are fenced off (liveness check every
        ack timeout); returns at once when the run is stopping."""
        w = self.w
        if self.mode != IDLE and not w[STOP_WORD]:
            self.sensitive(None, 0)
        w[self.i_phase] = Phase.FINISHED
        self.publish_progress()
        s_phase = self.s_phase
        next_check = now() + self.cfg.ack_timeout_ns
        while not w[STOP_WORD]:
            w[self.i_phase] = Phase.FINISHED       # a park on the way resets it
            waiting = [j for j in self.live_sibs if w[s_phase[j]] != Phase.FINISHED]
            if not waiting:
                return
            if self.mode == IDLE:
                self.idle_wait(1_000_000)
            else:
                self.safe_point()
                time.sleep(0.0005)
            if now() > next_check:
                next_check = now() + self.cfg.ack_timeout_ns
                for j in waiting:
                    life = liveness(w[self.s_pid[j]])
                    if life != "alive":
                        self.ring.emit(EventKind.TIMEOUT, Source.LIVENESS, self.slot_of[j],
                                       Phase.FINISHED, 0, 1)
                        self.fence(j, life)

    # -- idle ----------------------------------------------------------------------------
    def idle_wait(self, timeout_ns: int) -> None:
        """Sleep as an idle CPU (mode IDLE) for up to timeout_ns, acking requests (H1)."""
        assert self.mode == IDLE, self.mode
        t = self.cfg.transport
        self.ack_pending()
        if t == "sem":
            if self._wake is None:
                self._wake = self.region.semaphore(f"wake{self.slot}")
            try:
                sem_wait(self._wake, timeout_ns / 1e9)
            except posix_ipc.BusyError:
                pass
            self.ack_pending()
        elif t == "signal":
            self.steady = True
            self.ack_pending()              # what came before ``steady`` was set
            time.sleep(timeout_ns / 1e9)    # SIGUSR1 interrupts it; the handler acks
            self.steady = False
            self.ack_pending()
        else:
            end = now() + timeout_ns
            w, limit = self.w, self.limit
            n = 0
            while now() < end and not w[STOP_WORD]:
                if self.pending():
                    self.ack_pending()
                n += 1
                if n >= limit:
                    os.sched_yield()

    # -- signal transport ----------------------------------------------------------------
    def install_signal_handler(self) -> None:
        def on_ipi(signum: int, frame: object) -> None:
            if not self.steady:
                return          # mid-transition: the interrupted code reaches a safe point
            self.steady = False
            if self.mode == IDLE:
                self.ack_pending()
                self.steady = True
            elif self.mode == GUEST:
                if self.safe_point():
                    self.interrupted = True
                else:
                    self.steady = True
            else:
                self.steady = True

        signal.signal(signal.SIGUSR1, on_ipi)
