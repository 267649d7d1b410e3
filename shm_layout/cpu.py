"""Sections of one pinned CPU: its published state, its core's micro-architectural buffer, its
event ring; and the tokens the buffer holds.

All fields are int64 so the hot paths read them through ``Region.words``; word indices come
from the dtypes (``Region.word_index``), never from hand-written offsets.

Writers, section by section (DESIGN.md: one writer per field):

- ``cpu_state[s]``: the CPU of slot ``s`` only, except ``core`` and ``lane`` (the parent, at
  init). Block A (the first 128 bytes) holds what others poll: the mode seqlock ``mseq``
  (odd while ``slots.mode``/``slots.domain`` change), ``fenced`` and ``phase``; block B its
  taints and its per-lane count of waits on a live sibling; the rest its counters (names in :mod:`shm_layout.counters`), so bumping a counter
  never invalidates a line a sibling spins on.
- ``core_buf[k]``: ``l1d_bytes`` and ``nlanes`` by the parent at init; ``lanes[s]`` by the
  CPU in lane ``s`` of core ``k`` only.
- ``cpu_events[s]``: the worker of slot ``s`` only (the monitor included): a ring of events.
"""
from __future__ import annotations

import enum

import numpy as np

from shm_layout.counters import NCOUNTERS
from shm_layout.sections import ALIGN, MAX_SIBLINGS, register

I8 = "<i8"
#: security domains are 1..MAX_DOMAINS; 0 is the host (and an idle CPU's domain)
MAX_DOMAINS = 7
#: tokens remembered per lane of a core's buffer (older ones are overwritten: a token can be
#: lost, never invented)
RING = 64
EVENTS = 64

CPU_STATE_DTYPE = register("cpu_state", np.dtype([
    # block A: polled by siblings and the monitor
    ("mseq", I8),                 # odd while slots.mode/domain are being changed
    ("fenced", I8),               # bit j: this CPU fenced lane j of its core off (dead)
    ("phase", I8),                # where it waits (Phase), for diagnosis and liveness
    ("heartbeat_ns", I8),         # last time it published progress
    ("core", I8),                 # index of its core, -1 for none (the parent, at init)
    ("lane", I8),                 # its lane in that core (the parent, at init)
    ("_pad_a", I8, (10,)),
    # block B: the flush bookkeeping the protocols decide with (asirt.cpu.state.Taint)
    ("taint", I8),
    ("taint_dom", I8),            # the domain whose local data TAINT_GUEST refers to
    # ... and, rarely written: liveness checks of a wait that found lane j alive and waited
    # on (what tells a slow sibling from a dead one, per lane: asirt stress's delay fault)
    ("alive_waits", I8, (MAX_SIBLINGS,)),
    ("_pad_b", I8, (6,)),
    ("counters", I8, (NCOUNTERS,)),
]))
assert CPU_STATE_DTYPE.fields["taint"][1] == ALIGN
assert CPU_STATE_DTYPE.fields["counters"][1] == 2 * ALIGN
assert CPU_STATE_DTYPE.itemsize % ALIGN == 0

#: classes of the buffer's per-class summary: 0 = sensitive data (any owner), d = domain d's
#: local data
NCLASS = MAX_DOMAINS + 1

# One lane of a core's buffer: what the CPU in that lane deposited, and what it flushed.
LANE_DTYPE = np.dtype([
    ("ring", I8, (RING,)),                 # tokens; entry i holds deposit number i % RING
    ("head", I8),                          # deposits so far
    ("open_tok", I8),                      # token of the period open now (0: none)
    ("open_seq", I8),                      # periods opened so far
    ("last", I8, (NCLASS,)),               # 1 + the deposit number of the last token per class
    ("_pad0", I8, (5,)),
    ("marks", I8, (MAX_SIBLINGS,)),        # head of each lane as this CPU saw it at its flush
    ("pcover", I8, (MAX_SIBLINGS,)),       # open_seq of each *fenced* lane at this CPU's flush
])
assert LANE_DTYPE.fields["head"][1] == RING * 8
assert LANE_DTYPE.fields["marks"][1] % ALIGN == 0           # marks on their own block
assert LANE_DTYPE.itemsize % ALIGN == 0

