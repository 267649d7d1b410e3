"""Each physical core's micro-architectural buffer (the L1D / fill buffers its siblings share):
the one core buffer every mechanism loads into and flushes.

What is in it is *physical* state, the evidence the checkers read: a load of a sensitive or
local frame deposits that frame's token, and a mode period deposits for as long as it lasts
(HOST: host data; ASI(d)/GUEST(d): domain d's local data; shm_layout.cpu.period_token). A flush
clears what the core's lanes hold *as of now* and does real cache-evicting work of the L1D's
size, so it costs what a software L1D flush costs. Which flushes happen is the protocols'
business (asirt.cpu.state's taints); whether the buffer is clean is this module's, and no
protocol reads it to decide anything.

Single writer per field: each sibling writes only its own lane. A flush by the CPU in lane f
records, in its own lane, the head of every lane as it saw it (``marks``): a token is visible
while its deposit number is at or past every lane's mark of its lane and still in the ring
(RING entries: an overwritten token is lost, never invented). A period open now is visible,
flush or not: its lane is still loading. A *fenced* lane (dead) loads nothing more, so a flush
that sees it fenced records its ``open_seq`` in ``pcover``: its period stays visible until a
flush after the fence covers it (a dead requester's HOST period is dirty until someone flushes).
Each lane also publishes, per class, the number of its last deposit of that class (``last``),
so "is it clean for domain d?" costs a few loads per lane instead of a scan of the ring.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shm_layout import Region
from shm_layout.cpu import (CLASS_SHIFT, CORE_BUF_DTYPE, FRAME_BITS, LANE_DTYPE, NCLASS, OWNER_MASK,
                            PERIOD_BASE, PERIOD_BIT, RING, MemClass, is_leak)
from shm_layout.sections import MAX_SIBLINGS

__all__ = ["CoreBuffer", "Seen", "setup", "LINE", "DEFAULT_L1D"]

LINE = 64                      # bytes per cache line
DEFAULT_L1D = 32 * 1024        # when the topology could not tell
_LANE_WORDS = LANE_DTYPE.itemsize // 8
_LANES = CORE_BUF_DTYPE.fields["lanes"][1] // 8
_RING = LANE_DTYPE.fields["ring"][1] // 8
_HEAD = LANE_DTYPE.fields["head"][1] // 8
_OPEN = LANE_DTYPE.fields["open_tok"][1] // 8
_OSEQ = LANE_DTYPE.fields["open_seq"][1] // 8
_LAST = LANE_DTYPE.fields["last"][1] // 8
_MARKS = LANE_DTYPE.fields["marks"][1] // 8
_PCOVER = LANE_DTYPE.fields["pcover"][1] // 8
_MASK = RING - 1
assert RING & _MASK == 0
_SENS = int(MemClass.SENSITIVE)
_SEQ = PERIOD_BIT - 1          # a period token's number, in its frame field


def setup(region: Region, cores: list[list[int]], l1d_bytes: int) -> None:
    """Parent, before workers start: each core's lane count and L1D size."""
    arr = region.array("core_buf")
    for k, sibs in enumerate(cores):
        if not 0 < len(sibs) <= MAX_SIBLINGS:
            raise ValueError(f"core {k} has {len(sibs)} CPUs; 1..{MAX_SIBLINGS} fit")
        arr["nlanes"][k] = len(sibs)
        arr["l1d_bytes"][k] = l1d_bytes or DEFAULT_L1D


class Seen(NamedTuple):
    """One foreign token a reader saw: in which lane, and what."""
    lane: int
    token: int


