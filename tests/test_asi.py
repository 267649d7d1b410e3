"""ASI: placement of memory classes, the subset invariant, instances, enter/exit with hooks
and taints (through the CPU's state writer), page fault and retry, interrupt nesting."""
from __future__ import annotations

import pickle
import signal
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asirt.mm.spaces
from asirt.cpu import IDLE as IDLE_MODE
from asirt.cpu import Taint
from asirt.cpu.buffer import Seen
from asirt.errors import AsirtError, BadInput
from asirt.mm.asi import Asi
from asirt.mm.spaces import AddressSpaces, DMAP_BASE, AsiClass, AsiClassId, AsiStateError, InvariantViolation, PageFault, default_classes, frame_va
from asirt.mm.memclass import DoubleFree, MappingRefused, MemClass, PoolExhausted, make_token
from asirt.mm.pagetable import PRESENT, make_pte, pte_frame
from shm_layout.asi import GLOBAL_OWNER, MAX_ASI
from shm_layout.cpu import MAX_DOMAINS, PERIOD_BIT, period_token
from shm_layout.sections import Mode
from tests.fixtures import asi_handles, counter, cpu_region, mode_of

KVM, KPTI, IDLE = AsiClassId.KVM, AsiClassId.KPTI, AsiClassId.IDLE



def untagged(seen: list[Seen]) -> list[Seen]:
    """Period tokens without their period's number (compare with period_token(d))."""
    return [Seen(x.lane, x.token & ~(PERIOD_BIT - 1) if x.token & PERIOD_BIT else x.token)
            for x in seen]

def _root(a: Asi, inst: int) -> int:
    return int(a.insts["root"][inst])


def _maps(a: Asi, inst: int, va: int) -> bool:
    return bool(a.pt.walk(_root(a, inst), va) & PRESENT)


def _published(a: Asi) -> tuple[int, int]:
    """The (mode, domain) a CPU publishes (what the checkers read), not its handle's copy."""
    return mode_of(a.cpu), a.cpu.w[a.cpu.state.i_dom]


def _token(a: Asi, va: int) -> int:
    """The token a load of ``va`` deposits."""
    pfn = pte_frame(a.pt.walk(a.full_root, va))
    return make_token(a.frames.cls_of(pfn), a.frames.owner_of(pfn), pfn)


# -- placement and the subset invariant ---------------------------------------------------
def test_each_class_lands_where_it_belongs(kernel):
    vm1, vm2 = kernel.asi_init(1, KVM), kernel.asi_init(2, KVM)
    k1, idle = kernel.asi_init(1, KPTI), kernel.asi_init(0, IDLE)
    g = kernel.alloc_page(MemClass.GLOBAL)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    l1 = kernel.alloc_page(MemClass.LOCAL, 1)
    for va in (g, s, l1):
        assert kernel.pt.walk(kernel.full_root, va) & PRESENT
    assert all(_maps(kernel, i, g) for i in (vm1, vm2, k1, idle))
    assert not any(_maps(kernel, i, s) for i in (vm1, vm2, k1, idle))
    assert [_maps(kernel, i, l1) for i in (vm1, vm2, k1, idle)] == [True, False, True, False]
    assert kernel.verify() == []
    # an instance created later gets what is already there
    late = kernel.asi_init(1, AsiClassId.KVM)
    assert late == vm1 and _maps(kernel, vm1, l1)


def test_small_objects_share_frames_only_within_class_and_owner(kernel):
    vm1, vm2 = kernel.asi_init(1, KVM), kernel.asi_init(2, KVM)
    a, b = kernel.alloc(100, MemClass.LOCAL, 1), kernel.alloc(100, MemClass.LOCAL, 1)
    c = kernel.alloc(100, MemClass.LOCAL, 2)
    page = ~(4096 - 1)
    assert a & page == b & page and b - a == 104           # 8-byte aligned, same frame
    assert c & page != a & page
    assert _maps(kernel, vm1, a & page) and not _maps(kernel, vm2, a & page)
    assert _maps(kernel, vm2, c & page) and kernel.verify() == []


