"""Memory classes: tokens, segregation of classes and owners on frames, pool errors."""
from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shm_layout.cpu
from asirt.errors import AsirtError, BadInput
from asirt.mm import memclass
from asirt.mm.memclass import (DoubleFree, Frames, MappingRefused, MemClass, PoolExhausted,
                               describe, make_token, token_class, token_frame, token_owner)
from shm_layout.asi import PAGE_SIZE
from shm_layout.cpu import MAX_DOMAINS
from tests.fixtures import cpu_region


def test_tokens_name_class_owner_and_frame():
    t = make_token(MemClass.LOCAL, 7, 1234)
    assert (token_class(t), token_owner(t), token_frame(t)) == (MemClass.LOCAL, 7, 1234)
    assert token_class(make_token(MemClass.SENSITIVE, 0, 0)) == MemClass.SENSITIVE
    assert make_token(MemClass.SENSITIVE, 0, 0) != 0
    assert make_token(MemClass.GLOBAL, 0, 5) == 0
    assert describe(MemClass.LOCAL, 3) == "local(3)" and describe(MemClass.GLOBAL, 0) == "global"


def test_tokens_and_classes_are_the_regions_abi():
    """They moved to shm_layout.cpu (the core buffer's tokens are part of the region's ABI);
    asirt.mm.memclass re-exports the very same objects, not copies."""
    for name in ("MemClass", "make_token", "token_class", "token_owner", "token_frame",
                 "CLASS_SHIFT", "FRAME_BITS", "OWNER_MASK", "FRAME_MASK"):
        assert getattr(memclass, name) is getattr(shm_layout.cpu, name), name


@pytest.mark.parametrize("cls,owner,match", [
    (MemClass.FREE, 0, "not allocatable"), (9, 0, "not allocatable"),
    (MemClass.LOCAL, 0, "belongs to a domain"), (MemClass.GLOBAL, 2, "no owner"),
    (MemClass.SENSITIVE, -1, "outside"),
    # owners are the buffer's classes: domains 0..MAX_DOMAINS (shm_layout.cpu.NCLASS)
    (MemClass.LOCAL, MAX_DOMAINS + 1, rf"outside the domains 0\.\.{MAX_DOMAINS}"),
    (MemClass.SENSITIVE, MAX_DOMAINS + 1, "outside"),
])
def test_bad_class_or_owner(aregion, cls, owner, match):
    frames = Frames(aregion)
    try:
        with pytest.raises(BadInput, match=match):
            frames.alloc(cls, owner)
        assert (frames.arr["cls"] == 0).all()
    finally:
        frames.close()


def test_every_domain_may_own_memory(aregion):
    frames = Frames(aregion)
    try:
        for d in range(1, MAX_DOMAINS + 1):
            pfn = frames.alloc(MemClass.LOCAL, d)
            assert token_owner(int(frames.arr["token"][pfn])) == d
    finally:
        frames.close()


def test_frame_pool_exhaustion_and_double_free(aregion):
    frames = Frames(aregion)
    try:
        pfns = [frames.alloc(MemClass.SENSITIVE) for _ in range(frames.count)]
        assert sorted(pfns) == list(range(frames.count))
        with pytest.raises(PoolExhausted, match=r"frame pool is exhausted.*local\(3\)"):
            frames.alloc(MemClass.LOCAL, 3)
        frames.free(5, 0x5000)
        with pytest.raises(DoubleFree, match=r"double free of frame 5 \(address 0x5000\)"):
            frames.free(5, 0x5000)
        assert frames.alloc(MemClass.GLOBAL) == 5
    finally:
        frames.close()


def test_a_sealed_frame_takes_no_more_objects(aregion):
    frames = Frames(aregion)
    try:
        pfn, off, fresh = frames.alloc_object(100, MemClass.LOCAL, 1)
        assert (off, fresh) == (0, True)
        frames.seal(pfn)                           # being freed: unmapped, lock dropped
        other, off, fresh = frames.alloc_object(100, MemClass.LOCAL, 1)
        assert other != pfn and (off, fresh) == (0, True)
        assert frames.cls_of(pfn) == MemClass.LOCAL    # still allocated until free()
    finally:
        frames.close()


def test_errors_pickle_with_their_fields():
    for err in (PoolExhausted("frame", 8, "a global frame", "asi_frames"),
                DoubleFree("frame", 3, 0x3000),
                MappingRefused(0xFFFF_8880_0000_1000, 1, MemClass.SENSITIVE, 0, 2)):
        back = pickle.loads(pickle.dumps(err))
        assert isinstance(back, AsirtError) and str(back) == str(err)
    assert "sensitive memory is mapped only in the full kernel tree" in str(
        MappingRefused(0x1000, 1, MemClass.SENSITIVE, 0, 2))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, PAGE_SIZE),
                          st.sampled_from([(MemClass.SENSITIVE, 0), (MemClass.SENSITIVE, 1),
                                           (MemClass.GLOBAL, 0), (MemClass.LOCAL, 1),
                                           (MemClass.LOCAL, 2)])),
                min_size=1, max_size=40))
def test_objects_never_share_a_frame_across_class_or_owner(objs):
    with cpu_region(asi=True, frames=64) as region:
        frames = Frames(region)
        try:
            placed = []
            for size, (cls, owner) in objs:
                pfn, off, _ = frames.alloc_object(size, cls, owner)
                placed.append((pfn, off, size, cls, owner))
            for pfn, off, size, cls, owner in placed:
                assert (frames.cls_of(pfn), frames.owner_of(pfn)) == (cls, owner)
                assert off + size <= PAGE_SIZE
                tok = int(frames.arr["token"][pfn])
                assert tok == make_token(cls, owner, pfn)
            spans = sorted((pfn * PAGE_SIZE + off, size) for pfn, off, size, *_ in placed)
            for (a, n), (b, _) in zip(spans, spans[1:]):
                assert a + n <= b                              # no two objects overlap
        finally:
            frames.close()
