"""asirt: measure what it costs to make SMT siblings safe against speculative side channels,
and whether a protocol is safe, with real pinned processes over POSIX shared memory.

Layering (each layer imports only those listed below it; tests/test_layering.py enforces it):

    cli, scenarios, orchestrator, results, comparison, plot, cfloor, kvmfloor, model
                     the parent side
    workers (the programs each pinned process runs)
    asirt.kvm        the KVM workload: strategies, exit profiles, the one vCPU loop
    asirt.mm, asirt.sync    address spaces | sibling synchronization (peers: never each other)
    asirt.cpu        one pinned CPU: state writer, core buffer, waiter, safe point, transports
    host modules     errors, clock, fence, proc, params, histogram, progress, topology, system,
                     collect
    shm_layout       the region's binary ABI (numpy, posix_ipc)

``collect`` reads counters and events back in the parent; ``progress`` draws the progress line.
Importing the package imports nothing heavy (``python -m asirt`` installs its signal handling
first: asirt/__main__.py); ``asirt.AsirtError`` is loaded on first use.
"""


def __getattr__(name: str) -> object:
    if name == "AsirtError":
        from asirt.errors import AsirtError
        return AsirtError
    raise AttributeError(f"module 'asirt' has no attribute {name!r}")