CORE_BUF_DTYPE = register("core_buf", np.dtype([
    ("l1d_bytes", I8),
    ("nlanes", I8),
    ("_pad", I8, (14,)),
    ("lanes", LANE_DTYPE, (MAX_SIBLINGS,)),
]))
assert CORE_BUF_DTYPE.fields["lanes"][1] == ALIGN

EVENT_FIELDS = ("ns", "kind", "slot", "other", "source", "a", "b", "c")
EVENT_DTYPE = np.dtype([(f, I8) for f in EVENT_FIELDS])
CPU_EVENTS_DTYPE = register("cpu_events", np.dtype([
    ("head", I8),                       # events written so far; entry i is at i % EVENTS
    ("_pad", I8, (15,)),
    ("ev", EVENT_DTYPE, (EVENTS,)),
]))
assert CPU_EVENTS_DTYPE.itemsize % ALIGN == 0


class Phase(enum.IntEnum):
    """Where a CPU is (``cpu_state.phase``; also what a TIMEOUT event waited in)."""
    MAIN = 0
    PARK = 1        # P1: parked, waiting for the requesters to release
    REQUEST = 2     # R2: waiting for acks
    HOST = 3
    BARRIER = 4     # waiting for a sibling's state to change before re-checking
    GUEST = 5
    IDLE = 6
    RENDEZVOUS = 7
    CORESCHED = 8   # forced idle, waiting for the core's cookie
    LOCK = 9        # waiting for the core lock
    FINISHED = 10   # done with its own work; idle, answering requests until its siblings are
    SHOOTDOWN = 11  # waiting for the CPUs inside an ASI instance to flush their TLBs


class EventKind(enum.IntEnum):
    S1 = 1             # GUEST beside HOST
    S2 = 2             # GUEST(d) beside ASI/GUEST(e), e != d
    S3 = 3             # VM entry with a core buffer holding what the domain may not see
    LEAK = 4           # a guest's buffer sample found a foreign token
    TIMEOUT = 5        # a wait ran past its bound; a = where (Phase), b = ns waited, c = 1 if the
                       # CPU waited for was found dead or stopped, 0 alive (waited on)
    FENCE_DEAD = 6     # a sibling did not answer and is dead: fenced off
    FENCE_STOPPED = 7  # a sibling did not answer and stayed stopped: killed, then fenced off
    ABORT = 8          # a request was given up and released unused
    STALL = 9          # liveness: a worker made no progress (written by the parent's report)
    CORRUPT = 10       # a published word held what its writer never wrote: other = the slot
                       # it belongs to, a = which word (Word), b = the value read, c = 1 when
                       # its own CPU found it (it differs from what it wrote), 0 a reader
                       # (out of range)
    FENCE_CORRUPT = 11 # a sibling's published words are corrupt: killed, then fenced off


class Word(enum.IntEnum):
    """Which published word a CORRUPT event is about."""
    MODE = 1          # slots.mode: not a Mode
    DOMAIN = 2        # slots.domain: not 0..MAX_DOMAINS
    MSEQ = 3          # cpu_state.mseq: negative
    GEN = 4           # stun_cpu.gen: negative
    ACK = 5           # stun_cpu.ack[j]: negative
    HIST = 6          # a histogram: a negative count, or counts that disagree with its samples
    FENCED = 7        # cpu_state.fenced: not a mask of the core's lanes


class Source(enum.IntEnum):
    """Which checker wrote an event."""
    TRANSITION = 1   # transition-time assertion in the worker
    MONITOR = 2      # the sampling monitor
    BUFFER = 3       # the guest's sampling of the core buffer
    LIVENESS = 4     # timeout + liveness check