def test_global_tables_are_shared_by_every_restricted_tree(kernel):
    a, b = kernel.asi_init(1, KVM), kernel.asi_init(2, KVM)
    kernel.alloc_page(MemClass.LOCAL, 1)
    kernel.alloc_page(MemClass.LOCAL, 2)
    ta, tb = kernel.pt.tables[_root(kernel, a)], kernel.pt.tables[_root(kernel, b)]
    assert ta[273] == tb[273] != 0
    assert 0 != ta[274] != tb[274] != 0           # each its own tables for local memory
    g = kernel.alloc_page(MemClass.GLOBAL)
    kernel.unmap_restricted(a, g)                 # a global page leaves every restricted tree
    assert not _maps(kernel, a, g) and not _maps(kernel, b, g)
    assert kernel.pt.walk(kernel.full_root, g) & PRESENT
    kernel.map_restricted(b, g)                   # ... and mapping it once brings it back to all
    assert _maps(kernel, a, g) and _maps(kernel, b, g)


def test_restricted_mapping_refusals_name_address_and_class(kernel):
    vm2 = kernel.asi_init(2, KVM)
    idle = kernel.asi_init(0, IDLE)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    l1 = kernel.alloc_page(MemClass.LOCAL, 1)
    before = kernel.pt.mappings(_root(kernel, vm2))
    with pytest.raises(MappingRefused, match=rf"{s:#x} .*class sensitive\) .* domain 2"):
        kernel.map_restricted(vm2, s)
    with pytest.raises(MappingRefused, match=r"class local\(1\).*local to domain 1"):
        kernel.map_restricted(vm2, l1)
    with pytest.raises(MappingRefused):
        kernel.map_restricted(idle, l1)
    assert kernel.pt.mappings(_root(kernel, vm2)) == before and kernel.verify() == []


def test_double_free_and_exhaustion_leave_the_region_consistent(kernel):
    kernel.asi_init(1, KVM)
    va = kernel.alloc_page(MemClass.LOCAL, 1)
    kernel.free_page(va)
    with pytest.raises(DoubleFree, match=f"page at {va:#x}"):
        kernel.free_page(va)
    vas = []
    with pytest.raises(PoolExhausted, match="frame pool"):
        while True:
            vas.append(kernel.alloc_page(MemClass.LOCAL, 1))
    assert len(vas) == kernel.frames.count and kernel.verify() == []
    for v in vas:
        kernel.free_page(v)
    assert (kernel.frames.arr["cls"] == 0).all() and kernel.verify() == []


def test_alloc_during_free_page_wait_uses_another_frame(kernel, monkeypatch):
    """free_page drops the lock for the shootdown wait: an alloc() then must not pack its
    object into the unmapped frame that is about to be freed under it."""
    vm = kernel.asi_init(1, KVM)
    page = kernel.alloc(100, MemClass.LOCAL, 1) & ~(4096 - 1)
    got = []
    real_wait = kernel.shootdowns.wait

    def wait(targets):
        got.append(kernel.alloc(100, MemClass.LOCAL, 1))   # another CPU, meanwhile
        real_wait(targets)

    monkeypatch.setattr(kernel.shootdowns, "wait", wait)
    kernel.free_page(page)
    (obj,) = got
    assert obj & ~(4096 - 1) != page
    assert kernel.pt.lookup(kernel.full_root, obj) & PRESENT and _maps(kernel, vm, obj)
    assert not kernel.pt.lookup(kernel.full_root, page) & PRESENT
    assert kernel.frames.cls_of(pte_frame(kernel.pt.lookup(kernel.full_root, obj))) \
        == MemClass.LOCAL and kernel.verify() == []


