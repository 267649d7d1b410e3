"""The core buffer (asirt.cpu.buffer): deposits per lane, mode periods, flushes by any sibling,
the fenced-lane cover rule, leaks, incremental sampling (new_leaks) and dirty_for."""
from __future__ import annotations

from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asirt.cpu.buffer import LINE, CoreBuffer, Seen
from shm_layout.cpu import (MAX_DOMAINS, RING, MemClass, is_leak, make_token, period_token,
                            token_cls_index)
from tests.fixtures import L1D, cpu_region

SECRET = make_token(MemClass.SENSITIVE, 0, 1)
MINE = make_token(MemClass.LOCAL, 1, 2)
THEIRS = make_token(MemClass.LOCAL, 2, 3)
HOST_DATA = period_token(0)          # what a HOST period deposits


def _tokens(seen: list[Seen]) -> list[int]:
    return sorted(x.token for x in seen)


@pytest.fixture
def lanes() -> Iterator[list[CoreBuffer]]:
    """Lanes 0 and 1 of core 0, and lane 0 of core 1."""
    with cpu_region(2, ncores=2) as region:
        yield [CoreBuffer(region, 0, 0), CoreBuffer(region, 0, 1), CoreBuffer(region, 1, 0)]


# -- deposits and flushes -------------------------------------------------------------------
def test_siblings_see_each_others_deposits_other_cores_do_not(lanes):
    a, b, other = lanes
    a.deposit(SECRET)
    b.deposit(MINE)
    assert a.visible() == b.visible() == [Seen(0, SECRET), Seen(1, MINE)]
    assert other.visible() == []


def test_a_flush_by_either_sibling_clears_the_core(lanes):
    a, b, _ = lanes
    a.deposit(SECRET)
    b.deposit(THEIRS)
    b.flush(0)
    assert a.visible() == b.visible() == []
    a.deposit(MINE)                       # a load after the flush is seen again
    assert b.visible() == [Seen(0, MINE)]


def test_ring_keeps_the_latest_tokens(lanes):
    a, b, _ = lanes
    toks = [make_token(MemClass.SENSITIVE, 0, i) for i in range(RING + 5)]
    for t in toks:
        a.deposit(t)
    assert [x.token for x in b.visible()] == toks[-RING:]


def test_leaks_by_domain(lanes):
    a, b, _ = lanes
    for t in (SECRET, MINE, THEIRS):
        a.deposit(t)
    assert _tokens(b.leaks(1)) == sorted([SECRET, THEIRS])
    assert _tokens(b.leaks(2)) == sorted([SECRET, MINE])
    assert is_leak(SECRET, 0) and not is_leak(MINE, 1) and is_leak(MINE, 2)
    assert is_leak(HOST_DATA, 1) and not is_leak(period_token(1), 1)


def test_flush_evicts_one_l1d_of_memory(lanes):
    a = lanes[0]
    assert a.l1d_bytes == L1D and a._evict.base.nbytes == L1D   # one L1D of memory ...
    assert a._evict.strides == (LINE,)                          # ... a word of each line
    sweeps = []

    class Spy:                   # the view above, swept once per flush (its dot loads it all)
        def dot(self, other):
            sweeps.append(other is self)
            return 0

    a._evict = Spy()
    a.flush(0)
    assert sweeps == [True]


def test_lane_must_exist():
    with cpu_region(2) as region:
        with pytest.raises(ValueError, match="lane 2 of core 0"):
            CoreBuffer(region, 0, 2)


# -- mode periods -----------------------------------------------------------------------------
def test_an_open_period_is_visible_whatever_is_flushed(lanes):
    """A period open now is still loading: no flush clears it."""
    a, b, _ = lanes
    b.open(HOST_DATA)
    assert a.visible() == [Seen(1, HOST_DATA)]
    a.flush(0)
    b.flush(0)
    assert a.visible() == [Seen(1, HOST_DATA)] and a.dirty_for(1) == Seen(1, HOST_DATA)


def test_a_closed_periods_token_stays_until_a_flush(lanes):
    a, b, _ = lanes
    b.open(HOST_DATA)
    b.close()
    assert a.visible() == [Seen(1, HOST_DATA)]     # what it loaded is still in the buffer
    b.close()                                      # nothing open: nothing more deposited
    assert a.visible() == [Seen(1, HOST_DATA)]
    a.flush(0)
    assert a.visible() == [] and a.dirty_for(1) is None


def test_opening_a_period_ends_the_previous_one(lanes):
    a, b, _ = lanes
    b.open(HOST_DATA)
    b.open(period_token(1))                        # HOST -> ASI(1)
    assert a.visible() == [Seen(1, HOST_DATA), Seen(1, period_token(1))]
    a.flush(0)
    assert a.visible() == [Seen(1, period_token(1))]
    assert a.dirty_for(1) is None and a.dirty_for(2) == Seen(1, period_token(1))


