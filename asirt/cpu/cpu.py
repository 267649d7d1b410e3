"""One pinned CPU: its handle on the region, its view of its core's siblings, and fencing.

A :class:`Cpu` is what every mechanism (ASI, the stun handshake, barriers, core scheduling,
the vCPU loop) takes: it owns the CPU's published words through :class:`asirt.cpu.state.State`
(the only writer of the mode word), its lane of the one core buffer, its event ring and
counters, its :class:`asirt.cpu.wait.Waiter`, its :class:`asirt.cpu.safepoint.SafePoint` and
its IPI transport. Mechanisms plug into it; they never write each other's words.

Fencing: a sibling that does not answer a wait past the ack timeout and is found dead is
*fenced off* -- its lane is set in this CPU's published ``fenced`` mask and ignored by every
wait from then on. One found stopped (SIGSTOP) at two liveness checks in a row is killed
first (STONITH: it must never resume in a stale mode), and fenced only once it is really dead;
so is one whose published words are corrupt (asirt.cpu.guard: its state cannot be read).
A stopped sibling seen once may be a Ctrl-Z of the whole run on its way back (SIGCONT reaches
the siblings one by one), and a traced one (a debugger) is never killed. Fencing taints this
CPU: the dead lane's last period may still be in the core buffer, and this CPU's next VM entry
must flush it (asirt.cpu.state).
"""
from __future__ import annotations

import os
from typing import Callable

from asirt.clock import now
from asirt.cpu.buffer import CoreBuffer
from asirt.cpu.checks import EventRing, TransitionChecker
from asirt.cpu.guard import NO_LIMIT, Guard
from asirt.cpu.safepoint import SafePoint
from asirt.cpu.state import State
from asirt.cpu.transport import Transport
from asirt.cpu.wait import Waiter
from asirt.params import CpuParams
from asirt.proc import Life, Proc
from shm_layout import Region
from shm_layout.counters import COUNTER
from shm_layout.cpu import MAX_DOMAINS, EventKind, Source, Word
from shm_layout.header import STOP_WORD
from shm_layout.sections import Mode

__all__ = ["Cpu", "Delay"]

Delay = Callable[[], None]
#: a liveness answer of "alive" is reused this long by counts() (a /proc read costs ~7 us)
ALIVE_FOR_NS = 1_000_000
#: how long a fencer waits for a killed sibling to be really dead before fencing it
DEATH_WAIT_S = 1.0