def test_table_exhaustion_mid_placement_rolls_back():
    with cpu_region(asi=True, frames=8, tables=8) as region:
        k = AddressSpaces(region)
        try:
            k.asi_init(1, KVM)
            k.asi_init(1, KPTI)
            assert k.pt.free_tables() == 3    # the full tree's path fits; the next tree's not
            with pytest.raises(PoolExhausted, match="page-table pool"):
                k.alloc_page(MemClass.LOCAL, 1)
            assert (k.frames.arr["cls"] == 0).all()
            assert k.pt.mappings(k.full_root) == {} and k.verify() == []
        finally:
            k.close()


def test_a_broken_mapping_routine_is_caught(kernel, monkeypatch):
    """The invariant check is what catches a mapping routine that skips the class rules or
    maps the wrong frame."""
    vm = kernel.asi_init(1, KVM)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    l1 = kernel.alloc_page(MemClass.LOCAL, 1)
    kernel.check()

    def skips_class_check(self, inst, va):
        with self.pt:
            pte = self.pt.lookup(self.full_root, va)
            self.pt.set_pte(self.template, va, pte, GLOBAL_OWNER)

    monkeypatch.setattr(AddressSpaces, "map_restricted", skips_class_check)
    kernel.map_restricted(vm, s)
    with pytest.raises(InvariantViolation, match="of class sensitive"):
        kernel.check()
    with kernel.pt:
        kernel.pt.clear_pte(kernel.template, s, GLOBAL_OWNER)
    kernel.check()

    def off_by_one(self, inst, va):
        with self.pt:
            self.pt.clear_pte(_root(self, inst), va, inst)
            pte = self.pt.lookup(self.full_root, va)
            self.pt.set_pte(_root(self, inst), va, make_pte(pte_frame(pte) + 1), inst)

    monkeypatch.setattr(AddressSpaces, "map_restricted", off_by_one)
    kernel.map_restricted(vm, l1)
    with pytest.raises(InvariantViolation, match="the full tree as") as err:
        kernel.check()
    assert err.value.exit_code == 1


_OPS = st.lists(st.tuples(
    st.sampled_from(["alloc", "free", "init", "destroy", "map", "unmap"]),
    st.sampled_from([(MemClass.SENSITIVE, 0), (MemClass.GLOBAL, 0), (MemClass.LOCAL, 1),
                     (MemClass.LOCAL, 2), (MemClass.SENSITIVE, 2)]),
    st.sampled_from([(1, KVM), (2, KVM), (1, KPTI), (0, IDLE)]),
    st.integers(0, 1000)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_invariants_hold_across_random_map_unmap_sequences(ops):
    """After every operation: each restricted mapping equals the full tree's and maps only
    global or own-domain local memory; no restricted walk reaches a sensitive frame."""
    with cpu_region(asi=True, frames=48, tables=96) as region:
        k = AddressSpaces(region)
        try:
            for domain, acls in ((1, KVM), (2, KVM), (0, IDLE)):
                k.asi_init(domain, acls)
            pages = [k.alloc_page(cls, owner) for cls, owner in (
                (MemClass.SENSITIVE, 0), (MemClass.GLOBAL, 0), (MemClass.LOCAL, 1),
                (MemClass.LOCAL, 2))]
            for op, (cls, owner), (domain, acls), n in ops:
                live = k._restricted()
                try:
                    if op == "alloc":
                        pages.append(k.alloc_page(cls, owner))
                    elif op == "free" and pages:
                        k.free_page(pages.pop(n % len(pages)))
                    elif op == "init":
                        k.asi_init(domain, acls)
                    elif op == "destroy" and live:
                        k.asi_destroy(live[n % len(live)])
                    elif op == "map" and live and pages:
                        k.map_restricted(live[n % len(live)], pages[n % len(pages)])
                    elif op == "unmap" and live and pages:
                        k.unmap_restricted(live[n % len(live)], pages[n % len(pages)])
                except MappingRefused as err:
                    assert err.cls == MemClass.SENSITIVE or err.owner != err.domain \
                        or int(k.insts["cls"][live[n % len(live)]]) == IDLE
                except PoolExhausted:
                    pass
                assert k.verify() == []
                _no_restricted_walk_reaches_sensitive(k)
        finally:
            k.close()


def _no_restricted_walk_reaches_sensitive(k: Asi) -> None:
    vas = list(k.pt.mappings(k.full_root))
    for inst in k._restricted():
        domain = int(k.insts["domain"][inst])
        for va in vas:
            e = k.pt.walk(_root(k, inst), va)
            if e:
                pfn = pte_frame(e)
                cls = k.frames.cls_of(pfn)
                assert cls == MemClass.GLOBAL or (cls == MemClass.LOCAL
                                                  and k.frames.owner_of(pfn) == domain)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(),
                          st.sampled_from([(MemClass.SENSITIVE, 0), (MemClass.GLOBAL, 0),
                                           (MemClass.LOCAL, 1), (MemClass.LOCAL, 2)]),
                          st.sampled_from([(1, KVM), (2, KVM), (2, KPTI), (0, IDLE)])),
                min_size=1, max_size=25))