# -- tokens -----------------------------------------------------------------------------------
# A token names what a load put into the buffer: a memory class, an owner domain and a frame.
# Mode periods deposit tokens whose frame field has its top bit set (PERIOD_BIT) and carries
# the period's number in the lane (its open_seq, mod 2**31), so the token a period leaves when
# it ends is known to be the one it showed while open: HOST deposits host (sensitive) data,
# ASI(d)/GUEST(d) domain d's local data. Frame numbers of real frames stay below PERIOD_BIT.

class MemClass(enum.IntEnum):
    FREE = 0
    SENSITIVE = 1
    GLOBAL = 2       # globally non-sensitive
    LOCAL = 3        # locally non-sensitive, one owner domain


OWNER_BITS = 24
FRAME_BITS = 32
CLASS_SHIFT = OWNER_BITS + FRAME_BITS
OWNER_MASK = (1 << OWNER_BITS) - 1      # of ``token >> FRAME_BITS``
FRAME_MASK = (1 << FRAME_BITS) - 1
PERIOD_BIT = 1 << (FRAME_BITS - 1)      # a mode period's deposits, not a frame's
_SENS, _LOCAL = int(1), int(3)           # MemClass.SENSITIVE, MemClass.LOCAL as plain ints


def make_token(cls: int, owner: int, pfn: int) -> int:
    """The token of a frame: non-zero for sensitive and local frames, 0 for global and free."""
    if cls != _SENS and cls != _LOCAL:
        return 0
    return (int(cls) << CLASS_SHIFT) | (owner << FRAME_BITS) | pfn


def token_class(token: int) -> int:
    return token >> CLASS_SHIFT


def token_owner(token: int) -> int:
    return (token >> FRAME_BITS) & OWNER_MASK


def token_frame(token: int) -> int:
    return token & FRAME_MASK


#: the token class of each period (0: HOST, d: domain d), without its number
PERIOD_BASE = tuple([(_SENS << CLASS_SHIFT) | PERIOD_BIT]
                    + [(_LOCAL << CLASS_SHIFT) | (d << FRAME_BITS) | PERIOD_BIT
                       for d in range(1, MAX_DOMAINS + 1)])


def period_token(domain: int, seq: int = 0) -> int:
    """What a mode period deposits: host data (domain 0, HOST) or domain d's local data; ``seq``
    is the period's number in its lane."""
    return PERIOD_BASE[domain] | (seq & (PERIOD_BIT - 1))


def is_period(token: int) -> bool:
    return bool(token & PERIOD_BIT)


def token_cls_index(token: int) -> int:
    """The class a token counts as in a lane's ``last`` summary: 0 sensitive, d local(d)."""
    if token >> CLASS_SHIFT == _SENS:
        return 0
    return (token >> FRAME_BITS) & OWNER_MASK


def is_leak(token: int, domain: int) -> bool:
    """Whether a guest of ``domain`` seeing ``token`` is a leak: any sensitive token, or another
    domain's local one."""
    cls = token >> CLASS_SHIFT
    return cls == _SENS or (cls == _LOCAL and (token >> FRAME_BITS) & OWNER_MASK != domain)


def describe_token(token: int) -> str:
    cls, owner, frame = token_class(token), token_owner(token), token_frame(token)
    what = "host data" if cls == MemClass.SENSITIVE and owner == 0 else (
        f"sensitive({owner})" if cls == MemClass.SENSITIVE else f"local data of domain {owner}")
    return f"{what}, {'a mode period' if is_period(token) else f'frame {frame}'}"


__all__ = ["MAX_DOMAINS", "NCLASS", "RING", "EVENTS", "CPU_STATE_DTYPE", "LANE_DTYPE", "CORE_BUF_DTYPE",
           "EVENT_FIELDS", "EVENT_DTYPE", "CPU_EVENTS_DTYPE", "Phase", "EventKind", "Word", "Source",
           "MemClass", "make_token", "token_class", "token_owner", "token_frame",
           "period_token", "is_period", "token_cls_index", "is_leak", "describe_token",
           "PERIOD_BIT", "PERIOD_BASE"]
