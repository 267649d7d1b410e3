"""Core scheduling: cookies with PR_SCHED_CORE semantics, force idle, kernel core scheduling.

Four pieces:

- :class:`CookieTable` -- the emulated ``prctl(PR_SCHED_CORE, ...)``: per-task cookies with the
  kernel's commands (GET, CREATE, SHARE_TO, SHARE_FROM), scopes (thread, thread group,
  process group) and errors (EINVAL, ESRCH), following kernel/sched/core_sched.c
  (``sched_core_share_pid``). Cookie 0 is the untagged, trusted host: untagged tasks may share
  a core with each other, never with a tagged task; the idle task shares with anything.
- :class:`CoreSched` -- one CPU's side of core-wide task selection over its core's
  lock-protected record (``core_sync``: ``cs_cookie``, ``cs_running``): a CPU may run a task of
  cookie c only while every sibling running a task runs one of cookie c; otherwise it is
  *forced idle* until they stop, and the forced-idle time is measured. A CPU forced idle for
  longer than its patience claims the core next (``cs_want``): running siblings see it in
  :meth:`CoreSched.answer` at their next safe point (the CPU's one safe point: every wait
  loop calls it), and no new task of another cookie is admitted meanwhile, so no cookie
  starves.
- :class:`KernelCoreSched` -- kernel core scheduling (the LKML proposal) on top of the stun
  handshake: the task keeps its cookie in non-sensitive kernel code (ASI, no stun), drops to
  the host cookie before sensitive code -- which forces every sibling of another cookie idle,
  i.e. exactly a stun -- and syncs the siblings to one cookie at VM entry (the barrier's B3).
- :func:`probe` and :class:`RealCoreSched` -- the real ``prctl(PR_SCHED_CORE)`` through ctypes,
  for the worker processes themselves where the kernel has CONFIG_SCHED_CORE and SMT. It
  fails with EINVAL when the kernel lacks CONFIG_SCHED_CORE (the option is unknown) and ENODEV
  when the machine has no SMT; both are reported as "not supported, continuing emulated".
  The workers always schedule with the emulated :class:`CoreSched`; :func:`backend_report`
  says so in result.json, next to whether this kernel could do it.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from asirt.clock import now
from asirt.cpu import Cpu
from asirt.cpu.wait import Outcome, Wait
from asirt.errors import FeatureMissing
from asirt.sync.barrier import Result, SpinBarrier, RendezvousBarrier
from asirt.sync.corelock import CoreLock
from asirt.sync.stun import Stun
from shm_layout.cpu import Phase

__all__ = ["PR_SCHED_CORE", "PR_SCHED_CORE_GET", "PR_SCHED_CORE_CREATE",
           "PR_SCHED_CORE_SHARE_TO", "PR_SCHED_CORE_SHARE_FROM", "SCOPE_THREAD",
           "SCOPE_THREAD_GROUP", "SCOPE_PROCESS_GROUP", "HOST_COOKIE", "cookies_match",
           "Task", "CookieTable", "CoreSched", "KernelCoreSched", "KernelSupport", "probe",
           "RealCoreSched", "backend_report"]

# <linux/prctl.h>
PR_SCHED_CORE = 62
PR_SCHED_CORE_GET = 0
PR_SCHED_CORE_CREATE = 1
PR_SCHED_CORE_SHARE_TO = 2
PR_SCHED_CORE_SHARE_FROM = 3
_PR_SCHED_CORE_MAX = 4
SCOPE_THREAD = 0            # PIDTYPE_PID
SCOPE_THREAD_GROUP = 1      # PIDTYPE_TGID
SCOPE_PROCESS_GROUP = 2     # PIDTYPE_PGID
HOST_COOKIE = 0


def cookies_match(a: int, b: int) -> bool:
    """Whether tasks of cookies a and b may run on sibling CPUs at the same time."""
    return a == b


# -- the emulated prctl ----------------------------------------------------------------------

@dataclass
class Task:
    tid: int
    tgid: int
    pgid: int
    cookie: int = HOST_COOKIE


@dataclass
class CookieTable:
    """Per-task cookies with PR_SCHED_CORE semantics (module docstring). Errors are OSErrors
    with the kernel's errno. ``pid`` 0 means the calling task (``current``)."""
    tasks: dict[int, Task] = field(default_factory=dict)
    _next: Callable[[], int] = field(default_factory=lambda: itertools.count(1).__next__)

    def add(self, tid: int, tgid: int | None = None, pgid: int | None = None) -> Task:
        t = Task(tid, tid if tgid is None else tgid, tid if pgid is None else pgid)
        self.tasks[tid] = t
        return t

    def _task(self, pid: int, current: int) -> Task:
        tid = current if pid == 0 else pid
        try:
            return self.tasks[tid]
        except KeyError:
            raise OSError(_errno.ESRCH, f"no task {tid}") from None

    def _scope(self, task: Task, scope: int) -> list[Task]:
        if scope == SCOPE_THREAD:
            return [task]
        if scope == SCOPE_THREAD_GROUP:
            return [t for t in self.tasks.values() if t.tgid == task.tgid]
        return [t for t in self.tasks.values() if t.pgid == task.pgid]

    def prctl(self, cmd: int, pid: int, scope: int, current: int) -> int:
        """``prctl(PR_SCHED_CORE, cmd, pid, scope, ...)`` as ``current``; GET returns the cookie."""
        if not 0 <= scope <= SCOPE_PROCESS_GROUP or not 0 <= cmd < _PR_SCHED_CORE_MAX or pid < 0:
            raise OSError(_errno.EINVAL, f"PR_SCHED_CORE cmd {cmd} scope {scope} pid {pid}")
        task = self._task(pid, current)
        if cmd == PR_SCHED_CORE_GET:
            if scope != SCOPE_THREAD:
                raise OSError(_errno.EINVAL, "PR_SCHED_CORE_GET takes the thread scope only")
            return task.cookie
        if cmd == PR_SCHED_CORE_SHARE_FROM:
            if scope != SCOPE_THREAD:
                raise OSError(_errno.EINVAL, "PR_SCHED_CORE_SHARE_FROM takes the thread scope only")
            self._task(0, current).cookie = task.cookie
            return 0
        cookie = self._next() if cmd == PR_SCHED_CORE_CREATE else self._task(0, current).cookie
        for t in self._scope(task, scope):
            t.cookie = cookie
        return 0

    def create(self, pid: int, scope: int = SCOPE_THREAD, current: int = 0) -> int:
        """A new cookie for the task(s); returns it."""
        self.prctl(PR_SCHED_CORE_CREATE, pid, scope, current or pid)
        return self.get(pid, current or pid)

    def share_to(self, pid: int, scope: int = SCOPE_THREAD, *, current: int) -> None:
        self.prctl(PR_SCHED_CORE_SHARE_TO, pid, scope, current)

    def share_from(self, pid: int, *, current: int) -> None:
        self.prctl(PR_SCHED_CORE_SHARE_FROM, pid, SCOPE_THREAD, current)

    def get(self, pid: int, current: int = 0) -> int:
        return self.prctl(PR_SCHED_CORE_GET, pid, SCOPE_THREAD, current or pid)


