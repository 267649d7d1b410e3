"""The strategy comparison table of ``asirt bench kvm`` (from result.json's ``scenarios``), in
four blocks that each fit a 100-column terminal:

1. throughput and mechanisms: guest-time fraction (and its spread over ``--repeat``), relative
   to ``none``, VM entries per second per vCPU, exits handled without leaving the restricted
   space, stuns and flushes per second, time siblings spent stunned or forced idle;
2. security: what the strategy claims, leaks per second by kind (host data, another VM's
   data), S1-S3 violations (transition-time assertions and the monitor together), gadgets
   that reached memory, and the verdict;
3. latency: p50/p99 of exit handling, the stun round trip and the barrier wait, and the
   runtime's own overhead per cycle (``ovhd``: vm_cycle_overhead) with ``x ref`` against the
   spin pingpong of the same run;
4. where each lane's time goes, in percent: guest, handler work, halted (HLT), waiting for a
   stun's acks (``ackwt``), parked by a sibling's stun, flushing, the VM-entry barrier, forced
   idle, host tasks, idle, the checkers (transition assertions and the guest's buffer
   samples) and the rest (``other``: the runtime's own work).

A sweep (``--sweep``) repeats the blocks per swept value.
"""
from __future__ import annotations

from typing import Any

from asirt.results import fmt_ns, render

__all__ = ["format_strategies"]


def _pct(x: float | None, spread: dict[str, float] | None = None) -> str:
    if x is None:
        return "-"
    if spread and spread.get("stdev"):
        return f"{100 * x:.1f}±{100 * spread['stdev']:.1f}%"
    return f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100_000:
        return f"{x / 1000:,.0f}k"
    return f"{x:,.0f}"


def _verdict(s: dict[str, Any]) -> str:
    if s.get("failures"):
        return "FAILED"
    if s.get("problems"):
        return "NOT EARNED"
    if s["unsafe"]:
        return "UNSAFE"
    return "ok"


#: the time breakdown's columns: (result key, heading)
_TIME = (("guest", "guest"), ("handler", "work"), ("halted", "halt"),
         ("stun wait", "ackwt"), ("stunned", "parked"), ("flush", "flush"),
         ("barrier", "barrier"), ("forced idle", "forced"), ("host tasks", "host"),
         ("idle", "idle"), ("checks", "checks"), ("overhead", "other"))


def _blocks(group: list[dict[str, Any]]) -> list[str]:
    one, two, three, four = [], [], [], []
    for s in group:
        k, m = s["kvm"], s["metrics"]
        spread = k.get("spread", {})
        vs = k.get("guest_vs_none")
        one.append([s["strategy"], _pct(k["guest_fraction"], spread.get("guest_fraction")),
                    f"{vs:.2f}" if vs is not None else "-",
                    _num(k["entries_per_s_per_vcpu"]),
                    "-" if k["restricted_pct"] is None else f"{k['restricted_pct']:.0f}%",
                    _num(k["stuns_per_s"]), _num(k["flushes_per_s"]),
                    _pct(k["stunned_or_forced_idle"])])
        v = k["violations"]
        s1, s2 = v["check.s1"] + v["monitor.s1"], v["check.s2"] + v["monitor.s2"]
        two.append([s["strategy"], s.get("strategy_claims", "-"),
                    _num(k["leaks_per_s"]["host"]), _num(k["leaks_per_s"]["other_vm"]),
                    _num(s1), _num(s2), _num(v["check.s3"]),
                    f"{k['gadget_hits']}/{k['gadgets']}" if k["gadgets"] else "-",
                    _verdict(s)])
        ratio = (s.get("baseline") or {}).get("ratio_p50")

        def pp(name: str) -> list[str]:
            x = m.get(name) or {}
            return [fmt_ns(x.get("p50")), fmt_ns(x.get("p99"))] if x.get("count") else ["-", "-"]
        three.append([s["strategy"], *pp("exit_handling"), *pp("stun_roundtrip"),
                      *pp("barrier_wait"), fmt_ns((m.get("vm_cycle_overhead") or {}).get("p50")),
                      f"{ratio:.1f}" if ratio is not None else "-"])
        t = k.get("time") or {}
        four.append([s["strategy"], *(f"{100 * t[key]:.1f}" if key in t else "-"
                                      for key, _ in _TIME)])
    return [
        render(["strategy", "guest", "x none", "entries/s/vCPU", "restricted", "stuns/s",
                 "flushes/s", "stunned+forced idle"], one, range(1, 8)),
        render(["strategy", "claims safety", "leaks/s host", "leaks/s other VM", "S1", "S2",
                 "S3", "gadget hits", "verdict"], two, range(2, 8)),
        render(["strategy", "exit p50", "exit p99", "stun p50", "stun p99", "barrier p50",
                 "barrier p99", "ovhd p50", "x ref"], three, range(1, 9)),
        "where each lane's time goes (%):\n"
        + render(["strategy", *(h for _, h in _TIME)], four, range(1, len(_TIME) + 1)),
    ]


def _real_guest(group: list[dict[str, Any]]) -> str:
    """The header's next lines: why this guest, and for real vCPUs their exits (measured at
    each worker's start: the first entry's) and the kicks (of the strategy that kicked most)."""
    s = group[0]
    lines = [f"\nguest {s.get('guest')}: {s.get('guest_reason', '')}"[:200]]
    m = s.get("metrics", {})
    rt = (m.get("kvm_exit_roundtrip") or {}).get("p50")
    if rt:
        floor = s.get("kvm_floor") or {}
        ratio = floor.get("ratio_p50")
        kick = max(((e.get("metrics", {}).get("kick_to_exit") or {}) for e in group),
                   key=lambda k: k.get("count") or 0)
        lines.append(f"real exits: IO round trip p50 {fmt_ns(rt)}"
                     + (f" (C floor {fmt_ns(floor.get('p50_ns'))}, x ref {ratio:.2f})"
                        if ratio else f" (C floor: {floor.get('skipped', 'not measured')})"[:90])
                     + f", MMIO {fmt_ns((m.get('kvm_exit_mmio') or {}).get('p50'))}, HLT "
                     f"{fmt_ns((m.get('kvm_exit_hlt') or {}).get('p50'))}; kick to exit p50 "
                     f"{fmt_ns(kick.get('p50')) if kick.get('count') else '-'}")
    return "\n".join(lines)


def format_strategies(scenarios: list[dict[str, Any]]) -> str:
    """The comparison of the ``kvm`` entries of a result (module docstring)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in scenarios:
        sw = s.get("sweep")
        groups.setdefault(f"{sw['key']}={sw['value']:g}" if sw else "", []).append(s)
    out = []
    for label, group in groups.items():
        first = group[0]
        head = (f"profile {first.get('profile')}, {first.get('vms')} VMs, gadgets "
                f"{first.get('gadgets')}, guest {first.get('guest')}, cpus "
                f"{','.join(map(str, first['cpus']))}" + (f"  [{label}]" if label else ""))
        out.append(head + _real_guest(group))
        out += _blocks(group)
    return "\n\n".join(out)
