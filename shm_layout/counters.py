"""The per-CPU counters every mechanism publishes (``cpu_state.counters``), by name.

Names are namespaced by the mechanism that counts them (``stun.flushes`` are the flushes the
stun handshake asked for, ``asi.flushes`` those asi_enter asked for; ``buffer.flushes`` are
the flushes the core buffer actually did, whoever asked). The index of a name is its place in
:data:`COUNTERS`: part of the region's ABI, so the section's dtype depends on the count.
Times are in ns.
"""
from __future__ import annotations

COUNTERS = (
    # the CPU itself (asirt.cpu)
    "cpu.transitions",      # mode changes
    "cpu.host_entries",
    "cpu.guest_entries",
    "cpu.timeouts",         # waits that ran past the ack timeout and checked liveness
    "cpu.slow",             # ... and found the CPU waited for alive: waited on
    "cpu.fenced",           # siblings fenced off (dead, or stopped and killed)
    "cpu.ipis",             # deliveries sent (signals, semaphore posts)
    "buffer.flushes",       # flushes of the core buffer, for any reason
    "buffer.flush_ns",      # ... and the time they took (the L1D-sized eviction)
    "buffer.deposits",      # tokens deposited by loads (mode periods not included)
    # the checkers (evidence, independent of the protocols' bookkeeping)
    "check.checks",         # transition-time assertions run
    "check.ns",             # ... and the time they took
    "check.s1",             # violations found by this worker's transition-time assertions
    "check.s2",
    "check.s3",
    "check.samples",        # buffer samples taken by this CPU's guest
    "check.sample_ns",      # ... and the time they took
    "check.leaks",          # foreign tokens those samples saw
    "check.leak_host",      # ... of them host (sensitive) data
    "check.leak_domain",    # ... of them another domain's local data
    "check.corrupt",        # published words found holding what their writer never wrote
    "monitor.samples",      # consistent snapshots taken
    "monitor.retries",      # snapshots retried (a CPU changed mode while read)
    "monitor.s1",
    "monitor.s2",
    "monitor.ns",
    # the stun handshake (asirt.sync.stun)
    "stun.requests",        # stun requests issued (R1)
    "stun.acks",            # requests of siblings acknowledged
    "stun.parks",           # times this CPU parked (STUNNED)
    "stun.aborts",          # requests given up (sibling unresponsive past give_up): released
    "stun.flushes",         # flushes on release (R6)
    "stun.exposed",         # naive: releases where a sibling had not parked when HOST was entered
    "stun.parked_ns",       # time this CPU spent parked (STUNNED) for its siblings' requests
    "stun.wait_ns",         # time this CPU's vCPU loop waited for its siblings' acks (R1-R2)
    # the VM-entry barrier (asirt.sync.barrier)
    "barrier.tries",        # barrier checks run
    "barrier.busy",         # ... failed: a sibling requested, or is in HOST
    "barrier.dom",          # ... failed: a sibling runs another domain
    "barrier.flushes",      # flushes the barrier did because this CPU's taints asked for one
    "cpu.idle_flushes",     # flushes on the way to idle without the kernel (State.go_idle)
    "barrier.rv_rounds",    # rendezvous rounds this CPU completed
    # core scheduling (asirt.sync.coresched)
    "coresched.tasks",
    "coresched.forced_idle",
    "coresched.forced_idle_ns",
    # address space isolation (asirt.mm)
    "asi.enters",
    "asi.exits",
    "asi.faults",           # accesses that faulted in a restricted tree and retried
    "asi.flushes",          # flushes asi_enter did (the CPU's taints asked for one)
    "asi.tlb_flushes",      # PCID flushes: lazy (at switch) and requested (shootdown)
    "asi.tlb_misses",
    "asi.shootdowns_sent",
    "asi.shootdowns_avoided",
    "asi.gadgets",          # speculative touches of a sensitive page
    "asi.gadget_hits",      # ... that reached memory (mapped in the current tree)
    # the vCPU loop (asirt.kvm.loop): where a lane's time goes
    "kvm.cycles",           # exit/entry cycles
    "kvm.exits",            # VM exits drawn from the profile
    "kvm.exits_restricted", # ... handled without leaving the restricted space (ASI strategies)
    "kvm.kicked",           # guest slices a sibling's stun ended (a VM exit of its own)
    "kvm.to_user",          # exits that returned to the user-space VMM
    "kvm.halts",            # exits that halted the vCPU (HLT: the lane idles)
    "kvm.switches",         # vCPU switches between VMs (through HOST)
    "kvm.host_tasks",       # ticks that ran a host task (kernel work on sensitive memory)
    "kvm.refused",          # VM entries the barrier refused for another VM on a sibling
    "kvm.guest_ns",         # time in GUEST
    "kvm.handler_ns",       # exit-handler work (the profile's handler times, HLT excluded)
    "kvm.halt_ns",          # halted (HLT): idle in the kernel
    "kvm.barrier_ns",       # waiting in the VM-entry barrier
    "kvm.host_ns",          # host tasks
    "kvm.idle_ns",          # idle: nothing to run (a lane SMT-off keeps idle)
    "kvm.wall_ns",          # this lane's time in the loop, all of it
    # asirt stress's injected faults, counted by their victim
    "fault.delays",         # delay faults it slept through inside HOST
    "fault.delay_waits",    # ... its siblings' liveness checks that found it alive meanwhile
)
COUNTER = {name: i for i, name in enumerate(COUNTERS)}
assert len(COUNTER) == len(COUNTERS), "a counter name appears twice"
#: room for the counters, in whole 128-byte blocks, with space to grow
NCOUNTERS = -(-(len(COUNTERS) + 16) // 16) * 16

__all__ = ["COUNTERS", "COUNTER", "NCOUNTERS"]
