"""The stun handshake's published words, declared to its CPU's corruption guard
(asirt.cpu.guard): a sibling's generation and its acks of this CPU's requests are never
negative, and this CPU's own hold what its :class:`asirt.sync.stun.Stun` last wrote (``g``,
``acked``)."""
from __future__ import annotations

from asirt.cpu.guard import NO_LIMIT
from asirt.sync.stun import Stun
from shm_layout.cpu import Word

__all__ = ["declare"]


def declare(stun: Stun) -> None:
    guard, acked = stun.cpu.guard, stun.acked
    guard.declare(Word.GEN, stun.s_gen, 0, NO_LIMIT)
    guard.declare(Word.ACK, stun.s_ack_me, 0, NO_LIMIT)
    guard.mine(Word.GEN, stun.i_gen, lambda: stun.g)
    for k, i in enumerate(stun.my_ack_of):
        guard.mine(Word.ACK, i, lambda k=k: acked[k])