def test_every_class_of_frame_lands_where_it_should(steps):
    """Whatever the order of allocations and instance creation, a frame is mapped in the
    full tree at its address, and in exactly the restricted trees its class belongs in."""
    with cpu_region(asi=True, frames=48, tables=96) as region:
        k = AddressSpaces(region)
        try:
            for alloc, (cls, owner), (domain, acls) in steps:
                try:
                    k.alloc_page(cls, owner) if alloc else k.asi_init(domain, acls)
                except PoolExhausted:
                    pass
            a = k.frames.arr
            for pfn in range(k.frames.count):
                cls, owner = int(a["cls"][pfn]), int(a["owner"][pfn])
                if cls == MemClass.FREE:
                    continue
                va = frame_va(pfn, cls)
                assert pte_frame(k.pt.walk(k.full_root, va)) == pfn
                for inst in k._restricted():
                    want = cls == MemClass.GLOBAL or (
                        cls == MemClass.LOCAL and owner == int(k.insts["domain"][inst])
                        and int(k.insts["cls"][inst]) != IDLE)
                    assert _maps(k, inst, va) == want, (pfn, cls, owner, inst)
        finally:
            k.close()


# -- instances ----------------------------------------------------------------------------
def test_instances_are_refcounted_per_domain_and_class(kernel, cpu0):
    a = kernel.asi_init(1, KVM)
    assert kernel.asi_init(1, KVM) == a and kernel.asi_init(1, KPTI) != a
    assert kernel.insts["refcount"][a] == 2
    cpu0.asi_enter(a)
    kernel.asi_destroy(a)                          # drops a reference only
    with pytest.raises(AsiStateError, match=r"CPU slots \[0\] are in it"):
        kernel.asi_destroy(a)
    cpu0.asi_exit()
    with pytest.raises(AsiStateError, match="target it"):
        kernel.asi_destroy(a)                      # still cpu0's target
    cpu0.asi_relinquish()
    free = kernel.pt.free_tables()
    kernel.asi_destroy(a)
    assert kernel.find(1, KVM) is None and kernel.pt.free_tables() > free
    with pytest.raises(AsiStateError, match="not a live ASI instance"):
        kernel.asi_destroy(a)
    with pytest.raises(AsiStateError, match="not live"):
        cpu0.asi_enter(a)
    assert cpu0.current == 0


