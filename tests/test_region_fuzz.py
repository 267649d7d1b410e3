"""Hostile segments: whatever bytes a segment holds, ``Region.attach`` maps it and validates it
or refuses it with an AsirtError (LayoutMismatch for a wrong layout) — never another
exception, a crash, a hang, or a section that reaches past the end of the mapping."""
from __future__ import annotations

import os
import secrets

import numpy as np
import posix_ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm_layout import AsirtError, HEADER_DTYPE, LayoutMismatch, Region, Section
from shm_layout.header import MAX_SECTIONS, SECTION_ENTRY_DTYPE

SECTIONS = [Section("slots", 2), Section("cores", 1), Section("metrics", 1), Section("hist", 2)]


def _valid_image() -> bytes:
    r = Region.create(SECTIONS)
    try:
        return bytes(memoryview(r._mmap))
    finally:
        r.close()
        r.unlink()


VALID = _valid_image()
HEADER_FIELDS = [n for n in HEADER_DTYPE.names if n not in ("sections", "_pad")]
ENTRY_FIELDS = [n for n in SECTION_ENTRY_DTYPE.names if n != "name"]
SECTIONS_OFFSET = HEADER_DTYPE.fields["sections"][1]


def _int_for(dtype: np.dtype) -> st.SearchStrategy[int]:
    info = np.iinfo(dtype)
    edges = [0, 1, 2, 3, 4, 5, 7, 128, 4096, len(VALID), len(VALID) - 128, len(VALID) + 128,
             HEADER_DTYPE.itemsize, MAX_SECTIONS, MAX_SECTIONS + 1, info.max, info.min,
             info.max // 2, 2**31, 2**32 - 1]
    return st.one_of(st.sampled_from([e for e in edges if info.min <= e <= info.max]),
                     st.integers(int(info.min), int(info.max)))


Edit = tuple  # ("header", field, value) | ("entry", i, field, value) | ("copy", j, k)


@st.composite
def edits(draw) -> tuple[list[Edit], int | None]:
    """What to do to a valid image (kept small so a failing example prints readably)."""
    out: list[Edit] = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(HEADER_FIELDS))
        out.append(("header", name, draw(_int_for(HEADER_DTYPE.fields[name][0]))))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, MAX_SECTIONS - 1))
        if draw(st.booleans()):
            out.append(("entry", i, "name", draw(st.binary(max_size=16))))  # non-UTF-8, NULs
        else:
            name = draw(st.sampled_from(ENTRY_FIELDS))
            out.append(("entry", i, name, draw(_int_for(SECTION_ENTRY_DTYPE.fields[name][0]))))
    if draw(st.booleans()):     # another entry's row: right names, wrong places
        out.append(("copy", draw(st.integers(0, 3)), draw(st.integers(0, 3))))
    return out, draw(st.one_of(st.none(), st.integers(0, len(VALID) + 4096)))


def _apply(recipe: tuple[list[Edit], int | None]) -> bytes:
    changes, cut = recipe
    image = bytearray(VALID)
    header = np.ndarray((), HEADER_DTYPE, buffer=image, offset=0)
    for change in changes:
        if change[0] == "header":
            header[change[1]] = change[2]
        elif change[0] == "entry":
            header["sections"][change[1]][change[2]] = change[3]
        else:
            header["sections"][change[1]] = header["sections"][change[2]].copy()
    del header
    data = bytes(image)
    if cut is not None:
        data = data[:cut] + b"\0" * max(0, cut - len(data))
    return data


def _segment(data: bytes, mode: int = 0o600) -> str:
    name = f"/asirt-{os.getpid()}-{secrets.token_hex(4)}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=len(data))
    try:
        if data:
            os.pwrite(shm.fd, data, 0)
    finally:
        shm.close_fd()
    return name


def _attach_checked(name: str, size: int) -> None:
    try:
        region = Region.attach(name)
    except AsirtError as err:
        assert str(err)              # a message, built from the fields
        return
    try:                              # accepted: every section lies inside the mapping
        for s in region._sections.values():
            assert 0 < s.offset and s.offset + s.nbytes <= size, s
            region.array(s.name)
    finally:
        region.close()


@settings(max_examples=400)
@given(edits())
def test_attach_refuses_hostile_segments_cleanly(recipe):
    data = _apply(recipe)
    name = _segment(data)
    try:
        _attach_checked(name, len(data))
    finally:
        posix_ipc.unlink_shared_memory(name)


@pytest.mark.parametrize("mutate,what", [
    (lambda h: h.__setitem__("magic", 0), "magic"),
    (lambda h: h.__setitem__("version", 0xFFFFFFFF), "layout version"),
    (lambda h: h.__setitem__("creator_uid", os.getuid() + 1), "creator uid"),
    (lambda h: h.__setitem__("nsections", 2**64 - 1), "section count"),
    (lambda h: h["sections"][0].__setitem__("count", 2**63), "section"),
    (lambda h: h["sections"][1].__setitem__("offset", 2**64 - 128), "section cores placement"),
    (lambda h: h["sections"][0].__setitem__("name", b"\xff\xfe\x80"), "section name"),
    (lambda h: h["sections"][1].__setitem__("name", b"slots"), "section"),   # twice
])
def test_each_lie_is_named(mutate, what):
    image = bytearray(VALID)
    mutate(np.ndarray((), HEADER_DTYPE, buffer=image, offset=0))
    name = _segment(bytes(image))
    try:
        with pytest.raises(LayoutMismatch) as info:
            Region.attach(name)
        assert info.value.what.startswith(what), info.value
    finally:
        posix_ipc.unlink_shared_memory(name)


@pytest.mark.parametrize("size", [0, 1, HEADER_DTYPE.itemsize - 1, HEADER_DTYPE.itemsize])
def test_truncated_segments_are_refused(size):
    name = _segment(VALID[:size])
    try:
        with pytest.raises(LayoutMismatch):
            Region.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_another_users_segment_is_refused():
    name = _segment(VALID)
    try:
        os.chown(f"/dev/shm/{name[1:]}", os.getuid() + 1, -1) if os.getuid() == 0 else None
        if os.getuid() != 0:
            pytest.skip("needs root to give a segment to another user")
        with pytest.raises(LayoutMismatch, match="owner uid"):
            Region.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_group_readable_segment_is_refused():
    name = _segment(VALID, mode=0o640)
    try:
        os.chmod(f"/dev/shm/{name[1:]}", 0o640)      # the umask may have narrowed it
        with pytest.raises(LayoutMismatch, match="mode"):
            Region.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


@pytest.mark.parametrize("name", ["/a\x00b", "", "/", "/a/b", "/" + "x" * 300, "no-slash",
                                  "/asirt-1-\udcff"])
def test_attach_refuses_bad_names(name):
    with pytest.raises(AsirtError):
        Region.attach(name)


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_attach_refuses_what_is_not_a_segment(kind, tmp_path):
    name = f"/asirt-{os.getpid()}-{secrets.token_hex(4)}"
    path = f"/dev/shm/{name[1:]}"
    {"directory": os.mkdir, "fifo": os.mkfifo,
     "symlink": lambda p: os.symlink("/proc/self/stat", p)}[kind](path)
    try:
        with pytest.raises(AsirtError):
            Region.attach(name)
    finally:
        (os.rmdir if kind == "directory" else os.unlink)(path)