def test_a_fenced_lanes_open_period_is_visible_until_a_flush_after_the_fence_covers_it():
    """Lane 1 dies in HOST. Its open period stays visible through flushes that do not know it
    is fenced (it might still be loading); the first flush that sees it fenced covers that
    period, whoever looks. A later period of the lane would not be covered by that flush."""
    with cpu_region(3) as region:
        a, dead, c = (CoreBuffer(region, 0, s) for s in range(3))
        dead.open(HOST_DATA)
        a.flush(0)                                 # before the fence: no cover
        assert c.visible() == [Seen(1, HOST_DATA)] and c.dirty_for(1) == Seen(1, HOST_DATA)
        a.flush(1 << 1)                            # after the fence: covered
        assert a.visible() == c.visible() == [] and c.dirty_for(1) is None
        assert c.leaks(1) == [] and c.new_leaks(1) == []
        c.flush(0)                                 # another lane's flush keeps the cover
        assert c.visible() == []
        dead.open(period_token(2))                 # a new period: that flush did not cover it
        assert c.visible() == [Seen(1, HOST_DATA), Seen(1, period_token(2))]


# -- incremental sampling ---------------------------------------------------------------------
def test_new_leaks_reports_each_deposit_once(lanes):
    a, b, _ = lanes
    a.deposit(SECRET)
    assert b.new_leaks(1) == [Seen(0, SECRET)]
    assert b.new_leaks(1) == []                    # looked at again: not a new leak
    a.deposit(MINE)                                # domain 1's own data is no leak
    a.deposit(THEIRS)
    a.deposit(SECRET)                              # the same token again is a new deposit
    assert b.new_leaks(1) == [Seen(0, THEIRS), Seen(0, SECRET)]
    assert b.new_leaks(1) == []
    assert _tokens(b.leaks(1)) == sorted([SECRET, THEIRS, SECRET])   # leaks: all that is visible
    assert a.new_leaks(1) == [Seen(0, SECRET), Seen(0, THEIRS), Seen(0, SECRET)]  # per reader


def test_new_leaks_reports_an_open_period_once_while_it_lasts(lanes):
    a, b, _ = lanes
    b.open(HOST_DATA)
    assert a.new_leaks(1) == [Seen(1, HOST_DATA)]
    a.flush(0)
    assert a.new_leaks(1) == [] and a.new_leaks(1) == []
    b.open(period_token(2))                        # a new period (the old one is flushed below)
    a.flush(0)
    assert a.new_leaks(1) == [Seen(1, period_token(2))]
    assert a.new_leaks(2) == []                    # domain 2's own: no leak, and seen now


def test_new_leaks_never_reports_flushed_or_overwritten_tokens(lanes):
    a, b, _ = lanes
    a.deposit(SECRET)
    a.flush(0)
    assert b.new_leaks(1) == []
    toks = [make_token(MemClass.SENSITIVE, 0, i) for i in range(RING + 10)]
    for t in toks:
        a.deposit(t)
    assert [x.token for x in b.new_leaks(1)] == toks[-RING:]   # lost, never invented


# -- dirty_for against leaks, and the buffer against a model ---------------------------------
_DOMAIN_TOKENS = st.one_of(
    st.builds(make_token, st.just(MemClass.SENSITIVE), st.integers(0, MAX_DOMAINS),
              st.integers(0, 1000)),
    st.builds(make_token, st.just(MemClass.LOCAL), st.integers(1, MAX_DOMAINS),
              st.integers(0, 1000)),
    st.builds(period_token, st.integers(0, MAX_DOMAINS)))
_LANE = st.integers(0, 2)
_OPS = st.lists(st.one_of(
    st.tuples(st.just("deposit"), _LANE, _DOMAIN_TOKENS, st.integers(1, 3)),
    st.tuples(st.just("deposit"), _LANE, _DOMAIN_TOKENS, st.integers(RING - 2, RING + 3)),
    st.tuples(st.just("open"), _LANE, _DOMAIN_TOKENS, st.just(0)),
    st.tuples(st.just("close"), _LANE, st.just(0), st.just(0)),
    st.tuples(st.just("flush"), _LANE, st.integers(0, 7), st.just(0))), min_size=1, max_size=30)