def test_a_reused_instance_slot_is_a_new_life(kernel, cpu0):
    a = kernel.asi_init(1, KVM)
    cpu0.asi_enter(a)
    cpu0.asi_relinquish()
    kernel.asi_destroy(a)
    b = kernel.asi_init(2, KVM)
    assert b == a
    cpu0.asi_enter(b)                              # cached info of the old life is not used
    assert _published(cpu0) == (Mode.ASI, 2)


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "destroyed"])
def test_enter_during_destroy_waits_for_its_verdict(kernel, aregion, monkeypatch,
                                                     refused):
    """asi_destroy writes state 0 under the lock and restores it when refused: a CPU entering
    meanwhile must wait, and enter if the instance survives, not call it dead."""
    vm = kernel.asi_init(1, KVM)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c1.asi_enter(vm)
        c1.asi_relinquish()                        # c1 has the instance's entry cached
        if refused:
            c0.asi_enter(vm)                       # the destroy is refused: c0 is inside
        waiting, outcome = threading.Event(), []
        real_settled, real_fence = c1._settled, asirt.mm.spaces.fence

        def settled(inst, ib):
            waiting.set()                          # c1 saw state 0 mid-destroy
            return real_settled(inst, ib)

        def enter():
            try:
                c1.asi_enter(vm)
                outcome.append(c1.current)
            except AsiStateError as err:
                outcome.append(err)

        racer = threading.Thread(target=enter)

        def fence():                               # asi_destroy's, right after state = 0
            real_fence()
            if threading.current_thread() is threading.main_thread() and not racer.ident:
                racer.start()
                assert waiting.wait(10), "c1 never saw the destroy in progress"

        monkeypatch.setattr(c1, "_settled", settled)
        monkeypatch.setattr(asirt.mm.spaces, "fence", fence)
        try:
            if refused:
                with pytest.raises(AsiStateError, match=r"CPU slots \[0\] are in it"):
                    kernel.asi_destroy(vm)
            else:
                kernel.asi_destroy(vm)
        finally:
            if racer.ident:
                racer.join(30)
        assert not racer.is_alive()
        if refused:
            assert outcome == [vm] and c1.target == vm
        else:
            assert len(outcome) == 1 and "not live" in str(outcome[0]) and c1.current == 0
            assert kernel.find(1, KVM) is None


def test_bad_instance_requests(kernel):
    with pytest.raises(BadInput, match="idle"):
        kernel.asi_init(3, IDLE)
    with pytest.raises(BadInput, match="not registered"):
        kernel.asi_init(1, 42)


def test_instance_pool_exhaustion():
    """Instances are (domain, class) pairs, and domains are 1..MAX_DOMAINS (plus 0, the host):
    the default classes cannot make MAX_ASI - 1 distinct instances any more, so extra classes
    (copies of kpti) are registered to fill the pool with valid domains only."""
    extra = {k: AsiClass(AsiClassId.KPTI, 0, True) for k in range(4, 4 + 10)}
    with cpu_region(asi=True, tables=MAX_ASI + 8) as region:
        k = AddressSpaces(region, classes={**default_classes(), **extra})
        try:
            pairs = [(d, c) for c in extra for d in range(1, MAX_DOMAINS + 1)]
            assert len(pairs) >= MAX_ASI
            for d, c in pairs[:MAX_ASI - 1]:
                k.asi_init(d, c)
            free = k.pt.free_tables()
            d, c = pairs[MAX_ASI - 1]
            with pytest.raises(PoolExhausted, match="ASI instance pool"):
                k.asi_init(d, c)
            assert k.pt.free_tables() == free and k.find(d, c) is None
            assert (k.insts["refcount"][1:] == 1).all()
        finally:
            k.close()


# -- enter / exit, hooks, taints ----------------------------------------------------------
def test_enter_exit_track_current_target_mode_and_domain(kernel, cpu0):
    vm = kernel.asi_init(3, KVM)
    assert _published(cpu0) == (Mode.HOST, 0)      # online: in the unrestricted kernel
    cpu0.asi_enter(vm)
    assert (cpu0.current, cpu0.target, *_published(cpu0)) == (vm, vm, Mode.ASI, 3)
    assert cpu0.tlb.pcid == vm
    cpu0.asi_exit()
    # Changed by design: asi_exit goes to HOST through the CPU's state writer, which keeps the
    # vCPU's domain (it changes only in HOST, by State.set_domain), where it used to publish 0.
    assert (cpu0.current, cpu0.target, *_published(cpu0)) == (0, vm, Mode.HOST, 3)
    assert cpu0.tlb.pcid == 0
    assert (counter(cpu0.cpu, "asi.enters"), counter(cpu0.cpu, "asi.exits")) == (1, 1)
    cpu0.asi_relinquish()
    assert cpu0.target == 0
    with pytest.raises(AsiStateError):
        cpu0.asi_enter(0)


