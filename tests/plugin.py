"""The hooks and fixtures every test and benchmark gets (loaded by the root conftest.py):
capability markers, strict settings, and the leftover check -- no /asirt-* segment or
semaphore and no child process may outlive a test or a benchmark (tests/leakcheck.py; the
check itself is tested in test_region.py). Region and CPU fixtures: tests/fixtures.py."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from shm_layout import Region, Section
from tests.leakcheck import children_left, leftovers_since, snapshot

# Property tests on a shared, loaded CI machine: no per-example deadline and no too_slow
# health check (both measure wall time, so load alone fails them), the same examples on
# every run (derandomize) and no example database written into the checkout. Explore with
# random examples by hand: ``python -m pytest --hypothesis-profile=default``.
settings.register_profile("asirt", deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("asirt")


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
    for _ in item.iter_markers("requires_kvm"):
        from asirt.kvm.vm import probe
        support = probe()
        if not support.usable:
            pytest.skip(f"needs KVM: {support.reason}")


@pytest.fixture(autouse=True)
def no_leftovers():
    before = snapshot()
    yield
    problems = children_left()      # first: what a killed child created now counts too
    problems += leftovers_since(before)
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
