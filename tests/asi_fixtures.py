"""Regions with the ASI sections, and per-CPU handles on them, that always clean up.

``asi_region()`` is a context manager (usable inside hypothesis examples, where function
fixtures are not); the fixtures below wrap it. Importing this module registers the ASI
sections (shm_layout.asi).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

import shm_layout.asi  # noqa: F401  (registers the ASI sections)
from asirt import asi_scenario, uarch
from asirt.asi import Asi, setup
from shm_layout import Region, Section

L1D = 32 * 1024


@contextlib.contextmanager
def asi_region(ncpus: int = 2, frames: int = 64, tables: int = 64,
               cores: list[list[int]] | None = None) -> Iterator[Region]:
    """A region with slots + the ASI sections, set up (lock, full tree, template, cores)."""
    cores = [list(range(ncpus))] if cores is None else cores
    params = {"asi_frames": frames, "asi_tables": tables}
    region = Region.create([Section("slots", ncpus),
                            *asi_scenario.sections(ncpus, len(cores), params)])
    try:
        setup(region, cores)
        uarch.setup(region, cores, L1D)
        yield region
    finally:
        region.close()
        region.unlink()


@contextlib.contextmanager
def handles(region: Region, *cpus: int) -> Iterator[list[Asi]]:
    """One online Asi per CPU slot (all in this process), closed afterwards."""
    out: list[Asi] = []
    try:
        for c in cpus:
            a = Asi(region, c)
            out.append(a)
            a.online()
        yield out
    finally:
        for a in out:
            a.close()


@pytest.fixture
def aregion() -> Iterator[Region]:
    with asi_region() as r:
        yield r


@pytest.fixture
def kernel(aregion: Region) -> Iterator[Asi]:
    """The parent's handle (no CPU): allocation, instances, checks."""
    a = Asi(aregion)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def cpu0(aregion: Region) -> Iterator[Asi]:
    with handles(aregion, 0) as (a,):
        yield a


@pytest.fixture
def cpu1(aregion: Region) -> Iterator[Asi]:
    with handles(aregion, 1) as (a,):
        yield a
