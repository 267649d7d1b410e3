"""Shared fixtures. Every test is checked for leftovers: no /asirt-* segment or semaphore
and no child process may outlive it (the check itself is tested in test_leakcheck.py)."""
from __future__ import annotations

import os

import psutil
import pytest

from shm_layout import Region, Section
from tests.leakcheck import leftovers_since, snapshot


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires_cpus"):
        need = mark.args[0]
        have = len(os.sched_getaffinity(0))
        if have < need:
            pytest.skip(f"needs {need} allowed CPUs, this process has {have}")
    for _ in item.iter_markers("requires_smt"):
        from asirt.topology import read_topology
        if not read_topology().smt:
            pytest.skip("needs real SMT siblings; this host has none")


@pytest.fixture(autouse=True)
def no_leftovers():
    before = snapshot()
    yield
    children = psutil.Process().children(recursive=True)
    for c in children:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)
    problems = leftovers_since(before)
    if children:
        problems.append(f"child processes outlived the test: {[c.pid for c in children]}")
    assert not problems, "; ".join(problems)


@pytest.fixture
def region():
    """A small region with the base sections; always closed and unlinked."""
    r = Region.create([Section("slots", 2), Section("cores", 1), Section("metrics", 1),
                       Section("hist", 2)])
    try:
        yield r
    finally:
        r.close()
        r.unlink()
