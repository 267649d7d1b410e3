"""The C hardware floor: same bucketing as Python, and a real measurement between two CPUs."""
from __future__ import annotations

import os

import numpy as np
import pytest

from asirt import histogram
from asirt.cpu.wait import SPIN_LIMIT
from asirt.cfloor import CFloor, compiler

pytestmark = [pytest.mark.skipif(compiler() is None, reason="no C compiler"),
              pytest.mark.timeout(120)]


def test_c_buckets_like_python():
    values = [0, 1, 127, 128, 129, 255, 256, 1000, 12345, 10**6, 10**9, 2**40, 2**41, 2**50, -5]
    values += list(np.random.default_rng(1).integers(0, 2**42, 500))
    with CFloor() as floor:
        assert floor.bucket(values) == [histogram.bucket_index(int(v)) for v in values]


def test_c_spins_like_the_spin_transport():
    with CFloor() as floor:
        assert floor.spin_limit() == SPIN_LIMIT


@pytest.mark.multiprocess
def test_floor_measures_round_trips():
    cpus = sorted(os.sched_getaffinity(0))
    with CFloor() as floor:
        f = floor.measure(cpus[0], cpus[-1], 0.2)
    s = histogram.summarize(f.counts)
    assert s.count > 100 and 0 < s.p50 <= s.p99
