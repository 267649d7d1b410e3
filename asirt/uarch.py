"""Each physical core's micro-architectural buffer (the L1D / fill buffers its siblings share).

Loading from a sensitive or local frame deposits that frame's token; a flush clears what the
core's lanes hold and does real cache-evicting work of the L1D's size, so it costs what a
software L1D flush costs; a reader (a guest's side channel) gets every token still visible.

Single writer per field: each sibling deposits into its own lane (ring + head). A flush by
the CPU in lane ``f`` clears nothing in other lanes; it records, in its own lane, the head of
every lane as it saw it (``flushed``). A token is visible while its sequence number is at or
past every lane's mark for its lane. A deposit racing a flush stays visible, as a load that
lands after a flush would. A signal handler's deposit can be overwritten by the deposit it
interrupted: a lost token, never an invented one.
"""
from __future__ import annotations

import numpy as np

from asirt.memclass import MemClass, token_class, token_owner
from shm_layout.asi import LANE_DTYPE, UARCH_DTYPE, UARCH_RING, u64_view, word
from shm_layout.region import Region
from shm_layout.sections import MAX_SIBLINGS

_LANE_WORDS = LANE_DTYPE.itemsize // 8
_LANES = UARCH_DTYPE.fields["lanes"][1] // 8
_RING = LANE_DTYPE.fields["ring"][1] // 8
_HEAD = LANE_DTYPE.fields["head"][1] // 8
_FLUSHED = LANE_DTYPE.fields["flushed"][1] // 8
_RING_MASK = UARCH_RING - 1
assert UARCH_RING & _RING_MASK == 0
LINE = 64                      # bytes per cache line
DEFAULT_L1D = 32 * 1024        # when the topology could not tell


def setup(region: Region, cores: list[list[int]], l1d_bytes: int) -> None:
    """Parent, before workers start: each core's lane count and L1D size."""
    arr = region.array("asi_uarch")
    for k, sibs in enumerate(cores):
        if not 0 < len(sibs) <= MAX_SIBLINGS:
            raise ValueError(f"core {k} has {len(sibs)} CPUs; 1..{MAX_SIBLINGS} fit")
        arr["nlanes"][k] = len(sibs)
        arr["l1d_bytes"][k] = l1d_bytes or DEFAULT_L1D


def is_leak(token: int, domain: int) -> bool:
    """Whether a guest of ``domain`` seeing ``token`` is a leak: any sensitive token, or
    another domain's local one."""
    cls = token_class(token)
    return cls == MemClass.SENSITIVE or (cls == MemClass.LOCAL and token_owner(token) != domain)


class CoreBuffer:
    """One CPU's handle on its core's buffer: it deposits into lane ``lane``."""

    def __init__(self, region: Region, core: int, lane: int) -> None:
        self.q = u64_view(region)
        base = word(region, "asi_uarch", core)
        self.nlanes = int(self.q[word(region, "asi_uarch", core, "nlanes")])
        if not 0 <= lane < self.nlanes:
            raise ValueError(f"lane {lane} of core {core}, which has {self.nlanes} lanes")
        self.lanes = [base + _LANES + s * _LANE_WORDS for s in range(self.nlanes)]
        mine = self.lanes[lane]
        self.ring = mine + _RING
        self.head = mine + _HEAD
        self.marks = mine + _FLUSHED
        l1d = int(self.q[word(region, "asi_uarch", core, "l1d_bytes")]) or DEFAULT_L1D
        self.l1d_bytes = l1d
        self._evict = np.zeros(l1d // 8, np.int64)   # one L1D of this process's own memory

    def close(self) -> None:
        self.q.release()

    def deposit(self, token: int) -> None:
        q = self.q
        h = q[self.head]
        q[self.ring + (h & _RING_MASK)] = token
        q[self.head] = h + 1

    def flush(self) -> None:
        """Clear every lane (as of now) and evict: read and write each line of one L1D."""
        q, marks = self.q, self.marks
        for s, lane in enumerate(self.lanes):
            q[marks + s] = q[lane + _HEAD]
        self._evict[:: LINE // 8] += 1

    def visible(self) -> list[int]:
        """Tokens a reader on this core would see now, oldest first per lane."""
        q, out = self.q, []
        for s, lane in enumerate(self.lanes):
            h = q[lane + _HEAD]
            lo = max(q[other + _FLUSHED + s] for other in self.lanes)
            for n in range(max(lo, h - UARCH_RING), h):
                token = q[lane + _RING + (n & _RING_MASK)]
                if token:
                    out.append(token)
        return out

    def leaks(self, domain: int) -> list[int]:
        """Visible tokens a guest of ``domain`` must not see."""
        return [t for t in self.visible() if is_leak(t, domain)]