# -- core-wide selection with force idle -------------------------------------------------------

class CoreSched:
    """One CPU's side of core scheduling on its core (module docstring)."""

    def __init__(self, cpu: Cpu, lock: CoreLock, patience_ns: int = 2_000_000,
                 rec_forced: Callable[[int], None] | None = None) -> None:
        self.cpu, self.lock = cpu, lock
        wi = cpu.region.word_index
        core = cpu.core
        self.i_cookie = wi("core_sync", core, "cs_cookie")
        self.i_running = wi("core_sync", core, "cs_running")
        self.i_seq = wi("core_sync", core, "cs_seq")
        self.i_want = wi("core_sync", core, "cs_want")
        self.i_switches = wi("core_sync", core, "cs_switches")
        self.i_want_lane = wi("core_sync", core, "cs_want_lane")
        self.i_mine = wi("core_sync", core, "cookie") + cpu.lane
        self.bit = 1 << cpu.lane
        self.patience_ns = patience_ns
        self.rec_forced = rec_forced
        self.cookie: int | None = None
        #: a sibling forced idle past its patience wants the core: leave it (see answer)
        self.yield_now = False
        # forced idle behind one sibling in many short waits, each bounded by a tick (shorter
        # than the ack timeout; runs of its cookie between them do not clear the suspicion: a
        # dead sibling's task blocks every other cookie for good): one Wait for them all, so
        # that their sum reaches the waiter's liveness check -- until the core record shows
        # that sibling's task stopped (it is alive: run_task drops the Wait)
        self.blocked: Wait | None = None
        self.c_tasks = cpu.c("coresched.tasks")
        self.c_forced, self.c_forced_ns = cpu.c("coresched.forced_idle"), cpu.c(
            "coresched.forced_idle_ns")
        cpu.safepoint.register(self.answer)

    def answer(self) -> bool:
        """The safe point's core-scheduling answer: True (leave what you run) when a sibling
        forced idle past its patience wants the core for another cookie."""
        if self.cookie is None or self.yield_now:
            return False
        want = self.cpu.w[self.i_want]
        if want != 0 and want != self.cookie + 1:
            self.yield_now = True
            return True
        return False

    def run_task(self, cookie: int, max_wait_ns: int | None = None) -> bool:
        """Start running a task of ``cookie`` here; forced idle (measured) while a sibling runs
        another cookie. False when the run stops or ``max_wait_ns`` passes first (0: one try,
        no wait). A claim on the core (``cs_want``) is stored as cookie + 1, so that the host
        cookie 0 can claim it too (0 there means: no claim)."""
        cpu, w = self.cpu, self.cpu.w
        t0 = now()
        deadline = None if max_wait_ns is None else t0 + max_wait_ns
        mine = cookie + 1
        forced = False
        while True:
            if self.lock.acquire(deadline) != Outcome.DONE:
                return False
            running = w[self.i_running] & ~self.bit
            core_cookie, want = w[self.i_cookie], w[self.i_want]
            b = self.blocked
            if b is not None and (b.lane < 0 or not running >> b.lane & 1):
                self.blocked = None         # it stopped its task: alive, the suspicion ends
            if (running == 0 or core_cookie == cookie) and (want == 0 or want == mine):
                if core_cookie != cookie:
                    w[self.i_switches] += 1
                w[self.i_cookie] = cookie
                w[self.i_running] = running | self.bit
                if want == mine:
                    w[self.i_want] = 0
                w[self.i_seq] += 1
                self.lock.release()
                w[self.i_mine] = cookie
                self.cookie, self.yield_now = cookie, False
                w[self.c_tasks] += 1
                if forced:
                    t = now() - t0
                    w[self.c_forced] += 1
                    w[self.c_forced_ns] += t
                    if self.rec_forced is not None:
                        self.rec_forced(t)
                return True
            t = now()
            if deadline is not None and t >= deadline:
                self.lock.release()
                self._drop_claim(mine)
                return False
            if t - t0 > self.patience_ns and want == 0:
                w[self.i_want] = mine             # claim the core next
                w[self.i_want_lane] = cpu.lane
                w[self.i_seq] += 1
            seq = w[self.i_seq]
            claim_at = (t0 + self.patience_ns) if w[self.i_want] == 0 else None
            self.lock.release()
            forced = True
            if not self._wait_change(seq, running, deadline, claim_at):
                self._drop_claim(mine)
                return False

    def _drop_claim(self, mine: int) -> None:
        """Giving up: a claim of ours on the core goes with us."""
        w = self.cpu.w
        if w[self.i_want] == mine and self.lock.acquire() == Outcome.DONE:
            if w[self.i_want] == mine:
                w[self.i_want] = 0
                w[self.i_seq] += 1
            self.lock.release()

    def _wait_change(self, seq: int, running: int, deadline: int | None,
                     claim_at: int | None) -> bool:
        """Forced idle: wait for the core record to change (or, at ``claim_at``, go back to
        claim the core), answering at the safe point meanwhile; a running sibling that died is
        fenced off and removed from the record. False: stop, or the deadline passed."""
        cpu, w = self.cpu, self.cpu.w
        # whom we wait for: a running sibling, or (the core empty) the one that claimed it
        j = (running & -running).bit_length() - 1 if running else w[self.i_want_lane]
        lane = -1 if j == cpu.lane else j
        wait = self.blocked
        if wait is None or wait.lane != lane:
            wait = self.blocked = cpu.waiter.begin(lane, Phase.CORESCHED, deadline)
        else:
            wait.deadline = deadline
            if wait.start:                 # waiting again: where it waits shows again
                w[cpu.i_phase] = Phase.CORESCHED
        n, limit = 0, cpu.waiter.limit
        try:
            while w[self.i_seq] == seq:
                cpu.safepoint()
                n += 1
                if n < limit and (deadline is None or n & 63 or now() < deadline):
                    continue
                r = wait.slow()                    # first: it may find j dead (the claim
                if r in (Outcome.STOP, Outcome.DEADLINE):   # would end every slice before it)
                    return False
                if r == Outcome.FENCED:
                    self._remove(j)
                    return True
                if claim_at is not None and now() > claim_at:
                    return True
            return True
        finally:
            wait.done()

    def _remove(self, j: int) -> None:
        """Lane j is fenced off: out of the core's record (its task and its claim)."""
        w = self.cpu.w
        if self.lock.acquire(None) == Outcome.DONE:
            w[self.i_running] &= ~(1 << j)
            if w[self.i_want] and w[self.i_want_lane] == j:
                w[self.i_want] = 0
            w[self.i_seq] += 1
            self.lock.release()
        self.blocked = None

    def stop_task(self) -> None:
        w = self.cpu.w
        if self.cookie is None:
            return
        if self.lock.acquire(None) == Outcome.DONE:
            w[self.i_running] &= ~self.bit
            w[self.i_seq] += 1
            self.lock.release()
        w[self.i_mine] = HOST_COOKIE
        self.cookie = None


