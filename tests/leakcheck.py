"""The leftover checker: which /asirt-* segments and semaphores appeared during a test and
stayed. Only those made by this process, or by a creator that is gone (a child of the test),
count: other asirt runs on the same machine may legitimately hold their own."""
from __future__ import annotations

import os

from shm_layout.region import DEV_SHM, list_leftovers


def snapshot(dev_shm: str = DEV_SHM) -> set[str]:
    return {lo.path for lo in list_leftovers(dev_shm)}


def leftovers_since(before: set[str], dev_shm: str = DEV_SHM) -> list[str]:
    new = sorted(lo.path for lo in list_leftovers(dev_shm)
                 if lo.path not in before and (lo.creator_pid == os.getpid() or not lo.alive))
    return [f"left in {dev_shm}: {', '.join(new)}"] if new else []
