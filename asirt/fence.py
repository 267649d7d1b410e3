"""A full memory fence callable from Python (x86: orders earlier stores before later loads).

Python has no ``__sync_synchronize``. Where a protocol needs "store mine, then load yours"
(the TLB generation check, the checker's ``check_fence`` option), it calls :func:`fence`.
Imports nothing of asirt.
"""
from __future__ import annotations

import threading

# A full fence: acquiring an uncontended lock executes a LOCK-prefixed CAS (glibc sem_trywait
# behind CPython's lock), which orders earlier stores before later loads on x86. A signal
# handler may interrupt a fence mid-way; the next lock then serves it.
_FENCES = tuple(threading.Lock() for _ in range(4))
_try, _release = _FENCES[0].acquire, _FENCES[0].release


def fence() -> None:
    if _try(False):
        _release()
        return
    for lock in _FENCES[1:]:    # a handler interrupted a fence
        if lock.acquire(False):
            lock.release()
            return
    raise AssertionError("fence nested four deep")  # pragma: no cover
