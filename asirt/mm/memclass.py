"""Physical memory classes: the emulated frame pool, its allocator, and each frame's token.

A frame is *sensitive* (the default: kernel data, or a domain's secrets), *globally
non-sensitive* (mapped in every restricted tree) or *locally non-sensitive* with an owner
domain (mapped only in that domain's restricted trees). The allocator never puts two classes,
or two owners' local data, on one frame: small objects are packed only into frames of their
own (class, owner). A sensitive or local frame carries a token naming its class, owner and
frame; loading from it deposits the token in the core's buffer (asirt.cpu.buffer). The token
layout and the classes are the region's ABI (shm_layout.cpu).

Callers hold the region's page-table lock around alloc and free (asirt.mm.asi does).
"""
from __future__ import annotations

import numpy as np

from asirt.errors import AsirtError, BadInput
from shm_layout.asi import PAGE_SIZE
from shm_layout.cpu import (CLASS_SHIFT, FRAME_BITS, FRAME_MASK, MAX_DOMAINS, OWNER_MASK,
                            MemClass, make_token, token_class, token_frame, token_owner)
from shm_layout.region import Region

__all__ = ["MemClass", "describe", "make_token", "token_class", "token_owner", "token_frame",
           "CLASS_SHIFT", "FRAME_BITS", "OWNER_MASK", "FRAME_MASK", "PoolExhausted",
           "DoubleFree", "MappingRefused", "check_class", "Frames"]

OBJECT_ALIGN = 8


def describe(cls: int, owner: int) -> str:
    """``"sensitive"``, ``"global"``, ``"local(3)"``, ``"sensitive(3)"``: a class for messages."""
    name = MemClass(cls).name.lower()
    return f"{name}({owner})" if owner or cls == MemClass.LOCAL else name


class PoolExhausted(AsirtError):
    """No free frame (or page table) left; nothing was changed."""

    def __init__(self, pool: str, capacity: int, wanted: str, param: str) -> None:
        super().__init__(pool, capacity, wanted, param)
        self.pool, self.capacity, self.wanted, self.param = pool, capacity, wanted, param

    def message(self) -> str:
        msg = (f"the {self.pool} pool is exhausted (all {self.capacity} in use) while "
               f"allocating {self.wanted}; free some")
        return msg + (f", or create the region with a larger params[{self.param!r}]"
                      if self.param else "")


class DoubleFree(AsirtError):
    """Freeing a frame or page table that is already free; nothing was changed."""

    def __init__(self, what: str, index: int, address: int) -> None:
        super().__init__(what, index, address)
        self.what, self.index, self.address = what, index, address

    def message(self) -> str:
        if self.index < 0:
            return f"double free of the {self.what} at {self.address:#x}: it is not allocated"
        return (f"double free of {self.what} {self.index} (address {self.address:#x}): "
                f"it is already free")


class MappingRefused(AsirtError):
    """A frame's class forbids mapping it into a restricted tree; the tree is unchanged."""

    def __init__(self, address: int, pfn: int, cls: int, owner: int, domain: int) -> None:
        super().__init__(address, pfn, cls, owner, domain)
        self.address, self.pfn, self.cls, self.owner, self.domain = address, pfn, cls, owner, domain

    def message(self) -> str:
        what = (f"cannot map {self.address:#x} (frame {self.pfn}, class "
                f"{describe(self.cls, self.owner)}) into the restricted tree of domain "
                f"{self.domain}: ")
        if self.cls == MemClass.SENSITIVE:
            return what + ("sensitive memory is mapped only in the full kernel tree; allocate "
                           "it as global or local if it may be seen from a restricted space")
        if self.cls == MemClass.LOCAL:
            return what + (f"it is local to domain {self.owner}; only that domain's trees may "
                           f"map it")
        return what + "the frame is not allocated"


def check_class(cls: int, owner: int) -> None:
    """Refuse a class/owner pair that cannot be allocated, naming the valid ones."""
    if cls not in (MemClass.SENSITIVE, MemClass.GLOBAL, MemClass.LOCAL):
        raise BadInput(f"memory class {cls!r}", "is not allocatable",
                       "choose MemClass.SENSITIVE, MemClass.GLOBAL or MemClass.LOCAL")
    if not 0 <= owner <= MAX_DOMAINS:
        raise BadInput(f"owner {owner}", f"is outside the domains 0..{MAX_DOMAINS}",
                       f"use a domain between 1 and {MAX_DOMAINS} (0: the host)")
    if cls == MemClass.LOCAL and owner == 0:
        raise BadInput("owner 0 for local memory", "local memory belongs to a domain",
                       "pass the owning domain (1 or more)")
    if cls == MemClass.GLOBAL and owner != 0:
        raise BadInput(f"owner {owner} for global memory", "global memory has no owner",
                       "pass owner=0, or allocate MemClass.LOCAL")


class Frames:
    """The frame pool of a region. Not for hot paths: walks read ``token`` words directly."""

    def __init__(self, region: Region) -> None:
        self.arr = region.array("asi_frames")
        self.count = len(self.arr)

    def close(self) -> None:
        del self.arr

    def alloc(self, cls: int, owner: int = 0) -> int:
        """A whole free frame of ``cls`` and ``owner``; its number."""
        check_class(cls, owner)
        return self._take(cls, owner, PAGE_SIZE)

    def alloc_object(self, size: int, cls: int, owner: int = 0) -> tuple[int, int, bool]:
        """Room for ``size`` bytes on a frame of exactly this class and owner.

        Returns (frame, offset in it, whether the frame is new and so needs mapping).
        """
        check_class(cls, owner)
        if not 0 < size <= PAGE_SIZE:
            raise BadInput(f"object size {size}", f"must be 1..{PAGE_SIZE} bytes")
        size = -(-size // OBJECT_ALIGN) * OBJECT_ALIGN
        a = self.arr
        fits = np.flatnonzero((a["cls"] == cls) & (a["owner"] == owner)
                              & (a["used"] <= PAGE_SIZE - size))
        if fits.size:
            pfn = int(fits[0])
            offset = int(a["used"][pfn])
            a["used"][pfn] = offset + size
            return pfn, offset, False
        return self._take(cls, owner, size), 0, True

    def _take(self, cls: int, owner: int, used: int) -> int:
        free = np.flatnonzero(self.arr["cls"] == MemClass.FREE)
        if not free.size:
            raise PoolExhausted("frame", self.count, f"a {describe(cls, owner)} frame",
                                "asi_frames")
        pfn = int(free[0])
        rec = self.arr[pfn]
        rec["owner"], rec["token"], rec["used"] = owner, make_token(cls, owner, pfn), used
        rec["cls"] = cls
        return pfn

    def seal(self, pfn: int) -> None:
        """Put no more objects on ``pfn`` (it is being freed): alloc_object skips a full frame.
        Lets a caller drop the lock between unmapping a frame and freeing it."""
        self.arr["used"][pfn] = PAGE_SIZE

    def free(self, pfn: int, address: int) -> None:
        if not 0 <= pfn < self.count:
            raise BadInput(f"frame {pfn} (address {address:#x})",
                           f"is outside the pool of {self.count} frames")
        if self.arr["cls"][pfn] == MemClass.FREE:
            raise DoubleFree("frame", pfn, address)
        self.arr[pfn] = (0, 0, 0, 0)

    def cls_of(self, pfn: int) -> MemClass:
        return MemClass(int(self.arr["cls"][pfn]))

    def owner_of(self, pfn: int) -> int:
        return int(self.arr["owner"][pfn])
