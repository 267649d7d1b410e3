"""A vCPU under the sibling-stun handshake: ``python -m workers --role stun``.

The loop of one CPU (asirt.stun has the steps and their labels)::

    GUEST --exit--> ASI(d) --+--> restricted handling (no stun) --> barrier --> GUEST
                             +--> sensitive: stun siblings -> HOST -> flush -> release
                                  (maybe to another domain, or to IDLE)

with the VM-entry barrier before every GUEST and a safe point (ack / park for pending
requests) at the top of every step. ``params["mode"]`` picks the program:

``bench``   the siblings of a core take turns (time slices of ``slice_ms``) as the requester;
            the others sit in GUEST (``spin``: polling at safe points; ``signal``: a busy guest
            the SIGUSR1 handler interrupts and parks) or IDLE (``sem``: blocked on the
            semaphore, woken, ack, asleep again). Records ``stun_roundtrip`` (request -> the
            requester may enter HOST, for both protocols: strict once every sibling parked and
            acked, naive once the IPIs are sent), ``unstun_resume`` (release -> parked sibling
            back in ASI), ``barrier_wait`` and, naive, ``exposure_window``.
``stress``  a seeded random walk over the same transitions with injected sleeps/yields at every
            step, ``transitions`` of them (or until stopped); optional injected delay fault.
``coresched`` user-level core scheduling alone: each CPU runs tasks of cookies drawn from
            ``cookies`` (shown as GUEST(cookie), so the monitor checks S2 on them), admitted by
            asirt.coresched.CoreSched (forced idle measured in ``forced_idle``) -- or, with
            ``enforce`` false, not admitted at all (the broken variant the monitor must catch).

Common params: ``protocol``, ``transport``, ``lanes`` (slots of this core, lane order), ``core``,
``barrier`` (spin|rendezvous), ``oversubscribed``, ``ack_timeout_ms``, ``give_up_ms``,
``check``, ``check_fence``, ``classes``.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Callable

from asirt.barrier import Result, make_barrier
from asirt.clock import now
from asirt.histogram import recorder
from asirt.stun import ASI, GUEST, IDLE, StunConfig, StunCpu
from shm_layout.header import START_NS_WORD, STOP_WORD
from workers.context import WorkerContext

_STATE: dict[str, Any] = {}
GUEST_CHECK_EVERY = 256        # guest polls between clock reads (bench)
PROGRESS_EVERY = 64            # transitions between progress publications (stress)


def make_delay(rng: random.Random, p_yield: float, p_sleep: float,
               max_sleep_us: float) -> Callable[[], None]:
    """The injected delay: at each protocol step, maybe yield the CPU, maybe sleep a while."""
    r, sleep, sched_yield = rng.random, time.sleep, os.sched_yield
    max_sleep = max_sleep_us / 1e6
    edge = p_sleep + p_yield

    def delay() -> None:
        x = r()
        if x < p_sleep:
            sleep(r() * max_sleep)
        elif x < edge:
            sched_yield()
    return delay


def config(p: dict[str, Any]) -> StunConfig:
    return StunConfig(
        protocol=p.get("protocol", "strict"), transport=p.get("transport", "spin"),
        oversubscribed=bool(p.get("oversubscribed", False)),
        ack_timeout_ns=int(p.get("ack_timeout_ms", 50) * 1e6),
        give_up_ns=int(p.get("give_up_ms", 5000) * 1e6),
        check=bool(p.get("check", True)), check_fence=bool(p.get("check_fence", False)),
        classes=int(p.get("classes", 3)))


def prepare(ctx: WorkerContext) -> None:
    """Before READY: build this CPU's handle; the signal target installs its handler now so
    that no early IPI is lost (SIGUSR1's default action would kill the process)."""
    p = ctx.params
    cfg = config(p)
    mode = p.get("mode", "bench")
    delay = None
    rng = random.Random(p.get("seed", 0) * 1000003 + ctx.slot)
    if mode in ("stress", "coresched") and p.get("delays", True):
        delay = make_delay(rng, p.get("p_yield", 0.2), p.get("p_sleep", 0.01),
                           p.get("max_sleep_us", 100.0))
    if mode == "bench":
        dom, m = (0, IDLE) if cfg.transport == "sem" else (1, ASI)
    else:
        dom, m = 0, IDLE
    cpu = StunCpu(ctx.region, ctx.slot, list(p["lanes"]), cfg, delay=delay, domain=dom, mode=m)
    if cfg.transport == "signal":
        cpu.install_signal_handler()
    _STATE.update(cpu=cpu, rng=rng)


def run(ctx: WorkerContext) -> None:
    cpu: StunCpu = _STATE["cpu"]
    p = ctx.params
    barrier = make_barrier(p.get("barrier", "spin"), cpu, p["core"])
    cpu.start()
    try:
        mode = p.get("mode", "bench")
        if mode == "bench":
            _bench(ctx, cpu, barrier)
        elif mode == "coresched":
            _coresched(ctx, cpu, _STATE["rng"])
        else:
            _stress(ctx, cpu, barrier, _STATE["rng"])
    finally:
        cpu.steady = False
        cpu.publish_progress()


# -- bench ---------------------------------------------------------------------------------

def _bench(ctx: WorkerContext, cpu: StunCpu, barrier: Any) -> None:
    p = ctx.params
    w = ctx.words
    rec_rt = recorder(w, ctx.hist_base("stun_roundtrip"))
    cpu.rec_resume = recorder(w, ctx.hist_base("unstun_resume"))
    barrier.rec = recorder(w, ctx.hist_base("barrier_wait"))
    if cpu.cfg.protocol == "naive":
        cpu.rec_exposure = recorder(w, ctx.hist_base("exposure_window"))
    slice_ns = int(p.get("slice_ms", 20) * 1e6)
    gap_ns = int(p.get("gap_us", 2000) * 1e3)
    start = w[START_NS_WORD]
    n, lane = cpu.nlanes, cpu.lane
    transport = cpu.cfg.transport
    guest = cpu.guest_busy if transport == "signal" else cpu.guest_poll
    samples_i = ctx.slot_word(ctx.slot, "samples")
    samples = 0

    def my_turn() -> bool:
        return (now() - start) // slice_ns % n == lane

    def turn_or_stop() -> bool:
        return w[STOP_WORD] != 0 or (now() - start) // slice_ns % n == lane

    while not w[STOP_WORD]:
        if my_turn():
            cpu.safe_point()
            # request -> may enter HOST, the same end for both protocols: strict has every
            # ack by then, naive has only sent the IPIs (its exposure_window shows the rest)
            t0 = now()
            ok = cpu.request()
            t1 = now()
            if not ok:
                continue
            cpu.enter_host()
            rec_rt(t1 - t0)                   # after HOST: naive's exposure starts unbiased
            cpu.leave_host()
            cpu.flush()
            cpu.release()
            samples += 1
            if transport == "sem":
                continue     # idle requester, idle siblings: idle -> request -> HOST -> idle
            # Let the siblings get back into GUEST before the next request: a round trip
            # measures a guest being stunned, not a sibling caught half-way through resuming.
            if barrier.enter(gap_ns) == Result.OK:
                deadline = now() + gap_ns
                guest(lambda: w[STOP_WORD] != 0 or now() > deadline or
                      all(w[cpu.s_mode[j]] == GUEST for j in cpu.live_sibs))
                if cpu.mode == GUEST:
                    cpu.exit_guest()
            if samples % 64 == 0:
                w[samples_i] = samples
                cpu.publish_progress()
        elif transport == "sem":
            cpu.idle_wait(1_000_000)
        else:
            r = barrier.enter(slice_ns)
            if r == Result.OK:
                if not guest(turn_or_stop):
                    cpu.exit_guest()
            elif r == Result.STOP:
                break
    w[samples_i] = samples


# -- stress --------------------------------------------------------------------------------

def _stress(ctx: WorkerContext, cpu: StunCpu, barrier: Any, rng: random.Random) -> None:
    p = ctx.params
    w = ctx.words
    target = int(p.get("transitions", 0)) or (1 << 62)
    ndom = int(p.get("ndomains", 2))
    transport = cpu.cfg.transport
    guest = cpu.guest_busy if transport == "signal" else cpu.guest_poll
    rand, randrange = rng.random, rng.randrange
    fault = p.get("fault_delay")            # {"at": sensitive section k, "seconds": s}
    fault_at = int(fault["at"]) if fault else -1
    fault_s = float(fault["seconds"]) if fault else 0.0
    nsensitive = 0
    if "barrier_wait" in ctx.metric_names:
        barrier.rec = recorder(w, ctx.hist_base("barrier_wait"))
    samples_i = ctx.slot_word(ctx.slot, "samples")
    sample_every = int(p.get("leak_sample_every", 4))
    guests = 0
    next_progress = PROGRESS_EVERY

    def host_work() -> None:
        nonlocal nsensitive
        nsensitive += 1
        if nsensitive == fault_at:
            time.sleep(fault_s)           # the injected delay fault: stuck in HOST

    def sensitive(new_dom: int | None) -> None:
        cpu.sensitive(host_work, new_dom)

    while not w[STOP_WORD] and cpu.ntrans < target:
        cpu.safe_point()
        if cpu.ntrans >= next_progress:
            next_progress = cpu.ntrans + PROGRESS_EVERY
            cpu.publish_progress()
        if cpu.mode == IDLE:
            if rand() < 0.5:
                cpu.idle_wait(randrange(20_000, 200_000))
            else:
                sensitive(1 + randrange(ndom))        # schedule a vCPU in: through HOST
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

                if guests % sample_every == 0:
                    cpu.sample_leaks()
                parked = guest(done, check_every=min(polls, GUEST_CHECK_EVERY))
                if not parked and cpu.mode == GUEST:
                    if guests % sample_every == 0:
                        cpu.sample_leaks()
                    if cpu.dl:
                        cpu.dl()
                    cpu.exit_guest()
            elif r == Result.DOMAIN:
                # sync to the siblings' domain (kernel core scheduling at VM entry), mostly
                other = [w[cpu.s_dom[j]] for j in cpu.live_sibs if w[cpu.s_dom[j]]]
                if other and rand() < 0.8:
                    sensitive(other[0])
                else:
                    sensitive(randrange(ndom + 1))
            elif r == Result.STOP:
                break
        elif x < 0.75:
            y = rand()
            new = None if y < 0.6 else 0 if y < 0.7 else 1 + randrange(ndom)
            sensitive(new)
        else:
            # ASI: an exit handled in the restricted address space, no stun
            if cpu.dl:
                cpu.dl()
    w[samples_i] = cpu.ntrans
    cpu.dl = None
    cpu.finish()
    w[samples_i] = cpu.ntrans


# -- user-level core scheduling ----------------------------------------------------------------

def _coresched(ctx: WorkerContext, cpu: StunCpu, rng: random.Random) -> None:
    from asirt.coresched import CoreSched
    p = ctx.params
    w = ctx.words
    cookies = list(p["cookies"])
    enforce = bool(p.get("enforce", True))
    cs = CoreSched(cpu, p["core"], int(p.get("patience_us", 2000) * 1000),
                   recorder(w, ctx.hist_base("forced_idle")) if "forced_idle" in ctx.metric_names
                   else None)
    samples_i = ctx.slot_word(ctx.slot, "samples")
    tasks = 0
    dl = cpu.dl
    while not w[STOP_WORD]:
        cookie = rng.choice(cookies)
        if enforce and not cs.run_task(cookie, 50_000_000):
            continue
        cpu._set(GUEST, cookie)               # running a task of this cookie
        if cpu.checker is not None:
            cpu.checker.guest_exit()          # S1/S2 against the siblings, now
        for _ in range(rng.randrange(1, 50)):
            if dl:
                dl()
            if enforce and cs.should_yield():
                break
        cpu._set(IDLE, 0)
        if enforce:
            cs.stop_task()
        tasks += 1
        if tasks % 64 == 0:
            w[samples_i] = tasks
            cpu.publish_progress()
    w[samples_i] = tasks
