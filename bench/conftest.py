"""The benchmarks get the tests' hooks and fixtures (tests/conftest.py): capability markers
such as ``requires_cpus`` skip, the ``region`` fixture, and the autouse leftover check (no
segment, semaphore or child process may outlive a benchmark)."""
from tests.conftest import no_leftovers, pytest_runtest_setup, region  # noqa: F401
