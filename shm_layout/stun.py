"""Sections of the sibling-stun handshake, the VM-entry barriers, core scheduling and the
event ring that every checker writes to.

All fields are int64 so the hot paths read them through ``Region.words``; word indices come
from the dtypes (``Region.word_index``), never from hand-written offsets.

Writers, section by section (DESIGN.md: one writer per field, or a lock):

- ``stun_cpu[s]``: the CPU of slot ``s`` only. Block A (the first 128 bytes) holds what its
  siblings poll (``gen``, ``ack``, and the timestamps published with them); block B its
  mode seqlock and identity; the rest its counters, so bumping a counter never invalidates
  the line a sibling spins on.
- ``stun_buf[s]``: the CPU of slot ``s`` only: its deposit counters (what it has put into
  its core's buffer) and, per lane of its core, the deposit counters it saw at its last
  flush.
- ``stun_core[k]``: whoever holds core ``k``'s lock (the POSIX semaphore ``stuncore<k>``);
  ``rv_epoch`` and ``cs_seq`` are also read without the lock, as change notifications.
- ``stun_events[s]``: the worker of slot ``s`` only (monitor included): a ring of events.
"""
from __future__ import annotations

import enum

import numpy as np

from shm_layout.sections import ALIGN, MAX_SIBLINGS, register

I8 = "<i8"
#: security domains are 1..MAX_DOMAINS; 0 is the host (and an idle CPU's domain)
MAX_DOMAINS = 7
#: deposit classes of the core buffer: 0 = unrestricted-kernel (host) data, d = domain d
NCLASS = MAX_DOMAINS + 1
RING_ENTRIES = 64