def test_asi_exit_asserts_s1_at_the_host_entry(kernel, aregion):
    """asi_exit enters HOST through the state writer, whose transition-time check looks for a
    sibling in GUEST (S1): none first, then one."""
    vm = kernel.asi_init(1, KVM)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c0.asi_enter(vm)
        checks = counter(c0.cpu, "check.checks")
        c0.asi_exit()
        assert counter(c0.cpu, "check.checks") == checks + 1
        assert counter(c0.cpu, "check.s1") == 0
        c0.asi_enter(vm)
        c1.asi_enter(vm)
        c1.cpu.state.enter_guest()                 # c1 runs domain 1's guest beside ASI(1) ...
        assert counter(c1.cpu, "check.s1") == 0
        c0.asi_exit()                              # ... and c0 enters HOST beside it
        assert counter(c0.cpu, "check.s1") == 1


def test_kvm_hooks_run_in_order(kernel, cpu0):
    """exit: the stun request runs before the CPU is in HOST mode; enter: the flush comes
    first, then the hook that releases the siblings."""
    vm = kernel.asi_init(1, KVM)
    events = []
    buf = cpu0.cpu.buffer

    def on_exit(asi, inst):
        events.append(("exit", inst, Mode(mode_of(asi.cpu)), asi.current))

    def on_enter(asi, inst):
        events.append(("enter", inst, Mode(mode_of(asi.cpu)), counter(asi.cpu, "asi.flushes"),
                       asi.state.taint, buf.leaks(1)))

    cpu0.set_hooks(KVM, on_enter=on_enter, on_exit=on_exit)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    cpu0.access(s)                                 # loads a secret: deposits, taints
    assert Seen(0, _token(kernel, s)) in buf.visible() and cpu0.state.taint & Taint.KERNEL
    cpu0.asi_enter(vm)
    cpu0.asi_exit()
    # The buffer is not empty at the enter hook: the ASI(1) period is open (domain 1's own data,
    # no leak for it); what it must not hold is anything domain 1 may not see.
    assert events == [("enter", vm, Mode.ASI, 1, 0, []), ("exit", vm, Mode.ASI, vm)]


def test_hooks_installed_while_inside_run_at_the_next_exit(kernel, cpu0):
    vm = kernel.asi_init(1, KVM)
    cpu0.asi_enter(vm)
    calls = []
    cpu0.set_hooks(KVM, on_enter=lambda a, i: calls.append("enter"),
                   on_exit=lambda a, i: calls.append("exit"))
    cpu0.asi_exit()
    cpu0.asi_enter(vm)
    assert calls == ["exit", "enter"]


def test_kpti_and_idle_hooks_are_noops_and_never_flush(kernel, cpu0):
    k, idle = kernel.asi_init(1, KPTI), kernel.asi_init(0, IDLE)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    for inst in (k, idle):
        cpu0.access(s)
        cpu0.asi_enter(inst)
        cpu0.asi_exit()
    assert counter(cpu0.cpu, "asi.flushes") == counter(cpu0.cpu, "buffer.flushes") == 0
    assert Seen(0, _token(kernel, s)) in cpu0.cpu.buffer.leaks(1)
    assert counter(cpu0.cpu, "asi.enters") == 2


