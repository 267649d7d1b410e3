"""Sections of sibling synchronization: the stun handshake and each core's shared record (core
lock, Xen-style rendezvous, core scheduling).

All fields are int64, read on hot paths through ``Region.words``; word indices come from the
dtypes (``Region.word_index``).

Writers (DESIGN.md: one writer per field, or a lock):

- ``stun_cpu[s]``: the CPU of slot ``s`` only. Its first 128 bytes hold what its siblings
  poll (``gen``, ``ack``) and the timestamps published with them.
- ``core_sync[k]``: whoever holds core ``k``'s lock (the POSIX semaphore ``corelock<k>``);
  ``rv_epoch`` and ``cs_seq`` are also read without the lock, as change notifications;
  ``nlanes`` by the parent at init.
"""
from __future__ import annotations

import numpy as np

from shm_layout.sections import ALIGN, MAX_SIBLINGS, register

I8 = "<i8"

STUN_CPU_DTYPE = register("stun_cpu", np.dtype([
    ("gen", I8),                      # stun generation: odd = a request of this CPU is active
    ("ack", I8, (MAX_SIBLINGS,)),     # ack[j]: the generation of lane j this CPU acknowledged
    ("release_ns", I8),               # time of the last release (R7), for unstun_resume
    ("park_ns", I8),                  # time this CPU last parked, for naive's exposure_window
    ("host_ns", I8),                  # time this CPU last entered HOST ...
    ("host_gen", I8),                 # ... and the generation it entered it with
    ("kick_ns", I8),                  # time this CPU last sent a kick (a real vCPU's stun)
    ("vcpu_tid", I8),                 # the thread running this CPU's real vCPU (0: none)
    ("_pad", I8, (1,)),
]))
assert STUN_CPU_DTYPE.itemsize == ALIGN

CORE_SYNC_DTYPE = register("core_sync", np.dtype([
    ("lock_pid", I8),       # pid holding the core lock, 0 when free (to name it on a timeout)
    ("lock_seq", I8),       # bumped on every acquisition (a take-over names the holding it broke)
    ("nlanes", I8),         # the parent, at init
    ("rv_epoch", I8),       # rendezvous: bumped when every present sibling has arrived
    ("rv_arrived", I8),     # lanes waiting in the current round
    ("rv_dom", I8),         # domain of the current round
    ("rv_rounds", I8),
    ("cs_cookie", I8),      # core scheduling: the cookie the core runs (0 with cs_running 0)
    ("cs_running", I8),     # lanes running a task of cs_cookie
    ("cs_seq", I8),         # bumped on every change of the two above
    ("cs_want", I8),        # a cookie forced idle past its patience runs next (as cookie + 1)
    ("cs_switches", I8),    # core cookie changes
    ("cs_want_lane", I8),   # the lane that set cs_want (its liveness is checked by waiters)
    ("cookie", I8, (MAX_SIBLINGS,)),   # the cookie each lane's task runs with (lane-written)
    ("_pad", I8, (11,)),
]))
assert CORE_SYNC_DTYPE.itemsize % ALIGN == 0

__all__ = ["STUN_CPU_DTYPE", "CORE_SYNC_DTYPE"]
