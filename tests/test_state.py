"""The state writer (asirt.cpu.state): the only writer of the mode word, its periods and taints;
and a check that it stays the only one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from asirt.cpu import ASI, GUEST, HOST, IDLE, STUNNED
from tests.fixtures import Background, cpu_region, make_cpus, make_stuns, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Recording(list):
    """A stand-in for the region's words that records every store, in order."""

    def __init__(self, words: memoryview) -> None:
        super().__init__()
        self.words = words

    def __getitem__(self, i: int) -> int:
        return self.words[i]

    def __setitem__(self, i: int, v: int) -> None:
        self.append((i, v))
        self.words[i] = v


def test_the_fast_wait_stores_what_stunned_stores_in_the_same_order():
    """poll_stun1 writes H2/H3 out for speed; it must be stunned() to the letter."""
    stores = {}
    for how in ("stunned", "poll"):
        with cpu_region(2) as r:
            a, b = make_stuns(r, 2)
            b.cpu.state.enter_guest()
            a.g += 1
            a.w[a.i_gen] = a.g                       # R1: a's request is pending at b
            st = b.cpu.state
            rec = Recording(st.w)
            st.w = rec
            if how == "stunned":
                b.acked[0] = a.g
                st.stunned([(b.my_ack_of[0], a.g)], b.park1)
            else:
                assert st.poll_stun1(b.s_gen[0], b.my_ack_of[0], b.acked, 0, b.park1, 1,
                                     lambda: False) is True
            st.w = rec.words
            stores[how] = list(rec)
            assert st.mode == STUNNED and b.acked[0] == a.g
    assert stores["poll"] == stores["stunned"]
    (i_mseq, s), (i_mode, m) = stores["poll"][:2]
    assert m == STUNNED and s % 2 == 1                # the seqlock opens, then the mode ...
    assert stores["poll"][2][1] % 2 == 1              # ... then the ack (an odd generation)


def test_the_fast_wait_ends_when_the_checkpoint_says_so():
    with cpu_region(2) as r:
        _, b = make_stuns(r, 2)
        b.cpu.state.enter_guest()
        calls = []

        def checkpoint():
            calls.append(1)
            return None if len(calls) < 3 else False
        assert b.cpu.state.poll_stun1(b.s_gen[0], b.my_ack_of[0], b.acked, 0, -1, 4,
                                      checkpoint) is False
        assert len(calls) == 3 and b.cpu.state.mode == GUEST


def test_periods_open_before_the_mode_shows_and_taint_when_they_end():
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2, domain=0)
        buf = b.buffer
        a.state.set(HOST, 0)
        assert buf.dirty_for(1) is not None          # open HOST period: visible at once
        assert not a.state.needs_flush(1)            # tainted only when it ends
        a.state.set(ASI, 1)
        assert a.state.needs_flush(1)
        a.state.flush(a.c("stun.flushes"))
        assert buf.dirty_for(1) is None and not a.state.needs_flush(1)
        assert buf.dirty_for(2) is not None          # its own ASI(1) period, for domain 2


def test_a_waiting_guest_parks_for_a_request_made_meanwhile():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        b.cpu.state.enter_guest()
        seen = Background(lambda: b.cpu.state.poll_stun1(
            b.s_gen[0], b.my_ack_of[0], b.acked, 0, -1, 64, lambda: None))
        a.g += 1
        a.w[a.i_gen] = a.g
        wait_until(lambda: a.w[a.s_ack_me[1]] == a.g, "b's ack")
        assert seen.result() is True and b.cpu.state.mode == STUNNED


# -- one writer of the mode word --------------------------------------------------------------

#: names of word indices of the published mode, domain and seqlock
_MODE_WORDS = ("i_mode", "s_mode", "i_dom", "s_dom", "i_mseq", "s_mseq", "imode", "im")


def _index_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _index_name(node.value)
    return ""


def mode_word_stores(path: Path) -> list[int]:
    """Lines of ``path`` that store into a word whose index names a mode/domain/seqlock word."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AugAssign) else [])
        for t in targets:
            if isinstance(t, ast.Subscript) and _index_name(t.slice) in _MODE_WORDS:
                out.append(node.lineno)
    return out


def test_only_the_state_writer_writes_the_mode_word():
    writers = {}
    for top in ("asirt", "workers"):
        for path in (ROOT / top).rglob("*.py"):
            lines = mode_word_stores(path)
            if lines:
                writers[str(path.relative_to(ROOT))] = lines
    assert set(writers) == {"asirt/cpu/state.py"}, writers


def test_the_one_writer_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(w, cpu):\n    w[cpu.i_mode] = 3\n")
    assert mode_word_stores(probe) == [2]


def test_modes_are_the_designs():
    assert (IDLE, HOST, ASI, GUEST, STUNNED) == (0, 1, 2, 3, 4)
    with pytest.raises(AssertionError):
        with cpu_region(1) as r:
            (a,) = make_cpus(r, 1)
            a.state.set_domain(2)                    # only in HOST