class _Model:
    """The buffer's rules as its docstring states them, on plain lists."""

    def __init__(self, n: int) -> None:
        self.deposits: list[list[int]] = [[] for _ in range(n)]
        self.open = [0] * n
        self.oseq = [0] * n
        self.marks = [[0] * n for _ in range(n)]     # marks[flusher][lane]
        self.pcover = [[0] * n for _ in range(n)]

    def step(self, op: str, lane: int, arg: int, times: int) -> None:
        if op == "deposit":
            self.deposits[lane] += [arg] * times
        elif op in ("open", "close"):
            if self.open[lane]:
                self.deposits[lane].append(self.open[lane])
            if op == "open":
                self.oseq[lane] += 1
            self.open[lane] = arg if op == "open" else 0
        else:
            for s in range(len(self.open)):
                self.marks[lane][s] = len(self.deposits[s])
                if arg >> s & 1:
                    self.pcover[lane][s] = self.oseq[s]

    def visible(self) -> list[Seen]:
        out = []
        for s, deps in enumerate(self.deposits):
            low = max([len(deps) - RING, 0] + [m[s] for m in self.marks])
            out += [Seen(s, t) for t in deps[low:]]
            if self.open[s] and all(p[s] != self.oseq[s] for p in self.pcover):
                out.append(Seen(s, self.open[s]))
        return out


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_dirty_for_agrees_with_leaks_and_the_buffer_with_its_model(ops):
    """After every step of a random sequence of deposits, periods and flushes (by any lane,
    with any lanes fenced): what the buffer shows is what its rules say; dirty_for(d) is None
    exactly when nothing visible leaks to d, else one of those leaks; new_leaks reports only
    visible leaks, every one that became visible since the last look and was never reported
    (each deposit and each period once: one that returned nothing would pass otherwise), and
    nothing on a second look."""
    with cpu_region(3) as region:
        bufs = [CoreBuffer(region, 0, s) for s in range(3)]
        reader = CoreBuffer(region, 0, 0)          # a guest's sampling handle
        model = _Model(3)
        before: list[Seen] = []
        reported: set[Seen] = set()
        for op, lane, arg, times in ops:
            b = bufs[lane]
            if op == "deposit":
                for _ in range(times):
                    b.deposit(arg)
            elif op == "open":
                b.open(arg)
            elif op == "close":
                b.close()
            else:
                b.flush(arg)
            model.step(op, lane, arg, times)
            assert reader.visible() == model.visible()
            for d in range(MAX_DOMAINS + 1):
                leaks = reader.leaks(d)
                dirty = reader.dirty_for(d)
                assert (dirty is None) == (not leaks), (d, dirty, leaks)
                assert dirty is None or dirty in leaks
            new = reader.new_leaks(1)
            leaks = reader.leaks(1)
            assert all(new.count(x) <= leaks.count(x) for x in new), (new, leaks)
            assert set(leaks) - set(before) - reported <= set(new), (leaks, before, new)
            assert reader.new_leaks(1) == []
            before = leaks
            reported |= set(new)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, MAX_DOMAINS), max_size=40))
def test_open_period_is_open_written_out(domains):
    """State's transitions use open_period, the model test above uses open: the two must make
    the same stores (one lane each, the same sequence of periods)."""
    with cpu_region(2) as region:
        fast, ref = CoreBuffer(region, 0, 0), CoreBuffer(region, 0, 1)
        w = region.words
        for d in domains:
            fast.open_period(d)
            ref.open(period_token(d, ref.oseq + 1))
            a, b = fast.lanes[0], ref.lanes[1]
            n = b - a
            assert list(w[a:a + n]) == list(w[b:b + n])


def test_each_domain_has_its_own_class_in_the_summary():
    """dirty_for's per-class summary: class 0 for sensitive data of any owner, d for domain d's
    local data, for every domain 1..MAX_DOMAINS."""
    assert token_cls_index(make_token(MemClass.SENSITIVE, 3, 9)) == 0
    assert token_cls_index(HOST_DATA) == 0
    assert [token_cls_index(make_token(MemClass.LOCAL, d, 9)) for d in
            range(1, MAX_DOMAINS + 1)] == list(range(1, MAX_DOMAINS + 1))
    assert [token_cls_index(period_token(d)) for d in range(1, MAX_DOMAINS + 1)] == \
        list(range(1, MAX_DOMAINS + 1))


def test_new_leaks_reports_to_a_guest_of_another_domain_what_it_saw_before(lanes):
    """What a guest of domain 1 saw (its own data) is news to a guest of domain 2 on the same
    lane, if nobody flushed in between: 'reported once' is per domain."""
    a, b, _ = lanes
    tok = make_token(MemClass.LOCAL, 1, 7)
    b.deposit(tok)
    assert a.new_leaks(1) == []                 # domain 1's own data
    assert a.new_leaks(2) == [Seen(1, tok)]     # after a switch without a flush: a leak
    assert a.new_leaks(2) == []                 # once
