"""The core's micro-architectural buffer: deposits per lane, flushes by any sibling, leaks."""
from __future__ import annotations

import pytest

from asirt.memclass import MemClass, make_token
from asirt.uarch import CoreBuffer, is_leak
from shm_layout.asi import UARCH_RING
from tests.asi_fixtures import L1D, asi_region

SECRET = make_token(MemClass.SENSITIVE, 0, 1)
MINE = make_token(MemClass.LOCAL, 1, 2)
THEIRS = make_token(MemClass.LOCAL, 2, 3)


@pytest.fixture
def lanes():
    with asi_region(ncpus=3, cores=[[0, 1], [2]]) as region:
        bufs = [CoreBuffer(region, 0, 0), CoreBuffer(region, 0, 1), CoreBuffer(region, 1, 0)]
        try:
            yield bufs
        finally:
            for b in bufs:
                b.close()


def test_siblings_see_each_others_deposits_other_cores_do_not(lanes):
    a, b, other = lanes
    a.deposit(SECRET)
    b.deposit(MINE)
    assert sorted(a.visible()) == sorted(b.visible()) == sorted([SECRET, MINE])
    assert other.visible() == []


def test_a_flush_by_either_sibling_clears_the_core(lanes):
    a, b, _ = lanes
    a.deposit(SECRET)
    b.deposit(THEIRS)
    b.flush()
    assert a.visible() == b.visible() == []
    a.deposit(MINE)                       # a load after the flush is seen again
    assert b.visible() == [MINE]


def test_ring_keeps_the_latest_tokens(lanes):
    a, b, _ = lanes
    toks = [make_token(MemClass.SENSITIVE, 0, i) for i in range(UARCH_RING + 5)]
    for t in toks:
        a.deposit(t)
    assert b.visible() == toks[-UARCH_RING:]


def test_leaks_by_domain(lanes):
    a, b, _ = lanes
    for t in (SECRET, MINE, THEIRS):
        a.deposit(t)
    assert sorted(b.leaks(1)) == sorted([SECRET, THEIRS])
    assert sorted(b.leaks(2)) == sorted([SECRET, MINE])
    assert is_leak(SECRET, 0) and not is_leak(MINE, 1) and is_leak(MINE, 2)


def test_flush_evicts_one_l1d_of_memory(lanes):
    a = lanes[0]
    assert a.l1d_bytes == L1D and a._evict.nbytes == L1D
    before = int(a._evict.sum())
    a.flush()
    assert int(a._evict.sum()) == before + L1D // 64   # one write per cache line


def test_lane_must_exist():
    with asi_region(ncpus=2, cores=[[0, 1]]) as region:
        with pytest.raises(ValueError, match="lane 2 of core 0"):
            CoreBuffer(region, 0, 2)