# -- kernel core scheduling --------------------------------------------------------------------

class KernelCoreSched:
    """kcs on one CPU: cookie = the vCPU's domain in non-sensitive kernel code and in the
    guest; the host cookie (0) in sensitive code. Dropping to the host cookie forces every
    sibling that runs another cookie idle -- the stun handshake (strict: they are parked
    before this CPU proceeds). At VM entry the siblings are synced to one cookie: the
    VM-entry barrier refuses entry beside another domain (B3)."""

    def __init__(self, stun: Stun, barrier: SpinBarrier | RendezvousBarrier) -> None:
        self.stun, self.barrier = stun, barrier
        cpu = stun.cpu
        self.w = cpu.w
        self.i_cookie = cpu.region.word_index("core_sync", cpu.core, "cookie") + cpu.lane

    def vm_entry(self, max_wait_ns: int | None = None) -> Result:
        self.w[self.i_cookie] = self.stun.cpu.state.dom
        return self.barrier.enter(max_wait_ns)

    def vm_exit(self) -> None:
        """To non-sensitive kernel code: the cookie is kept."""
        self.stun.cpu.state.exit_guest()

    def sensitive(self, work: Callable[[], None] | None = None, new_dom: int | None = None) -> bool:
        """Untag, run sensitive code with the siblings forced idle, re-tag."""
        self.w[self.i_cookie] = HOST_COOKIE
        ok = self.stun.sensitive(work, new_dom)
        self.w[self.i_cookie] = self.stun.cpu.state.dom
        return ok


