"""The stun handshake benchmark on one pinned CPU: ``python -m workers --role stun``.

The siblings of a core take turns (time slices of ``slice_ms``) as the requester; the others
sit in GUEST (``spin``: polling at safe points; ``signal``: a busy guest the SIGUSR1 handler
interrupts and parks) or IDLE (``sem``: blocked on the semaphore, woken, ack, asleep again).
Records ``stun_roundtrip`` (request -> the requester may enter HOST, for both protocols:
strict once every sibling parked and acked, naive once the IPIs are sent), ``unstun_resume``
(release -> parked sibling back in ASI), ``barrier_wait`` and, naive, ``exposure_window``.
"""
from __future__ import annotations

from asirt.clock import now
from asirt.cpu import ASI, GUEST, IDLE
from asirt.params import StunBenchParams
from asirt.sync.barrier import Result
from asirt.sync.guest import guest_busy, guest_poll
from asirt.sync.stun import Stun
from shm_layout.header import START_NS_WORD, STOP_WORD
from workers.context import WorkerContext

PARAMS = StunBenchParams


def prepare(ctx: WorkerContext) -> Stun:
    p: StunBenchParams = ctx.params
    dom, mode = (0, IDLE) if p.cpu.transport == "sem" else (1, ASI)
    return ctx.make_stun(p.cpu, p.protocol, None, mode, dom)


def run(ctx: WorkerContext, stun: Stun) -> None:
    p: StunBenchParams = ctx.params
    stun.rec_resume = ctx.recorder("unstun_resume")
    if p.protocol == "naive":
        stun.rec_exposure = ctx.recorder("exposure_window")
    with ctx.running(stun, p.barrier) as barrier:
        _bench(ctx, stun, barrier)


def _bench(ctx: WorkerContext, stun: Stun, barrier) -> None:
    p: StunBenchParams = ctx.params
    cpu = stun.cpu
    w = ctx.words
    rec_rt = ctx.recorder("stun_roundtrip")
    slice_ns = int(p.slice_ms * 1e6)
    gap_ns = int(p.gap_us * 1e3)
    start = w[START_NS_WORD]
    n, lane = cpu.nlanes, cpu.lane
    transport = cpu.transport.kind
    guest = guest_busy if transport == "signal" else guest_poll
    samples_i = ctx.slot_word(ctx.slot, "samples")
    samples = 0

    def my_turn() -> bool:
        return (now() - start) // slice_ns % n == lane

    def turn_or_stop() -> bool:
        return w[STOP_WORD] != 0 or (now() - start) // slice_ns % n == lane

    # ``while True``, not ``while not w[STOP_WORD]``: CPython 3.11 specializes a function's
    # bytecode once it has been called, or has jumped back unconditionally, 8 times. This
    # function is called once, and a loop whose test sits at its bottom jumps back
    # conditionally: it would time every round trip through unspecialized calls and loads
    # (about 70 ns more; bench/ab_stun.sh shows it).
    while True:
        if w[STOP_WORD]:
            break
        if my_turn():
            cpu.safepoint()
            # request -> may enter HOST, the same end for both protocols: strict has every
            # ack by then, naive has only sent the IPIs (its exposure_window shows the rest)
            t0 = now()
            ok = stun.request()
            t1 = now()
            if not ok:
                continue
            stun.enter_host()
            rec_rt(t1 - t0)                   # after HOST: naive's exposure starts unbiased
            stun.leave_host()
            stun.unstun()
            samples += 1
            if transport == "sem":
                continue     # idle requester, idle siblings: idle -> request -> HOST -> idle
            # Let the siblings get back into GUEST before the next request: a round trip
            # measures a guest being stunned, not a sibling caught half-way through resuming.
            if barrier.enter(gap_ns) == Result.OK:
                deadline = now() + gap_ns
                guest(stun, lambda: w[STOP_WORD] != 0 or now() > deadline or
                      all(w[cpu.s_mode[j]] == GUEST for j in cpu.live))
                if cpu.state.mode == GUEST:
                    cpu.state.exit_guest()
            if samples % 64 == 0:
                w[samples_i] = samples
                cpu.publish_progress()
        elif transport == "sem":
            cpu.idle_wait(1_000_000)
        else:
            r = barrier.enter(slice_ns)
            if r == Result.OK:
                if not guest(stun, turn_or_stop):
                    cpu.state.exit_guest()
            elif r == Result.STOP:
                break
    w[samples_i] = samples