class Cpu:
    """The CPU of slot ``slot`` (see the module docstring)."""

    def __init__(self, region: Region, slot: int, params: CpuParams | None = None,
                 delay: Delay | None = None, mode: int = 0, domain: int = 0) -> None:
        self.region, self.slot = region, slot
        self.params = params = params or CpuParams()
        self.w = w = region.words
        wi = region.word_index
        self.core = core = w[wi("cpu_state", slot, "core")]
        self.lane = lane = w[wi("cpu_state", slot, "lane")]
        if core < 0:
            raise ValueError(f"slot {slot} belongs to no core (asirt.cpu.setup was not run)")
        rec = region.array("cores")[core]
        self.slot_of = [int(s) for s in rec["cpus"][:int(rec["nsiblings"])]]
        if self.slot_of[lane] != slot:
            raise ValueError(f"slot {slot} is not lane {lane} of core {core}: {self.slot_of}")
        self.nlanes = n = len(self.slot_of)
        self.sibs = [j for j in range(n) if j != lane]
        self.dl = delay
        # every lane's published words (index = lane)
        self.s_mode = [wi("slots", s, "mode") for s in self.slot_of]
        self.s_dom = [wi("slots", s, "domain") for s in self.slot_of]
        self.s_pid = [wi("slots", s, "pid") for s in self.slot_of]
        self.s_mseq = [wi("cpu_state", s, "mseq") for s in self.slot_of]
        self.s_fenced = [wi("cpu_state", s, "fenced") for s in self.slot_of]
        self.s_phase = [wi("cpu_state", s, "phase") for s in self.slot_of]
        # my own
        self.i_fenced, self.i_phase = self.s_fenced[lane], self.s_phase[lane]
        self.i_heartbeat = wi("cpu_state", slot, "heartbeat_ns")
        self.i_progress = wi("slots", slot, "progress")
        self.cnt = wi("cpu_state", slot, "counters")
        self.i_alive_waits = wi("cpu_state", slot, "alive_waits")
        self.fenced_mask = w[self.i_fenced]
        self.live = [j for j in self.sibs if not self.fenced_mask >> j & 1]
        self.procs: list[Proc | None] = [None] * n
        self._alive_at = [-ALIVE_FOR_NS] * n
        self._stopped_once = [False] * n
        self.events = EventRing(region, slot)
        self.buffer = CoreBuffer(region, core, lane)
        self.waiter = Waiter(self)
        self.safepoint = SafePoint()
        self.checker = TransitionChecker(self) if params.check else None
        self.state = State(self, mode, domain)
        self.transport = Transport(self, params.transport)
        self.guard = guard = Guard(self)
        state = self.state
        for which, lanes, hi, wrote in (
                (Word.MODE, self.s_mode, max(Mode), lambda: state.mode),
                (Word.DOMAIN, self.s_dom, MAX_DOMAINS, lambda: state.dom),
                (Word.MSEQ, self.s_mseq, NO_LIMIT, lambda: state.mseq),
                (Word.FENCED, self.s_fenced, (1 << n) - 1, lambda: self.fenced_mask)):
            guard.declare(which, lanes, 0, hi)
            guard.mine(which, lanes[lane], wrote)

    def start(self) -> None:
        """After the start barrier (every sibling's pid is published): follow each sibling's
        process by pidfd, and bind the IPI delivery to them."""
        for j in self.sibs:
            if self.procs[j] is None:
                self.procs[j] = Proc(self.w[self.s_pid[j]])
        self.transport.bind()

    def close(self) -> None:
        for p in self.procs:
            if p is not None:
                p.close()

    # -- counters and progress -------------------------------------------------------------
    def c(self, name: str) -> int:
        """Word index of this CPU's counter ``name`` (shm_layout.counters)."""
        return self.cnt + COUNTER[name]

    def count(self, name: str, k: int = 1) -> None:
        self.w[self.cnt + COUNTER[name]] += k

    def publish_progress(self) -> None:
        w = self.w
        w[self.i_progress] = self.state.ntrans
        w[self.cnt + COUNTER["cpu.transitions"]] = self.state.ntrans
        w[self.i_heartbeat] = now()

    def stopping(self) -> bool:
        return self.w[STOP_WORD] != 0

    # -- siblings' liveness ------------------------------------------------------------------
    def life(self, j: int) -> Life:
        p = self.procs[j]
        if p is None:
            p = self.procs[j] = Proc(self.w[self.s_pid[j]])
        return p.life()

    def fenced_any(self) -> int:
        """Lanes fenced off by any CPU of this core (every lane's published mask, or-ed). A
        mask that names lanes the core does not have is garbage and ignored: trusted, it would
        take every lane out of every check (asirt.cpu.guard finds it)."""
        w, mask, full = self.w, 0, (1 << self.nlanes) - 1
        for i in self.s_fenced:
            m = w[i]
            if 0 <= m <= full:
                mask |= m
        return mask

    def counts(self, j: int) -> bool:
        """Whether lane j still takes part (a violation involving it is real): no CPU of the
        core fenced it off, and its process lives. Asked only when a checker found something,
        but under a broken protocol that is often, so an "alive" answer is reused for
        ALIVE_FOR_NS; a sibling that died within that window may be counted once more (its
        mode was real until it died)."""
        if j == self.lane:
            return True
        if self.fenced_any() >> j & 1:
            return False
        t = now()
        if t - self._alive_at[j] < ALIVE_FOR_NS:
            return True
        if self.life(j) is Life.DEAD:
            return False
        self._alive_at[j] = t
        return True

    def check_liveness(self, j: int, phase: int) -> bool:
        """A wait for lane j ran past the ack timeout: fence it if it is dead (or stayed
        stopped since the last check: killed first). True when it was fenced."""
        life = self.life(j)
        if life is Life.STOPPED and not self._stopped_once[j]:
            self._stopped_once[j] = True        # seen once: maybe a Ctrl-Z coming back
            life = Life.ALIVE
        elif life is not Life.STOPPED:
            self._stopped_once[j] = False
        if life is Life.ALIVE or life is Life.TRACED:
            return False
        self.fence(j, life)
        return bool(self.fenced_mask >> j & 1)

    def corrupt(self, j: int, which: Word, value: int) -> bool:
        """Lane j publishes ``value`` in ``which``, which its writer never writes: report it
        and fence the lane off, killing it first (its state cannot be read: it must not run
        beside a guest). True once fenced."""
        self.guard.report(self.slot_of[j], which, value)
        self.fence(j, Life.ALIVE, corrupt=True)
        return bool(self.fenced_mask >> j & 1)

    def fence(self, j: int, life: Life, corrupt: bool = False) -> None:
        """Fence lane j off: never wait for it again, ignore it in every check. A stopped or
        ``corrupt`` one is killed and fenced once it is dead (never while it could still
        run)."""
        if self.fenced_mask >> j & 1:
            return
        proc = self.procs[j] or Proc(self.w[self.s_pid[j]])
        self.procs[j] = proc
        kind = EventKind.FENCE_DEAD
        if life is not Life.DEAD:
            if not self.params.stonith:
                return
            kind = EventKind.FENCE_CORRUPT if corrupt else EventKind.FENCE_STOPPED
            proc.kill()
            if not proc.wait_dead(DEATH_WAIT_S):
                return                      # not dead yet (D state?): the next check retries
        self.fenced_mask |= 1 << j
        self.w[self.i_fenced] = self.fenced_mask
        self.live = [k for k in self.live if k != j]
        self.count("cpu.fenced")
        self.state.taint_fenced()
        self.events.emit(kind, Source.LIVENESS, self.slot_of[j], self.w[self.i_phase], 0,
                         proc.pid)

    # -- idle ------------------------------------------------------------------------------
    def idle_wait(self, timeout_ns: int) -> None:
        """Sleep as an idle CPU for up to ``timeout_ns``, answering requests as they come."""
        self.transport.idle_wait(timeout_ns)

    def sched_yield(self) -> None:
        os.sched_yield()