# -- the real prctl ------------------------------------------------------------------------------

class KernelSupport(NamedTuple):
    supported: bool
    errno: int | None
    message: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(cmd: int, pid: int, scope: int, cookie: ctypes.c_uint64 | None) -> None:
    libc = _libc()
    arg5 = ctypes.c_void_p(ctypes.addressof(cookie)) if cookie is not None else ctypes.c_void_p(0)
    res = libc.prctl(ctypes.c_int(PR_SCHED_CORE), ctypes.c_ulong(cmd), ctypes.c_ulong(pid),
                     ctypes.c_ulong(scope), arg5)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unsupported(err: int) -> str:
    if err == _errno.EINVAL:
        why = "EINVAL: this kernel has no PR_SCHED_CORE (built without CONFIG_SCHED_CORE)"
    elif err == _errno.ENODEV:
        why = "ENODEV: core scheduling needs SMT, and this machine has none enabled"
    else:
        why = f"{_errno.errorcode.get(err, err)}: {os.strerror(err)}"
    return f"prctl(PR_SCHED_CORE) not supported ({why}); continuing emulated"


def probe() -> KernelSupport:
    """Ask the kernel for this process's cookie: supported, or why not (EINVAL/ENODEV/...)."""
    cookie = ctypes.c_uint64(0)
    try:
        _prctl(PR_SCHED_CORE_GET, os.getpid(), SCOPE_THREAD, cookie)
    except OSError as err:
        return KernelSupport(False, err.errno, _unsupported(err.errno or 0))
    return KernelSupport(True, None, f"prctl(PR_SCHED_CORE) supported (this process's cookie "
                                     f"is {cookie.value:#x})")


class RealCoreSched:
    """The kernel's own core scheduling, for real tasks (the worker processes). Construction
    fails with FeatureMissing, carrying the probe's message, where the kernel cannot do it."""

    def __init__(self) -> None:
        support = probe()
        if not support.supported:
            raise FeatureMissing("kernel core scheduling", support.message,
                                 "the emulated core scheduling (asirt.sync.coresched.CoreSched) is used")
        self.support = support

    @staticmethod
    def get(pid: int = 0) -> int:
        cookie = ctypes.c_uint64(0)
        _prctl(PR_SCHED_CORE_GET, pid, SCOPE_THREAD, cookie)
        return cookie.value

    @staticmethod
    def create(pid: int = 0, scope: int = SCOPE_THREAD_GROUP) -> None:
        _prctl(PR_SCHED_CORE_CREATE, pid, scope, None)

    @staticmethod
    def share_to(pid: int, scope: int = SCOPE_THREAD_GROUP) -> None:
        _prctl(PR_SCHED_CORE_SHARE_TO, pid, scope, None)

    @staticmethod
    def share_from(pid: int) -> None:
        _prctl(PR_SCHED_CORE_SHARE_FROM, pid, SCOPE_THREAD, None)


def backend_report() -> dict[str, str]:
    """What result.json says about core scheduling: ``backend`` is what the workers use --
    always the emulated :class:`CoreSched` -- and ``kernel_core_sched`` whether this kernel
    could do it ("supported" or "not supported"), with the probe's reason in ``note``."""
    support = probe()
    return {"backend": "emulated",
            "kernel_core_sched": "supported" if support.supported else "not supported",
            "note": support.message}