class CoreBuffer:
    """One CPU's handle on its core's buffer: it deposits into lane ``lane``."""

    def __init__(self, region: Region, core: int, lane: int) -> None:
        self.w = w = region.words
        base = region.word_index("core_buf", core)
        self.nlanes = n = w[region.word_index("core_buf", core, "nlanes")]
        if not 0 <= lane < n:
            raise ValueError(f"lane {lane} of core {core}, which has {n} lanes")
        self.lane = lane
        self.lanes = [base + _LANES + s * _LANE_WORDS for s in range(n)]
        mine = self.lanes[lane]
        self.i_ring, self.i_head, self.i_open = mine + _RING, mine + _HEAD, mine + _OPEN
        self.i_oseq, self.i_last, self.i_marks = mine + _OSEQ, mine + _LAST, mine + _MARKS
        self.i_pcover = mine + _PCOVER
        # where every lane's mark of lane s is: marks_of[s] = [lane x's marks[s] for every x]
        self.marks_of = [[x + _MARKS + s for x in self.lanes] for s in range(n)]
        self.pcover_of = [[x + _PCOVER + s for x in self.lanes] for s in range(n)]
        #: per lane, what dirty_for reads: its head, open token and number, the marks and
        #: covers of it, its class summary and its ring
        self._reads = [(s, lane + _HEAD, lane + _OPEN, lane + _OSEQ, tuple(self.marks_of[s]),
                        tuple(self.pcover_of[s]), lane + _LAST, lane + _RING)
                       for s, lane in enumerate(self.lanes)]
        # local mirrors of this lane's own words (only we write them)
        self.head, self.oseq, self.open_tok = w[self.i_head], w[self.i_oseq], w[self.i_open]
        l1d = w[region.word_index("core_buf", core, "l1d_bytes")] or DEFAULT_L1D
        self.l1d_bytes = l1d
        # one L1D of this process's own memory, a word of each line: what a flush reads
        self._evict = np.ones(l1d // 8, np.int64)[:: LINE // 8]
        self._plans: dict[tuple[int, int], list] = {}  # dirty_for's reads, per domain
        self._seen_head = [0] * n                     # incremental sampling (see new_leaks)
        self._seen_open = [0] * n                     # the open period last reported, per lane
        self._seen_dom = -1                           # ... to a guest of this domain

    # -- writing (this lane) ---------------------------------------------------------------
    def deposit(self, token: int) -> None:
        """A load put ``token`` into the buffer (its class summary: 0 sensitive, d local(d))."""
        w, h = self.w, self.head
        w[self.i_ring + (h & _MASK)] = token
        w[self.i_last + (0 if token >> CLASS_SHIFT == _SENS else
                         (token >> FRAME_BITS) & OWNER_MASK)] = h + 1
        self.head = h + 1
        w[self.i_head] = h + 1

    def open(self, token: int) -> None:
        """A mode period starts depositing ``token`` (the previous one, if any, ends first)."""
        if self.open_tok:
            self.deposit(self.open_tok)          # what it loaded stays until a flush
        self.oseq += 1
        self.w[self.i_oseq] = self.oseq
        self.open_tok = token
        self.w[self.i_open] = token

    def open_period(self, domain: int) -> None:
        """A mode period of ``domain`` (0: HOST) starts: its token carries its number here, so
        the token it leaves when it ends is known as the one it showed while open. The same
        stores as :meth:`open`, written out: it runs at every mode change."""
        w = self.w
        tok = self.open_tok
        if tok:                                  # deposit(tok), which ends the period
            h = self.head
            w[self.i_ring + (h & _MASK)] = tok
            w[self.i_last + (0 if tok >> CLASS_SHIFT == _SENS else
                             (tok >> FRAME_BITS) & OWNER_MASK)] = h + 1
            self.head = h + 1
            w[self.i_head] = h + 1
        seq = self.oseq + 1
        self.oseq = seq
        w[self.i_oseq] = seq
        tok = PERIOD_BASE[domain] | (seq & _SEQ)
        self.open_tok = tok
        w[self.i_open] = tok

    def close(self) -> None:
        """The open mode period ends: what it loaded stays in the buffer until a flush."""
        if self.open_tok:
            self.deposit(self.open_tok)
            self.open_tok = 0
            self.w[self.i_open] = 0

    def flush(self, fenced: int) -> None:
        """Clear every lane as of now, and evict: read each line of one L1D. Loads only, no
        line dirtied, as in KVM's software L1D flush (vmx_l1d_flush), which reads a 64 KiB
        buffer (twice a 32 KiB L1D) where this reads one L1D.
        ``fenced``: the lanes any sibling has fenced off (their open period is covered)."""
        w, lanes, marks, pcover = self.w, self.lanes, self.i_marks, self.i_pcover
        for s in range(self.nlanes):
            w[marks + s] = w[lanes[s] + _HEAD]
            if fenced >> s & 1:
                w[pcover + s] = w[lanes[s] + _OSEQ]
        self._evict.dot(self._evict)             # a load of every line: displaces the rest

    # -- reading (any lane: the evidence) -----------------------------------------------------
    def _low(self, s: int) -> int:
        """The oldest deposit number of lane s that is still visible."""
        w = self.w
        lo = w[self.lanes[s] + _HEAD] - RING
        for i in self.marks_of[s]:
            m = w[i]
            if m > lo:
                lo = m
        return lo if lo > 0 else 0

    def _open_visible(self, s: int) -> int:
        """Lane s's open token if it is visible (0 otherwise)."""
        w = self.w
        tok = w[self.lanes[s] + _OPEN]
        if tok:
            seq = w[self.lanes[s] + _OSEQ]
            for i in self.pcover_of[s]:
                if w[i] == seq:
                    return 0
        return tok

    def dirty_for(self, domain: int, classes: int = NCLASS) -> Seen | None:
        """The first visible token a guest of ``domain`` must not see, or None when the buffer
        is clean for it. ``classes``: only classes below it are in use (a shortcut). Written
        out flat: it runs at every VM entry (the S3 assertion)."""
        w = self.w
        plan = self._plans.get((domain, classes))
        if plan is None:        # per lane: what to read, and the class summaries d may not see
            plan = self._plans[(domain, classes)] = [
                (s, i_head, i_open, i_oseq, marks, covers, ring,
                 tuple(last + c for c in range(classes) if c == 0 or c != domain))
                for s, i_head, i_open, i_oseq, marks, covers, last, ring in self._reads]
        for s, i_head, i_open, i_oseq, marks, covers, ring, foreign in plan:
            tok = w[i_open]
            if tok and is_leak(tok, domain):
                seq = w[i_oseq]
                for i in covers:
                    if w[i] == seq:
                        break
                else:
                    return Seen(s, tok)
            lo = w[i_head] - RING
            for i in marks:
                m = w[i]
                if m > lo:
                    lo = m
            for i in foreign:
                n = w[i]
                if n > lo:
                    return Seen(s, w[ring + ((n - 1) & _MASK)])
        return None

    def visible(self) -> list[Seen]:
        """Every token a reader on this core would see now, per lane oldest first."""
        w, out = self.w, []
        for s in range(self.nlanes):
            ring = self.lanes[s] + _RING
            for n in range(self._low(s), w[self.lanes[s] + _HEAD]):
                tok = w[ring + (n & _MASK)]
                if tok:
                    out.append(Seen(s, tok))
            tok = self._open_visible(s)
            if tok:
                out.append(Seen(s, tok))
        return out

    def leaks(self, domain: int) -> list[Seen]:
        """Visible tokens a guest of ``domain`` must not see."""
        return [x for x in self.visible() if is_leak(x.token, domain)]

    @property
    def lanes_span(self) -> tuple[int, int]:
        """(first word index, number of words) of this core's lanes in the region: what a
        real guest copies to see the buffer (asirt.kvm.real)."""
        return self.lanes[0], self.nlanes * _LANE_WORDS

    def rebased(self, base: int) -> list[tuple]:
        """:meth:`new_leaks`'s reads for a copy of the words from region word ``base`` on."""
        return [(r[0], *(i - base for i in r[1:4]), tuple(i - base for i in r[4]),
                 tuple(i - base for i in r[5]), r[6] - base, r[7] - base) for r in self._reads]

    def new_leaks(self, domain: int, w=None, reads: list[tuple] | None = None) -> list[Seen]:
        """Like :meth:`leaks`, but each deposit and each period is reported once: only what
        became visible since this reader's last call (a period seen while open is not counted
        again for the token it leaves when it ends). What a guest's repeated sampling counts:
        a leak per thing seen, not per look at it. Written out flat, a lane with nothing new
        costs two loads: it runs at the end of every guest slice. ``w`` and ``reads``: the
        words a real guest copied and :meth:`rebased` reads into them, instead of the
        region's."""
        out: list[Seen] = []
        if w is None:
            w, reads = self.w, self._reads
        if domain != self._seen_dom:         # what another domain saw is news to this one
            self._seen_dom = domain
            self._seen_head = [0] * self.nlanes
            self._seen_open = [0] * self.nlanes
        seen_head, seen_open = self._seen_head, self._seen_open
        for s, i_head, i_open, i_oseq, marks, covers, _, ring in reads:
            head = w[i_head]
            lo = seen_head[s]
            if head != lo:
                seen_head[s] = head
                if head - RING > lo:
                    lo = head - RING
                for i in marks:
                    m = w[i]
                    if m > lo:
                        lo = m
                reported = seen_open[s]          # its period, ended now: not again
                for n in range(lo, head):
                    tok = w[ring + (n & _MASK)]
                    if tok and tok != reported and is_leak(tok, domain):
                        out.append(Seen(s, tok))
            # The open period (a period's token carries its number: open_period). Read
            # between an open()'s two stores, the token is the ended period's and the number
            # the new one's: it is reported as visible, which it is (it went into the ring).
            tok = w[i_open]
            if tok and tok != seen_open[s]:
                seq = w[i_oseq]
                for i in covers:
                    if w[i] == seq:
                        break
                else:
                    seen_open[s] = tok
                    if is_leak(tok, domain):
                        out.append(Seen(s, tok))
        return out
