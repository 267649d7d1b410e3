"""The leftover checker (conftest.py's autouse ``no_leftovers``; its own tests are in
test_region.py): which /asirt-* segments and semaphores appeared during a test and stayed,
and which child processes outlived it.

Only segments and semaphores made by this process, or by a creator that is gone (a child of
the test), count: other asirt runs on the same machine may legitimately hold their own.
"""
from __future__ import annotations

import os

import psutil

from shm_layout.region import DEV_SHM, list_leftovers


def snapshot(dev_shm: str = DEV_SHM) -> set[str]:
    return {lo.path for lo in list_leftovers(dev_shm)}


def leftovers_since(before: set[str], dev_shm: str = DEV_SHM) -> list[str]:
    new = sorted(f"{lo.path} ({lo.status.value}: {lo.why})" for lo in list_leftovers(dev_shm)
                 if lo.path not in before and (lo.creator_pid == os.getpid() or not lo.alive))
    return [f"left in {dev_shm}: {', '.join(new)}"] if new else []


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} ({' '.join(p.cmdline())[:60] or p.name()})"
    except psutil.Error:            # gone or a zombie meanwhile: the pid is all there is
        return str(p.pid)


def children_left(timeout_s: float = 5.0) -> list[str]:
    """Kill and reap every descendant of this process that is still there (a zombie that
    nobody waited for included), and name them: a test must reap what it starts."""
    children = psutil.Process().children(recursive=True)
    if not children:
        return []
    names = [_describe(c) for c in children]
    for c in children:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    problems = [f"child processes outlived the test: {', '.join(names)}"]
    if alive:
        problems.append(f"could not kill them in {timeout_s}s: {[p.pid for p in alive]}")
    return problems
