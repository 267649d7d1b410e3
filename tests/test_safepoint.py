"""The one safe point: every mechanism's waits answer every other mechanism's requests, so no
wait of one stalls another (a CPU spinning in a TLB shootdown still parks for a stun request;
a CPU parked by the stun still flushes its TLB for a shootdown)."""
from __future__ import annotations

import time

from asirt.cpu import ASI, STUNNED
from asirt.cpu.safepoint import SafePoint
from asirt.mm.asi import Asi
from asirt.mm.spaces import AddressSpaces, AsiClassId
from asirt.mm.memclass import MemClass
from asirt.sync.stun import Stun
from tests.fixtures import Background, counter, cpu_region, make_cpus, mode_of, wait_until


def test_answerers_run_once_each_and_are_never_reentered():
    sp = SafePoint()
    calls = []

    def first() -> bool:
        calls.append("first")
        sp()                               # a nested safe point skips the running answerer
        return False

    def second() -> bool:
        calls.append("second")
        return True
    sp.register(first)
    sp.register(second)
    assert sp() is True
    assert calls == ["first", "second", "second"]
    calls.clear()
    assert sp.others(0) is True and calls == ["second"]


class Lane:
    """One in-process CPU with the stun handshake and ASI plugged into it."""

    def __init__(self, region, cpu, inst: int) -> None:
        self.cpu = cpu
        self.stun = Stun(cpu)
        self.asi = Asi(region, cpu)
        self.asi.online()
        self.asi.asi_enter(inst)

    def close(self) -> None:
        self.asi.close()


def _core_of_three():
    """Three lanes inside one VM's ASI instance, and one local page of that VM."""
    r_ctx = cpu_region(3, asi=True)
    r = r_ctx.__enter__()
    kernel = AddressSpaces(r)
    inst = kernel.asi_init(1, AsiClassId.KVM)
    page = kernel.alloc_page(MemClass.LOCAL, 1)
    kernel.close()
    lanes = [Lane(r, c, inst) for c in make_cpus(r, 3)]
    for lane in lanes:
        lane.asi.access(page)              # every lane's TLB holds the page
    return r_ctx, lanes, inst, page


def test_a_cpu_waiting_in_a_shootdown_answers_a_stun_request():
    """b unmaps a page while c, inside the instance, does not answer for a while; meanwhile a
    requests a stun. b must ack (park) from inside its shootdown wait: a's request completes
    while b's unmap is still waiting for c."""
    r_ctx, (a, b, c), inst, page = _core_of_three()
    try:
        unmap = Background(lambda: b.asi.unmap_restricted(inst, page))
        wait_until(lambda: counter(b.cpu, "asi.shootdowns_sent") >= 1, "b's shootdown sent")
        req = Background(a.stun.request)
        # c acks a's request (it is a stun too) but does not flush its TLB yet
        wait_until(c.stun.pending, "a's request pending at c")
        c.stun.ack_pending()
        assert req.result(timeout=10) is True, "b did not ack from inside its shootdown wait"
        assert not unmap.done, "b's shootdown should still wait for c"
        assert mode_of(b.cpu) == STUNNED
        a.stun.enter_host()
        a.stun.leave_host()
        a.stun.unstun()
        a.cpu.safepoint()                  # a (inside too) answers at its next safe point,
        c.asi.service()                    # and c answers the shootdown at last
        unmap.result(timeout=10)
        assert mode_of(b.cpu) == ASI and counter(b.cpu, "stun.parks") == 1
    finally:
        for lane in (a, b, c):
            lane.close()
        r_ctx.__exit__(None, None, None)


def test_a_parked_cpu_answers_a_shootdown():
    """a holds a stun request in HOST (b parked, c acked); the kernel unmaps a page every lane
    uses. b, parked, must flush its TLB from its park loop: the unmap returns while a still
    holds its request and b is still STUNNED."""
    r_ctx, (a, b, c), inst, page = _core_of_three()
    r = a.cpu.region
    try:
        a.stun.g += 1
        a.stun.w[a.stun.i_gen] = a.stun.g      # R1: a's request is active
        parked = Background(b.cpu.safepoint)   # b parks (STUNNED) until a releases
        wait_until(lambda: mode_of(b.cpu) == STUNNED, "b parked")
        c.stun.ack_pending()                   # c acks (it keeps answering below)
        assert a.stun.wait_acks() is True
        a.stun.enter_host()
        done = []

        def answering(lane) -> None:           # a in HOST and c in ASI, at their safe points
            while not done:
                lane.cpu.safepoint()
                time.sleep(0.0005)
        others = [Background(lambda lane=lane: answering(lane)) for lane in (a, c)]
        kernel = AddressSpaces(r)
        t0 = time.monotonic()
        kernel.unmap_restricted(inst, page)    # every lane inside must flush, b included
        assert time.monotonic() - t0 < 10
        kernel.close()
        done.append(True)
        for o in others:
            o.result()
        assert not parked.done and mode_of(b.cpu) == STUNNED
        a.stun.leave_host()
        a.stun.unstun()
        assert parked.result(timeout=10) is True
        assert counter(b.cpu, "asi.tlb_flushes") >= 1 and mode_of(b.cpu) == ASI
    finally:
        for lane in (a, b, c):
            lane.close()
        r_ctx.__exit__(None, None, None)
