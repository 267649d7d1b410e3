"""Typed parameters of every worker role, one default per knob, and their JSON codec.

The parent builds a frozen dataclass per worker, the orchestrator passes it on the worker's
command line as JSON (:func:`encode`), and the worker's program decodes it with
:func:`decode`, which refuses unknown keys and wrong types: a parameter a worker does not
know is a bug, never silently ignored. Each knob's default is written here once; the
mechanisms take these objects, not loose dictionaries.

Imports nothing of asirt's layers (every layer and both sides of the process boundary use it).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["CpuParams", "DelayParams", "PingpongParams", "StunBenchParams", "StressParams",
           "CoreschedParams", "MonitorParams", "AsiBenchParams", "KvmParams", "encode", "decode",
           "to_dict"]

T = TypeVar("T")


@dataclass(frozen=True)
class CpuParams:
    """What every pinned CPU needs (asirt.cpu)."""
    transport: str = "spin"                # spin | signal | sem
    #: more spinning workers than CPUs: yield after a few polls (None: the orchestrator's
    #: decision for the whole run, asirt.orchestrator.oversubscribed)
    oversubscribed: bool | None = None
    ack_timeout_ms: float = 50.0           # past this a wait checks the liveness of whom it waits for
    give_up_ms: float = 5000.0             # a request unacknowledged by a live sibling: abort it
    check: bool = True                     # transition-time assertions (asirt.cpu.checks)
    check_fence: bool = False              # ... with a real fence before their loads
    stonith: bool = True                   # kill a sibling that stays stopped, then fence it
    domains: int = 7                       # security domains in use, 1..domains (the S3 check
                                           # looks at the buffer's classes of these only)
    kick: bool = False                     # siblings run real vCPUs: a request kicks those in
                                           # GUEST out of guest mode (asirt.sync.stun)


@dataclass(frozen=True)
class DelayParams:
    """Injected delays at every protocol step (asirt stress): maybe yield, maybe sleep."""
    p_yield: float = 0.2
    p_sleep: float = 0.01
    max_sleep_us: float = 100.0


@dataclass(frozen=True)
class PingpongParams:
    side: str                              # ping | pong
    peer: int                              # the other side's slot
    transport: str = "spin"


@dataclass(frozen=True)
class StunBenchParams:
    """``asirt bench stun``: the siblings of a core take turns as the requester."""
    cpu: CpuParams = field(default_factory=CpuParams)
    protocol: str = "strict"
    barrier: str = "spin"                  # spin | rendezvous
    slice_ms: float = 20.0                 # each lane's turn as the requester
    gap_us: float = 2000.0                 # the most a requester waits for its siblings' re-entry


@dataclass(frozen=True)
class StressParams:
    """``asirt stress``: a seeded random walk over the handshake's transitions."""
    cpu: CpuParams = field(default_factory=CpuParams)
    protocol: str = "strict"
    barrier: str = "spin"
    seed: int = 1
    delays: DelayParams | None = field(default_factory=DelayParams)
    transitions: int = 0                   # this worker's share; 0: until stopped
    ndomains: int = 2
    leak_sample_every: int = 4             # guest entries between buffer samples
    fault_delay_at: int = 0                # the injected delay fault: at this sensitive section,
    fault_delay_s: float = 0.0             # ... sleep this long inside HOST (0: none)


@dataclass(frozen=True)
class CoreschedParams:
    """User-level core scheduling alone: tasks of ``cookies`` shown as GUEST(cookie)."""
    cpu: CpuParams = field(default_factory=CpuParams)
    seed: int = 1
    delays: DelayParams | None = field(default_factory=DelayParams)
    cookies: tuple[int, ...] = (1, 2)
    enforce: bool = True
    patience_us: float = 2000.0


@dataclass(frozen=True)
class MonitorParams:
    cores: tuple[tuple[int, ...], ...]     # slots of each core's lanes
    interval_us: float = 0.0               # 0: yield after every sample


@dataclass(frozen=True)
class KvmParams:
    """``asirt bench kvm``: one lane of the vCPU loop (asirt.kvm.loop) under one strategy."""
    cpu: CpuParams = field(default_factory=CpuParams)
    strategy: str = "none"
    profile_toml: str = ""                 # the exit profile, as TOML (asirt.kvm.profile)
    seed: int = 1
    gadgets: float = 0.0                   # probability an exit's handler touches a secret
    vms: int = 2                           # VMs 1..vms; every lane has one vCPU of each
    tick_ms: float = 2.0                   # the scheduler's tick: vCPU switches, host tasks
    host_share: float = 0.05               # share of ticks running a host task
    stun_at: str = "hooks"                 # ASI strategies: stun in the hooks | at every exit
    interrupts: str = "stay"               # ASI strategies: interrupts stay restricted | exit
    draws: int = 1 << 15                   # profile draws made up front (then cycled)
    guest: str = "emulated"                # the guest backend: emulated | kvm
    # -- asirt stress --strategy: the loop under injected delays and faults --------------------
    delays: DelayParams | None = None      # injected delays at every protocol step
    shootdowns: float = 0.0                # per exit (ASI strategies): unmap a VM-local page
                                           # while siblings walk, then map it again
    audit: bool = False                    # audit its own published words every cycle
    fault_delay_at: int = 0                # the delay fault: at this sensitive section,
    fault_delay_s: float = 0.0             # ... sleep this long inside HOST (0: none)


@dataclass(frozen=True)
class AsiBenchParams:
    """``asirt bench asi``: one vCPU of one VM (``domain``) on every CPU."""
    cpu: CpuParams = field(default_factory=CpuParams)
    domain: int = 1


# -- the codec ----------------------------------------------------------------------------------

def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def encode(params: Any) -> str:
    """The JSON of a parameter dataclass, tagged with its class name."""
    return json.dumps({"type": type(params).__name__, "params": to_dict(params)})


def decode(cls: type[T], text: str | dict[str, Any]) -> T:
    """The ``cls`` that :func:`encode` wrote (refusing another class, unknown keys, wrong types)."""
    data = json.loads(text) if isinstance(text, str) else text
    if data.get("type") != cls.__name__:
        raise ValueError(f"parameters of type {data.get('type')!r}, expected {cls.__name__}")
    return _build(cls, data["params"], cls.__name__)


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _value(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _value(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, list):
            raise ValueError(f"{where}: expected a list, got {type(v).__name__}")
        inner = args[0]
        return tuple(_value(inner, x, where) for x in v)
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool) and (type(v) is not tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {v!r}")
    return v