#: per-CPU counters, in this order (stun_cpu.counters[i]); times are in ns
COUNTERS = (
    "transitions",      # mode changes
    "requests",         # stun requests issued (R1)
    "acks",             # requests of siblings acknowledged
    "parks",            # times this CPU parked (STUNNED)
    "ipis",             # deliveries sent (signals, semaphore posts)
    "aborts",           # requests given up (sibling unresponsive past give_up): released unused
    "timeouts",         # waits that ran past the ack timeout and checked liveness
    "fenced",           # siblings fenced off (dead, or stopped and killed)
    "slow",             # liveness checks that found the sibling alive: waited on
    "host_entries",
    "guest_entries",
    "barrier_tries",    # barrier checks run
    "barrier_busy",     # ... failed: a sibling requested, is in HOST (bail out, wait, re-check)
    "barrier_dom",      # ... failed: a sibling runs another domain
    "barrier_dirty",    # ... found the core buffer holding what the domain may not see
    "entry_flushes",    # flushes done by the barrier itself
    "flushes",          # flushes done on release (R6)
    "checks",           # transition-time assertions run
    "check_ns",         # ... and the time they took
    "v_s1",             # violations found by this worker's transition-time assertions
    "v_s2",
    "v_s3",
    "leaks",            # foreign tokens seen by this CPU's buffer sampling while in GUEST
    "exposed",          # naive: releases where a sibling had not parked when HOST was entered
    "rv_rounds",        # rendezvous rounds this CPU completed
    "forced_idle",      # core scheduling: times this CPU was forced idle
    "forced_idle_ns",
    "m_samples",        # monitor: consistent snapshots taken
    "m_retries",        # monitor: snapshots retried (a CPU changed mode while read)
    "m_s1",             # monitor: violations seen
    "m_s2",
    "m_ns",             # monitor: time spent sampling
)
COUNTER = {name: i for i, name in enumerate(COUNTERS)}
_NCOUNTERS = -(-len(COUNTERS) // 16) * 16

STUN_CPU_DTYPE = register("stun_cpu", np.dtype([
    # block A: polled by siblings
    ("gen", I8),                      # stun generation: odd = a request of this CPU is active
    ("ack", I8, (MAX_SIBLINGS,)),     # ack[j]: the generation of lane j this CPU acknowledged
    ("release_ns", I8),               # time of the last release (R7), for unstun_resume
    ("park_ns", I8),                  # time this CPU last parked, for naive's exposure_window
    ("host_ns", I8),                  # time this CPU last entered HOST ...
    ("host_gen", I8),                 # ... and the generation it entered it with
    ("_pad_a", I8, (3,)),
    # block B: identity and the mode seqlock
    ("mseq", I8),                     # odd while slots.mode/domain are being changed
    ("lane", I8),                     # index of this CPU in its core (the parent, at init)
    ("core", I8),                     # index of its core, -1 for none (parent, at init)
    ("cookie", I8),                   # core-scheduling cookie of the task it runs
    ("fenced", I8),                   # bit j: this CPU fenced lane j off (dead or stopped)
    ("phase", I8),                    # step label it is at (asirt.stun.Phase), for diagnosis
    ("heartbeat_ns", I8),             # last time it made progress
    ("_pad_b", I8, (9,)),
    ("counters", I8, (_NCOUNTERS,)),
]))
assert STUN_CPU_DTYPE.itemsize % ALIGN == 0
assert STUN_CPU_DTYPE.fields["mseq"][1] == ALIGN
assert STUN_CPU_DTYPE.fields["counters"][1] == 2 * ALIGN

STUN_BUF_DTYPE = register("stun_buf", np.dtype([
    ("dep", I8, (NCLASS,)),                   # deposit periods of each class: odd = depositing
    ("flushed", I8, (MAX_SIBLINGS, NCLASS)),  # dep of every lane as seen at this CPU's last flush
    ("_pad", I8, (8,)),
]))
assert STUN_BUF_DTYPE.itemsize % ALIGN == 0

STUN_CORE_DTYPE = register("stun_core", np.dtype([
    ("lock_pid", I8),       # pid holding the core lock, 0 when free (to name it on a timeout)
    ("nlanes", I8),         # the parent, at init
    ("rv_epoch", I8),       # rendezvous: bumped when every present sibling has arrived
    ("rv_arrived", I8),     # lanes waiting in the current round
    ("rv_dom", I8),         # domain of the current round
    ("rv_rounds", I8),
    ("cs_cookie", I8),      # core scheduling: the cookie the core runs (0 with cs_running 0)
    ("cs_running", I8),     # lanes running a task of cs_cookie
    ("cs_seq", I8),         # bumped on every change of the two above
    ("cs_want", I8),        # a cookie forced idle for longer than its patience: runs next
    ("cs_switches", I8),    # core cookie changes
    ("cs_want_lane", I8),   # the lane that set cs_want (its liveness is checked by waiters)
    ("_pad", I8, (4,)),
]))
assert STUN_CORE_DTYPE.itemsize == ALIGN

EVENT_FIELDS = ("ns", "kind", "slot", "other", "source", "a", "b", "c")
EVENT_DTYPE = np.dtype([(f, I8) for f in EVENT_FIELDS])
STUN_EVENTS_DTYPE = register("stun_events", np.dtype([
    ("head", I8),                       # events written so far; entry i is at i % RING_ENTRIES
    ("_pad", I8, (15,)),
    ("ev", EVENT_DTYPE, (RING_ENTRIES,)),
]))
assert STUN_EVENTS_DTYPE.itemsize % ALIGN == 0


class EventKind(enum.IntEnum):
    S1 = 1             # GUEST beside HOST
    S2 = 2             # GUEST(d) beside ASI/GUEST(e), e != d
    S3 = 3             # VM entry with a core buffer holding what the domain may not see
    LEAK = 4           # a guest's buffer sample found a foreign token
    TIMEOUT = 5        # a wait ran past its bound; a = where (Phase), b = ns waited, c = 1 if the
                       # CPU waited for was found dead or stopped, 0 alive (waited on)
    FENCE_DEAD = 6     # a sibling did not answer and is dead: fenced off
    FENCE_STOPPED = 7  # a sibling did not answer and is stopped: killed and fenced off
    ABORT = 8          # a request was given up and released unused
    STALL = 9          # liveness: a worker made no progress (written by the parent's report)


class Source(enum.IntEnum):
    """Which checker wrote an event."""
    TRANSITION = 1   # transition-time assertion in the worker
    MONITOR = 2      # the sampling monitor
    BUFFER = 3       # the buffer sampling (leaks hook)
    LIVENESS = 4     # timeout + liveness check


__all__ = ["MAX_DOMAINS", "NCLASS", "RING_ENTRIES", "COUNTERS", "COUNTER", "STUN_CPU_DTYPE",
           "STUN_BUF_DTYPE", "STUN_CORE_DTYPE", "STUN_EVENTS_DTYPE", "EVENT_DTYPE",
           "EVENT_FIELDS", "EventKind", "Source"]
