"""A seeded random walk over the handshake's transitions: ``python -m workers --role stress``.

The loop of one CPU (asirt.sync.stun has the steps and their labels)::

    GUEST --exit--> ASI(d) --+--> restricted handling (no stun) --> barrier --> GUEST
                             +--> sensitive: stun siblings -> HOST -> flush -> release
                                  (maybe to another domain, or to IDLE)

with the VM-entry barrier before every GUEST, a safe point at the top of every step, injected
sleeps and yields at every protocol step (``delays``), the guest sampling the core buffer every
``leak_sample_every`` entries, the optional delay fault (a sleep inside HOST), and at every
step the audit of its own published words (asirt.cpu.guard). It runs ``transitions``
transitions (or until stopped), then leaves the core cleanly.
"""
from __future__ import annotations

import time
from typing import Callable

from asirt.cpu import GUEST, IDLE, Cpu
from asirt.cpu.checks import sample_leaks
from asirt.params import StressParams
from asirt.sync.barrier import Result
from asirt.sync.guest import GUEST_CHECK_EVERY, guest_busy, guest_poll
from asirt.sync.stun import Stun
from shm_layout.header import STOP_WORD
from workers.context import WorkerContext, make_delay

PARAMS = StressParams
PROGRESS_EVERY = 64            # transitions between progress publications


def prepare(ctx: WorkerContext) -> Stun:
    p: StressParams = ctx.params
    delay = make_delay(ctx.rng(p.seed), p.delays) if p.delays is not None else None
    return ctx.make_stun(p.cpu, p.protocol, delay)


def run(ctx: WorkerContext, stun: Stun) -> None:
    with ctx.running(stun, ctx.params.barrier) as barrier:
        _walk(ctx, stun, barrier)


def _walk(ctx: WorkerContext, stun: Stun, barrier) -> None:
    p: StressParams = ctx.params
    cpu = stun.cpu
    w = ctx.words
    rng = ctx.rng(p.seed + 1)
    target = p.transitions or (1 << 62)
    ndom = p.ndomains
    guest = guest_busy if p.cpu.transport == "signal" else guest_poll
    rand, randrange = rng.random, rng.randrange
    state = cpu.state
    samples_i = ctx.slot_word(ctx.slot, "samples")
    guests = 0
    next_progress = PROGRESS_EVERY

    host_work = delay_trigger(cpu, p.fault_delay_at, p.fault_delay_s)

    audit = cpu.guard.audit
    while not w[STOP_WORD] and state.ntrans < target:
        audit()                  # its own words still hold what it wrote (asirt.cpu.guard)
        cpu.safepoint()
        if state.ntrans >= next_progress:
            next_progress = state.ntrans + PROGRESS_EVERY
            cpu.publish_progress()
        if state.mode == IDLE:
            if rand() < 0.5:
                cpu.idle_wait(randrange(20_000, 200_000))
            else:
                stun.sensitive(host_work, 1 + randrange(ndom))   # schedule a vCPU in: via HOST
            continue
        x = rand()
        if x < 0.5:
            r = barrier.enter(50_000_000)
            if r == Result.OK:
                guests += 1
                polls = randrange(1, 400)
                left = [polls // GUEST_CHECK_EVERY + 1]

                def done() -> bool:
                    left[0] -= 1
                    return left[0] <= 0 or w[STOP_WORD] != 0

                sample = guests % p.leak_sample_every == 0
                if sample:
                    sample_leaks(cpu)
                parked = guest(stun, done, min(polls, GUEST_CHECK_EVERY))
                if not parked and state.mode == GUEST:
                    if sample:
                        sample_leaks(cpu)
                    if cpu.dl:
                        cpu.dl()
                    state.exit_guest()
            elif r == Result.DOMAIN:
                # sync to the siblings' domain (kernel core scheduling at VM entry), mostly
                other = [x for x in (w[cpu.s_dom[j]] for j in cpu.live) if 0 < x <= ndom]
                if other and rand() < 0.8:
                    stun.sensitive(host_work, other[0])
                else:
                    stun.sensitive(host_work, randrange(ndom + 1))
            elif r == Result.STOP:
                break
        elif x < 0.75:
            y = rand()
            new = None if y < 0.6 else 0 if y < 0.7 else 1 + randrange(ndom)
            stun.sensitive(host_work, new)
        elif cpu.dl:
            cpu.dl()          # an exit handled in the restricted address space: no stun
    w[samples_i] = state.ntrans
    cpu.dl = None
    stun.finish()
    w[samples_i] = state.ntrans


def delay_trigger(cpu: Cpu, at: int, seconds: float) -> Callable[[], None]:
    """What runs inside HOST at every known sensitive access: the ``at``-th one is the delay
    fault (:func:`delay_fault`; none when ``seconds`` is 0)."""
    n = 0

    def in_host() -> None:
        nonlocal n
        n += 1
        if n == at and seconds:
            delay_fault(cpu, seconds)
    return in_host


def delay_fault(cpu: Cpu, seconds: float) -> None:
    """The injected delay fault: stuck in HOST for ``seconds``, alive. Counts, as this CPU's
    ``fault.delay_waits``, its siblings' liveness checks that found it alive meanwhile (their
    ``alive_waits`` of its lane, before and after): the waits this delay caused, and no other."""
    w, wi = cpu.w, cpu.region.word_index
    seen = [wi("cpu_state", cpu.slot_of[j], "alive_waits") + cpu.lane for j in cpu.sibs]
    before = sum(w[i] for i in seen)
    time.sleep(seconds)
    cpu.count("fault.delay_waits", sum(w[i] for i in seen) - before)
    cpu.count("fault.delays")