def test_every_enter_after_an_exit_flushes(kernel, cpu0):
    """Changed by design: a HOST period (the unrestricted kernel ran) taints KERNEL when it
    ends, so asi_enter after asi_exit flushes whatever was or was not loaded meanwhile (it used
    to skip the flush when nothing had been loaded, or only the VM's own data)."""
    vm1 = kernel.asi_init(1, KVM)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    mine, theirs = kernel.alloc_page(MemClass.LOCAL, 1), kernel.alloc_page(MemClass.LOCAL, 2)

    def round_trip(*loads):
        for va in loads:
            cpu0.access(va)
        before = counter(cpu0.cpu, "asi.flushes")
        cpu0.asi_enter(vm1)
        assert cpu0.state.taint == 0 and cpu0.cpu.buffer.leaks(1) == []
        cpu0.asi_exit()
        return counter(cpu0.cpu, "asi.flushes") - before

    assert round_trip() == 1                       # a fresh CPU is tainted by the kernel
    assert [round_trip(), round_trip(mine), round_trip(s), round_trip(theirs),
            round_trip(mine, theirs)] == [1] * 5
    assert counter(cpu0.cpu, "buffer.flushes") == 6


def test_taints_decide_whether_enter_flushes(kernel, cpu0):
    """Without a HOST period since the last flush, the CPU's taints decide. The only way to
    asi_enter without one is from a mode that has none: IDLE here (its HOST period ends and is
    flushed first), then loads from the full tree, then asi_enter."""
    vm1 = kernel.asi_init(1, KVM)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    mine, theirs = kernel.alloc_page(MemClass.LOCAL, 1), kernel.alloc_page(MemClass.LOCAL, 2)
    state = cpu0.state

    def enter_from_idle(*loads):
        cpu0.asi_exit()
        state.set(IDLE_MODE, 0)                    # the HOST period ends: taints KERNEL ...
        assert state.taint & Taint.KERNEL
        cpu0.flush()                               # ... and is flushed
        for va in loads:
            cpu0.access(va)
        before = counter(cpu0.cpu, "asi.flushes")
        cpu0.asi_enter(vm1)
        return counter(cpu0.cpu, "asi.flushes") - before

    assert enter_from_idle() == 0                  # nothing loaded since the flush
    assert enter_from_idle(mine) == 0              # the VM's own data: no flush for it
    assert state.taint == Taint.GUEST and state.tdom == 1
    assert enter_from_idle(s) == 1
    assert enter_from_idle(theirs) == 1            # another domain's guest data
    assert enter_from_idle(mine, theirs) == 1      # two domains: OTHER
    assert state.taint == 0
    kpti = kernel.asi_init(1, KPTI)                # a class that protects nothing never flushes
    cpu0.asi_exit()
    state.set(IDLE_MODE, 0)
    cpu0.access(s)
    before = counter(cpu0.cpu, "asi.flushes")
    cpu0.asi_enter(kpti)
    assert counter(cpu0.cpu, "asi.flushes") == before and state.taint & Taint.KERNEL


def test_loads_deposit_into_the_one_core_buffer(kernel, aregion):
    """Both siblings load into, and flush, the same core buffer: c0's secret is what c1 sees;
    c1's flush at its asi_enter clears it, but not c0's HOST period, which is still open."""
    vm = kernel.asi_init(1, KVM)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c0.access(s)
        assert Seen(0, _token(kernel, s)) in c1.cpu.buffer.leaks(1)
        assert counter(c0.cpu, "buffer.deposits") == 1 and counter(c1.cpu, "buffer.deposits") == 0
        c1.asi_enter(vm)                           # flushes: counted for c1 only
        assert (counter(c1.cpu, "asi.flushes"), counter(c0.cpu, "asi.flushes")) == (1, 0)
        assert untagged(c1.cpu.buffer.leaks(1)) == [Seen(0, period_token(0))]   # c0 is still in HOST
        c0.asi_enter(vm)
        assert c1.cpu.buffer.leaks(1) == [] and c1.cpu.buffer.dirty_for(1) is None
        assert c1.cpu.buffer.dirty_for(2) is not None                 # domain 1's periods


