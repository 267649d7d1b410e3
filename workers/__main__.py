"""Entry point of one worker process: ``python -m workers --cpu N --slot I --region NAME --role R``.

Pins itself, verifies the pin, attaches and validates the region, reports READY in its slot,
waits on the start barrier, runs ``workers.<role>.run(ctx)``, reports DONE (or FAILED).
Exit status: 0 done, 3 the program raised, 4 pinning failed, 5 attach/validation failed,
6 the start barrier never opened, 7 it found its own published words changed behind its back
(asirt.cpu.guard: it leaves, and its siblings fence it off). Only the parent unlinks anything.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import sys
import traceback

import posix_ipc
import psutil

from shm_layout import AsirtError, Region, WorkerState
from shm_layout.header import STOP_WORD
from shm_layout.region import sem_wait

EXIT_PROGRAM, EXIT_PIN, EXIT_ATTACH, EXIT_START = 3, 4, 5, 6   # 7: Corrupted.worker_status
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: how often a worker waiting at the start barrier looks whether its parent still lives (the
#: parent bounds the start-up by its workers' progress: hundreds of them start one by one)
START_CHECK_S = 1.0


def pin(cpu: int) -> None:
    psutil.Process().cpu_affinity([cpu])
    got = os.sched_getaffinity(0)
    if got != {cpu}:
        raise AsirtError(f"pinning to CPU {cpu} did not hold: affinity is {sorted(got)}")


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL us when the orchestrator dies (Linux PR_SET_PDEATHSIG), so a
    kill -9 of the CLI leaves no worker spinning. False if ``parent`` is already gone (we were
    reparented before the request took effect)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    return os.getppid() == parent


def wait_start(region: Region, parent: int) -> bool:
    """Wait at the start barrier for as long as the parent lives (False: it died first)."""
    start = region.semaphore("start")
    while True:
        try:
            sem_wait(start, START_CHECK_S)
            return True
        except posix_ipc.BusyError:
            if os.getppid() != parent:
                return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers")
    ap.add_argument("--cpu", type=int, required=True)
    ap.add_argument("--slot", type=int, required=True)
    ap.add_argument("--region", required=True)
    ap.add_argument("--role", required=True)
    ap.add_argument("--params", required=True, help="the role's parameters (asirt.params)")
    ap.add_argument("--oversubscribed", action="store_true",
                    help="the run has more spinning workers than CPUs")
    ap.add_argument("--parent", type=int, default=None,
                    help="pid of the orchestrator (default: our parent at start)")
    args = ap.parse_args(argv)
    # Ctrl-C reaches the whole foreground process group: the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not die_with_parent(args.parent if args.parent is not None else os.getppid()):
        return EXIT_START
    try:
        pin(args.cpu)
    # ValueError: psutil refuses a CPU number it does not know ("invalid CPU #9999"); OSError
    # EINVAL: the kernel refuses an offline CPU or one outside the cpuset.
    except (OSError, ValueError, psutil.Error, AsirtError) as err:
        print(f"worker cpu {args.cpu}: cannot pin: {err}", file=sys.stderr)
        return EXIT_PIN
    try:
        region = Region.attach(args.region)
    except AsirtError as err:
        print(f"worker cpu {args.cpu}: {err}", file=sys.stderr)
        return EXIT_ATTACH
    # Local imports: the program and its helpers pull in the runtime's layers.
    from asirt.errors import Corrupted
    from asirt.params import decode
    from workers.context import WorkerContext
    try:
        program = importlib.import_module(f"workers.{args.role}")
        params = decode(program.PARAMS, args.params)
    except (ImportError, AttributeError, ValueError) as err:
        print(f"worker cpu {args.cpu}: role {args.role!r}: {err}", file=sys.stderr)
        return EXIT_PROGRAM
    metrics = [bytes(n).decode() for n in region.array("metrics")["name"]]
    ctx = WorkerContext(region, args.slot, args.cpu, args.role, params, metrics,
                        args.oversubscribed)
    w = ctx.words
    state = ctx.slot_word(args.slot, "state")
    if w[ctx.slot_word(args.slot, "cpu")] != args.cpu:
        print(f"worker cpu {args.cpu}: slot {args.slot} belongs to CPU "
              f"{w[ctx.slot_word(args.slot, 'cpu')]}", file=sys.stderr)
        return EXIT_ATTACH
    w[ctx.slot_word(args.slot, "pid")] = os.getpid()
    w[state] = WorkerState.ATTACHED
    try:
        prepare = getattr(program, "prepare", None)
        prepared = prepare(ctx) if prepare is not None else None
        w[state] = WorkerState.READY
        if not wait_start(region, ctx.parent_pid):
            print(f"worker cpu {args.cpu}: its parent {ctx.parent_pid} died before the start "
                  "barrier opened", file=sys.stderr)
            w[state] = WorkerState.FAILED
            return EXIT_START
        if w[STOP_WORD]:       # stopped before the run began (Ctrl-C during start-up)
            w[state] = WorkerState.DONE
            return 0
        w[state] = WorkerState.RUNNING
        program.run(ctx, prepared)
    except Corrupted as err:
        w[state] = WorkerState.FAILED
        w[ctx.slot_word(args.slot, "err")] = err.worker_status
        print(f"worker cpu {args.cpu}: {err}", file=sys.stderr)
        return err.worker_status
    except BaseException:  # report any failure in the slot, details on stderr
        w[state] = WorkerState.FAILED
        w[ctx.slot_word(args.slot, "err")] = EXIT_PROGRAM
        traceback.print_exc()
        return EXIT_PROGRAM
    w[state] = WorkerState.DONE
    return 0


if __name__ == "__main__":
    status = main()
    # Leave without the interpreter's teardown (about 20 ms of a worker's CPU: hundreds of
    # workers ending together on two CPUs would take seconds): the kernel closes and unmaps
    # what a worker holds, and a worker unlinks nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
