"""Parent side: the scenarios a run is made of, in one shape, and their registry.

A :class:`Scenario` turns a topology and :class:`Options` into entries; each entry is one
orchestrator run (a fresh region, fresh pinned workers) whose merged histograms, counters and
events become an :class:`asirt.results.Entry`. ``count`` says how many entries ``run`` will
yield (for the progress line).

Layering: scenarios import the orchestrator, results and every layer below; the workers never
import them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

from asirt.cpu.transport import TRANSPORTS
from asirt.errors import BadInput
from asirt.kvm import strategy as strategies
from asirt.params import CpuParams, KvmParams
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.topology import Topology

__all__ = ["Scenario", "Options", "KvmOptions", "SCENARIOS", "DEFAULT_SCENARIO",
           "parse_choices"]

DEFAULT_SCENARIO = "kvm"


@dataclass(frozen=True)
class KvmOptions:
    """The knobs of the comparison (the CLI's ``bench kvm`` options)."""
    strategies: tuple[str, ...] = strategies.NAMES
    profile: str = "default"
    gadgets: float = KvmParams.gadgets
    vms: int = KvmParams.vms
    repeat: int = 1
    seed: int = KvmParams.seed
    tick_ms: float = KvmParams.tick_ms
    host_share: float = KvmParams.host_share
    stun_at: str = KvmParams.stun_at
    interrupts: str = KvmParams.interrupts
    transport: str = CpuParams.transport
    sweep: tuple[str, tuple[float, ...]] | None = None
    guest: str = "auto"                       # auto | kvm | emulated (asirt.scenarios.kvm)



@dataclass(frozen=True)
class Options:
    """What the command line chose, for every scenario (each reads what applies to it)."""
    transports: tuple[str, ...] = TRANSPORTS
    duration_s: float = 2.0
    floor: bool = True                          # also measure the reference (C floor, pingpong)
    protocols: tuple[str, ...] = ("strict", "naive")   # stun handshake variants
    kvm: KvmOptions = field(default_factory=KvmOptions)


class Scenario(NamedTuple):
    help: str
    count: Callable[[Topology, Options], int]     # entries it will produce (for progress)
    run: Callable[[Topology, Options, ProgressLine | None], Iterator[Entry]]


def parse_choices(text: str, valid: Sequence[str], option: str) -> list[str]:
    """``"spin,sem"`` -> ["spin", "sem"], refusing anything not in ``valid``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if bad or not items:
        raise BadInput(f"{option} {text!r}", f"unknown value {bad[0]!r}" if bad else "is empty",
                       f"choose from {', '.join(valid)} (comma-separated)")
    return list(dict.fromkeys(items))


def _registry() -> dict[str, Scenario]:
    from asirt.scenarios import asi, kvm, pingpong, stun
    return {
        "kvm": Scenario("the KVM vCPU workload under each mitigation strategy, side by side",
                        kvm.count, kvm.run),
        "pingpong": Scenario("raw round trip of each IPI-like transport per CPU pair",
                             pingpong.count, pingpong.run),
        "stun": Scenario("strict and naive sibling stun round trips, unstun and VM-entry barrier",
                         stun.count, stun.run_scenario),
        "asi": Scenario("page walks, asi_exit/enter, faults, flushes and shootdowns on every CPU",
                        asi.count, asi.run),
    }


SCENARIOS: dict[str, Scenario] = _registry()