def test_fault_exits_and_retries_in_the_full_tree(kernel, cpu0):
    vm = kernel.asi_init(1, KVM)
    g, s = kernel.alloc_page(MemClass.GLOBAL), kernel.alloc_page(MemClass.SENSITIVE)
    cpu0.asi_enter(vm)
    assert cpu0.access(g) == pte_frame(kernel.pt.walk(kernel.full_root, g))
    assert cpu0.current == vm and counter(cpu0.cpu, "asi.faults") == 0
    assert cpu0.access(s) == pte_frame(kernel.pt.walk(kernel.full_root, s))
    assert cpu0.current == 0 and cpu0.target == vm and counter(cpu0.cpu, "asi.faults") == 1
    assert _published(cpu0) == (Mode.HOST, 1)
    assert Seen(0, _token(kernel, s)) in cpu0.cpu.buffer.leaks(1)   # loaded, unrestricted
    with pytest.raises(PageFault, match="not mapped in the full kernel tree"):
        cpu0.access(DMAP_BASE + 0x7FF000)
    cpu0.asi_enter(vm)
    with pytest.raises(PageFault):
        cpu0.access(DMAP_BASE + 0x7FF000)
    assert counter(cpu0.cpu, "asi.faults") == 2


def test_a_speculative_touch_reaches_only_mapped_memory(kernel, cpu0):
    vm = kernel.asi_init(1, KVM)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    buf = cpu0.cpu.buffer
    cpu0.asi_enter(vm)                             # flushes the initial taint
    # only the open ASI(1) period is in the buffer (visible while open, whatever is flushed)
    assert cpu0.touch(s) is False and untagged(buf.visible()) == [Seen(0, period_token(1))]
    assert cpu0.current == vm and cpu0.state.taint == 0
    cpu0.asi_exit()
    assert cpu0.touch(s) is True and Seen(0, _token(kernel, s)) in buf.leaks(1)
    assert (counter(cpu0.cpu, "asi.gadgets"), counter(cpu0.cpu, "asi.gadget_hits")) == (2, 1)


def test_interrupt_runs_restricted_unless_it_faults(kernel, cpu0):
    """A real signal handler: stays in the restricted space for global data; a fault on
    sensitive data exits; asi_intr_exit re-enters the interrupted space."""
    vm = kernel.asi_init(1, KVM)
    g, s = kernel.alloc_page(MemClass.GLOBAL), kernel.alloc_page(MemClass.SENSITIVE)
    seen = []

    def handler(signum, frame):
        cpu0.asi_intr_enter()
        try:
            cpu0.access(g)
            seen.append(cpu0.current)
            if len(seen) > 1:
                cpu0.access(s)
                seen.append(cpu0.current)
        finally:
            cpu0.asi_intr_exit()

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        cpu0.asi_enter(vm)
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [vm] and cpu0.current == vm
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [vm, vm, 0] and cpu0.current == vm     # faulted inside, re-entered
        assert cpu0.region.array("asi_cpu")["intr_depth"][cpu0.cpu.slot] == 0
        assert counter(cpu0.cpu, "asi.faults") == 1
    finally:
        signal.signal(signal.SIGUSR1, old)
    with pytest.raises(AsirtError, match="without asi_intr_enter"):
        cpu0.asi_intr_exit()


def test_offline_cpu_leaves_its_instance(kernel, aregion):
    vm = kernel.asi_init(1, KVM)
    with asi_handles(aregion, 1) as (c,):
        c.asi_enter(vm)
        c.offline()
        assert c.current == 0 and c.target == 0
    kernel.asi_destroy(vm)


def test_errors_pickle():
    for err in (PageFault(0x1000, 2), AsiStateError(3, "is not live"),
                InvariantViolation(["a", "b"])):
        assert str(pickle.loads(pickle.dumps(err))) == str(err)
