"""The emulated guest's two ways of running: polling at safe points, or busy until interrupted.

A CPU in GUEST runs "guest code" for a while; a stun request must stop it. A real guest is
stopped by an IPI that forces a VM exit. The emulated guest either polls its siblings'
generations at every safe point of its loop (:func:`guest_poll`: the spin and sem transports)
or never polls and is stopped by the SIGUSR1 handler (:func:`guest_busy`: the signal
transport). Both return True when a stun request parked the CPU (it is then in ASI and must
run the VM-entry barrier again), False when ``until()`` said stop (it is still in GUEST).

A request that was already pending when the loop started is answered at once: the loop
reacts to *pending* (odd and not yet acked), as the model does, not to a change.
"""
from __future__ import annotations

import os
from typing import Callable

from asirt.sync.stun import Stun

__all__ = ["guest_poll", "guest_busy", "GUEST_CHECK_EVERY"]

#: guest polls between calls of ``until()`` (and of the CPU's other answerers)
GUEST_CHECK_EVERY = 256


def _checkpoint(stun: Stun, until: Callable[[], bool], yield_too: bool) -> Callable[[], bool | None]:
    """What the guest loop does every ``check_every`` polls: answer the CPU's other mechanisms
    and ask ``until()`` -- False: the slice ends (still in GUEST: the caller exits it), when
    ``until()`` says so or another mechanism wants the guest stopped (core scheduling's yield:
    only the stun parks a CPU, so only the stun's answer returns True) -- maybe yield (None:
    go on)."""
    sp, index = stun.cpu.safepoint, stun.index
    answer_others = len(sp) > 1
    sched_yield = os.sched_yield

    def checkpoint() -> bool | None:
        if answer_others and sp.others(index):
            return False
        if until():
            return False
        if yield_too:
            sched_yield()
        return None
    return checkpoint


def guest_poll(stun: Stun, until: Callable[[], bool], check_every: int = GUEST_CHECK_EVERY) -> bool:
    """Run guest code in GUEST, polling the siblings' generations at every safe point."""
    cpu = stun.cpu
    checkpoint = _checkpoint(stun, until, cpu.waiter.limit < check_every)
    live = cpu.live
    n = 0
    if len(live) == 1 and cpu.dl is None:
        # One sibling, no injected delays (the benchmark): the state writer's own wait, with
        # H2 and H3 written out, since the steps between seeing the request and acking it are
        # the round trip.
        j = live[0]
        r = cpu.state.poll_stun1(stun.s_gen[j], stun.my_ack_of[j], stun.acked, j, stun.park1,
                                 check_every, checkpoint)
        if r is True:
            stun.after_park(1)                       # P1, P2
        return bool(r)
    while True:
        if stun.answer():
            return True
        n += 1
        if n >= check_every:
            n = 0
            r = checkpoint()
            if r is not None:
                return r


def guest_busy(stun: Stun, until: Callable[[], bool], check_every: int = GUEST_CHECK_EVERY) -> bool:
    """A guest that never polls (the signal transport): only the SIGUSR1 handler, which runs
    the CPU's safe point, stops it."""
    cpu = stun.cpu
    tr = cpu.transport
    tr.interrupted = False
    tr.steady = True
    # A signal that arrived before ``steady`` was set found the CPU mid-transition and left it
    # alone: this safe point picks its request up.
    if stun.pending():
        tr.steady = False
        if cpu.safepoint():
            return True
        tr.steady = True
    n = 0
    checkpoint = _checkpoint(stun, until, cpu.waiter.limit < check_every)
    while not tr.interrupted:
        n += 1
        if n >= check_every:
            n = 0
            tr.steady = False            # the handler must not act while the others answer
            r = checkpoint()
            if r is None and stun.pending() and cpu.safepoint():
                r = True                 # an IPI that landed meanwhile found us unsteady
            if r is not None:
                return r
            tr.steady = True
    tr.steady = False
    return tr.interrupted
