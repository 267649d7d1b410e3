"""The ``asirt`` command line. Errors are caught once, here: 0 ok, 1 a check failed, 2 bad input."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

from asirt import results, scenarios
from asirt.cpu.transport import TRANSPORTS
from asirt.errors import AsirtError, BadInput
from asirt.kvm import profile as kvm_profiles
from asirt.kvm import strategy as kvm_strategies
from asirt.params import CpuParams, KvmParams, StressParams
from asirt.progress import ProgressLine
from asirt.scenarios import kvm as kvm_scenario
from asirt.scenarios import stress
from asirt.scenarios.common import plan_cores
from asirt.sync.barrier import BARRIERS
from asirt.sync.stun import ALL_PROTOCOLS, PROTOCOLS
from asirt.system import read_system
from asirt.topology import (emulated_k, format_cpu_list, format_topology, parse_cpu_arg,
                            read_topology, select_topology)
from asirt.cfloor import reclaim_dirs
from shm_layout.region import Leftover, Status, active_runs, list_leftovers, reclaim

EXIT_OK, EXIT_CHECK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors are bad input too: exit 2
        self.print_usage(sys.stderr)
        print(f"asirt: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


#: --duration bounds, in seconds: below the minimum an entry may record no sample at all
#: (starting the workers alone takes longer); above the maximum (a day per entry) it is
#: surely a typo.
MIN_DURATION_S, MAX_DURATION_S = 0.01, 86400.0
# Plain decimal seconds: float() would also take "1_0" (10), "inf" or fullwidth digits.
_SECONDS = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)


def _duration(text: str) -> float:
    if not _SECONDS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; write it as "
                                         "digits with an optional decimal point, e.g. 2 or 0.5")
    value = float(text)
    if not MIN_DURATION_S <= value <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(
            f"{text} s is outside {MIN_DURATION_S:g}..{MAX_DURATION_S:g} s (a day); shorter "
            "entries may record nothing, longer ones are surely a typo")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _number(ok: Callable[[float], bool], want: str) -> Callable[[str], float]:
    """An argparse type: a float for which ``ok`` holds (NaN never does), else ``want``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text} {want}")
        return value
    return parse


_probability = _number(lambda v: 0.0 <= v <= 1.0, "is not a probability: choose 0..1")
_positive_float = _number(lambda v: v > 0, "must be a positive, finite number")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="asirt", description="Measure SMT sibling synchronization "
                   "(ASI, sibling stun, core scheduling) with pinned processes over shared memory.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_ArgParser)

    t = sub.add_parser("topology", help="cores, siblings, SMT state and measurement warnings")
    t.add_argument("--sysfs-root", default="/sys", metavar="DIR",
                   help="read this tree instead of /sys (DIR plays the role of /sys)")
    t.add_argument("--topology", default="auto", metavar="auto|emulated[:K]",
                   help="sibling grouping to show (default auto)")
    t.add_argument("--json", action="store_true", help="print JSON")

    b = sub.add_parser("bench", help="run a benchmark scenario and write a run directory")
    b.add_argument("scenario", nargs="?", default=scenarios.DEFAULT_SCENARIO,
                   help="; ".join(f"{k}: {v.help}" for k, v in scenarios.SCENARIOS.items())
                   + f" (default {scenarios.DEFAULT_SCENARIO})")
    b.add_argument("--transport", metavar="LIST",
                   help=f"comma-separated subset of {','.join(TRANSPORTS)} (default all; kvm: "
                   "one, default spin)")
    b.add_argument("--protocol", metavar="LIST",
                   help=f"stun: comma-separated subset of {','.join(PROTOCOLS)} (default both)")
    b.add_argument("--cpus", metavar="LIST", help="CPUs to use, e.g. 0-3,8 (default all allowed)")
    b.add_argument("--duration", type=_duration, default=2.0, metavar="SECONDS",
                   help="measuring time of each entry (default 2)")
    b.add_argument("--topology", default="auto", metavar="auto|emulated[:K]",
                   help="real siblings, or an emulated grouping of K CPUs per pseudo-core")
    b.add_argument("--out", default="runs", metavar="DIR",
                   help="parent directory of the run directory (default ./runs)")
    b.add_argument("--no-floor", action="store_true",
                   help="skip the C cache-line ping-pong that measures the hardware floor")
    b.add_argument("--json", action="store_true", help="print result.json to stdout")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")
    k = b.add_argument_group("kvm (the strategy comparison; README.md, \"Strategies\")")
    k.add_argument("--strategy", metavar="LIST",
                   help=f"comma-separated subset of {','.join(kvm_strategies.NAMES)} (default all; "
                   f"{', '.join(kvm_strategies.BROKEN)}: broken on purpose, to see the checkers "
                   "fail them)")
    k.add_argument("--profile", metavar="NAME|FILE",
                   help="exit profile: a built-in name ('asirt profile list') or a TOML file "
                   "(default: default)")
    k.add_argument("--gadgets", type=_probability, metavar="P",
                   help=f"probability an exit's handler speculatively touches a secret it does "
                   f"not use (default {KvmParams.gadgets:g})")
    k.add_argument("--vms", type=_positive_int, metavar="N",
                   help=f"VMs whose vCPUs share every lane, 1..7 (default {KvmParams.vms})")
    k.add_argument("--repeat", type=_positive_int, metavar="N",
                   help="interleave the strategies N times and report the spread (default 1)")
    k.add_argument("--seed", type=int, metavar="N",
                   help=f"seed of the workload's draws (default {KvmParams.seed})")
    k.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="repeat the comparison per value of "
                   + ", ".join(kvm_scenario.SWEEP_KEYS))
    k.add_argument("--stun-at", choices=kvm_strategies.STUN_AT,
                   help="ASI strategies: stun in the ASI hooks, or at every VM exit and entry "
                   "(default hooks)")
    k.add_argument("--interrupts", choices=kvm_strategies.INTERRUPTS,
                   help="ASI strategies: interrupts stay restricted and fault out on a "
                   "sensitive access, or leave ASI at interrupt entry (default stay)")
    k.add_argument("--tick-ms", type=_positive_float, metavar="MS",
                   help=f"the vCPU scheduler's tick (default {KvmParams.tick_ms:g})")
    k.add_argument("--guest", choices=kvm_scenario.GUESTS,
                   help="real vCPUs through /dev/kvm (kvm), the emulated guest, or kvm where a "
                   "VM can be created (default auto)")
    k.add_argument("--host-share", type=_probability, metavar="F",
                   help=f"share of ticks that run a host task (default {KvmParams.host_share:g})")

    st = sub.add_parser("stress", help="randomized transitions and injected faults; checks S1-S3 "
                        "and liveness")
    st.add_argument("--protocol",
                    help=f"comma-separated subset of {','.join(ALL_PROTOCOLS)} "
                    "(default strict; naive and the broken variants must show violations)")
    st.add_argument("--strategy", metavar="LIST",
                    help="stress the KVM vCPU loop under these strategies instead of the "
                    f"handshake's walk: comma-separated subset of {','.join(kvm_strategies.NAMES)} "
                    f"or all ({','.join(kvm_strategies.BROKEN)} are broken on purpose); with ASI, "
                    "shootdowns, stuns and cookie changes through the delays and --faults; one "
                    "that claims safety must show no leak, one that does not must show some")
    st.add_argument("--guest", choices=kvm_scenario.GUESTS,
                    help="with --strategy: real vCPUs through /dev/kvm, or the emulated guest "
                    "(default auto: kvm where a VM can be created)")
    st.add_argument("--profile", metavar="NAME|FILE",
                    help="with --strategy: the exit profile (asirt profile list; default "
                    "default)")
    st.add_argument("--gadgets", type=_probability, metavar="P",
                    help="with --strategy: speculative-gadget probability per exit (default 0)")
    st.add_argument("--vms", type=_positive_int, metavar="N",
                    help="with --strategy: VMs multiplexed on every lane "
                    f"(default {KvmParams.vms})")
    length = st.add_mutually_exclusive_group()
    length.add_argument("--duration", type=_duration, metavar="SECONDS",
                        help="run each protocol this long (default 10)")
    length.add_argument("--transitions", type=_positive_int, metavar="N",
                        help="run each protocol until its vCPUs made N transitions in all")
    st.add_argument("--faults", default="", metavar="LIST",
                    help=f"comma-separated subset of {','.join(stress.FAULTS)}: each is injected "
                    "into a worker of its own (the last lane of its own core) at about a third "
                    "of the run, and the others must detect it")
    st.add_argument("--workers", type=_positive_int, metavar="N",
                    help="vCPU workers in all, in cores of K siblings (--topology emulated:K, or "
                    "the machine's own); more workers than CPUs oversubscribes them (default: "
                    "one per CPU, and a core per fault)")
    st.add_argument("--seed", type=int, default=StressParams.seed,
                    help=f"seed of the random walk (default {StressParams.seed})")
    st.add_argument("--transport", default=CpuParams.transport, choices=TRANSPORTS)
    st.add_argument("--barrier", choices=BARRIERS,
                    help=f"the handshake walk's VM-entry barrier (default {StressParams.barrier}; "
                    "a --strategy has its own)")
    st.add_argument("--no-delays", action="store_true",
                    help="no injected sleeps and yields between protocol steps")
    st.add_argument("--cpus", metavar="LIST", help="CPUs to use (default all allowed)")
    st.add_argument("--topology", default="auto", metavar="auto|emulated[:K]",
                    help="real siblings, or emulated cores of K siblings; K may exceed the "
                    "selected CPUs (each core's lanes then take the CPUs in turn)")
    st.add_argument("--out", default="runs", metavar="DIR")
    st.add_argument("--json", action="store_true", help="print result.json to stdout")
    st.add_argument("--quiet", action="store_true", help="no progress on stderr")

    r = sub.add_parser("report", help="print the table of a run directory")
    r.add_argument("run_dir")
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", action="store_true", help="write a PNG per metric into RUN_DIR")

    cmp_ = sub.add_parser("compare", help="p50/p99 of matching entries of two runs, B against A")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")

    c = sub.add_parser("cleanup", help="remove the /asirt-* segments and semaphores and the "
                       "C-floor temporary directories of dead runs")
    c.add_argument("--all", action="store_true",
                   help="also what this version cannot judge: segments of other asirt versions "
                   "and files under asirt names that are not regions; refused while a run of "
                   "this version is active (make sure no older asirt runs either)")

    pf = sub.add_parser("profile", help="exit profiles (TOML): list, show, import from perf")
    pfs = pf.add_subparsers(dest="profile_command", metavar="list|show|import", required=True,
                            parser_class=_ArgParser)
    pfs.add_parser("list", help="the built-in profiles")
    pf_show = pfs.add_parser("show", help="a profile's exit reasons")
    pf_show.add_argument("profile", metavar="NAME|FILE",
                         help="a built-in profile's name or a profile TOML file")
    pf_show.add_argument("--json", action="store_true", help="print the profile as JSON")
    pf_imp = pfs.add_parser("import", help="a profile from `perf kvm stat report` output")
    pf_imp.add_argument("report", metavar="PERF_KVM_STAT_REPORT.txt")
    pf_imp.add_argument("-o", dest="out", metavar="OUT.toml",
                        help="write the profile to this new file (never overwritten) instead "
                        "of stdout")
    pf_imp.add_argument("--name", help="the profile's name (default: from the report's file "
                        "name)")
    pf_imp.add_argument("--exit-rate-hz", type=float, metavar="HZ",
                        help="exits per second of guest time per vCPU (default: a stated "
                        "10000, since a perf kvm stat table has no wall time)")
    return p


def cmd_topology(args: argparse.Namespace) -> int:
    topo = select_topology(read_topology(args.sysfs_root), args.topology)
    system = read_system(args.sysfs_root, topo.cpus)
    if args.json:
        print(json.dumps({**topo.to_json(), "system": system.to_json()}, indent=2))
    else:
        print(format_topology(topo, system))
    return EXIT_OK


def _selected_topology(args: argparse.Namespace):
    topo = read_topology()
    cpus = parse_cpu_arg(args.cpus, topo.allowed_cpus) if args.cpus is not None else None
    return select_topology(topo, args.topology, cpus)


#: bench options that only one scenario reads (their argparse dest -> that scenario)
_SCENARIO_ONLY = {"protocol": "stun", **{dest: "kvm" for dest in (
    "strategy", "profile", "gadgets", "vms", "repeat", "seed", "sweep", "stun_at",
    "interrupts", "tick_ms", "host_share", "guest")}}


def _kvm_options(args: argparse.Namespace) -> scenarios.KvmOptions:
    transports = scenarios.parse_choices(args.transport or CpuParams.transport, TRANSPORTS,
                                         "--transport")
    if len(transports) > 1:
        raise BadInput(f"--transport {args.transport}", "lists several transports; bench kvm "
                       "compares strategies over one", "choose one of "
                       + ", ".join(TRANSPORTS) + " (compare transports with bench stun)")
    given = {k: v for k, v in vars(args).items() if _SCENARIO_ONLY.get(k) == "kvm"
             and v is not None}
    if "strategy" in given:
        given["strategies"] = kvm_scenario.parse_strategies(given.pop("strategy"))
    if "sweep" in given:
        given["sweep"] = kvm_scenario.parse_sweep(given["sweep"])
    opts = scenarios.KvmOptions(transport=transports[0], **given)
    kvm_scenario.check_options(opts)    # bad knobs and files are refused before anything runs
    kvm_profiles.load(opts.profile)     # (the guest, with the run's cores: in run_kvm)
    return opts


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario not in scenarios.SCENARIOS:
        raise BadInput(f"scenario {args.scenario!r}", "is not one asirt knows",
                       f"choose from {', '.join(scenarios.SCENARIOS)}")
    for dest, only in _SCENARIO_ONLY.items():
        if getattr(args, dest) is not None and args.scenario != only:
            option = "--" + dest.replace("_", "-")
            raise BadInput(f"{option} {getattr(args, dest)}", f"applies to bench {only} only",
                           f"run 'asirt bench {only} {option} ...', or leave {option} out")
    kvm = _kvm_options(args) if args.scenario == "kvm" else scenarios.KvmOptions()
    opts = scenarios.Options(
        transports=tuple(scenarios.parse_choices(args.transport or ",".join(TRANSPORTS),
                                                 TRANSPORTS, "--transport")),
        duration_s=args.duration, floor=not args.no_floor,
        protocols=tuple(scenarios.parse_choices(args.protocol or ",".join(PROTOCOLS),
                                                PROTOCOLS, "--protocol")),
        kvm=kvm)
    scenario = scenarios.SCENARIOS[args.scenario]
    topo = _selected_topology(args)
    progress = ProgressLine(scenario.count(topo, opts), quiet=args.quiet)
    config = {"scenario": args.scenario, **dataclasses.asdict(opts)}
    if args.scenario != "kvm":
        del config["kvm"]
    return _run(args, args.scenario, topo, config, scenario.run(topo, opts, progress))


def _stress_topology(args: argparse.Namespace) -> tuple[Any, int | None]:
    """A stress run's topology, and its siblings per core where --topology emulated:K asks
    for more siblings than the selected CPUs (each core's lanes then cycle over them)."""
    k = emulated_k(args.topology)
    topo = read_topology()
    cpus = parse_cpu_arg(args.cpus, topo.allowed_cpus) if args.cpus is not None else None
    n = len(set(topo.allowed_cpus if cpus is None else cpus))
    if k is not None and 2 <= n < k:
        return select_topology(topo, f"emulated:{n}", cpus), k
    return select_topology(topo, args.topology, cpus), None


def cmd_stress(args: argparse.Namespace) -> int:
    faults = tuple(scenarios.parse_choices(args.faults, stress.FAULTS, "--faults")
                   if args.faults else ())
    if args.strategy is not None:
        return _stress_strategies(args, faults)
    given = [f"--{k}" for k in _STRESS_KVM if getattr(args, k) is not None]
    if given:
        raise BadInput(given[0], "is an option of the vCPU loop's stress",
                       "add --strategy LIST, or leave it out")
    protocols = scenarios.parse_choices(args.protocol or "strict", ALL_PROTOCOLS, "--protocol")
    barrier = args.barrier or StressParams.barrier
    if args.transitions is None and args.duration is None:
        args.duration = 10.0
    topo, lanes = _stress_topology(args)
    # refuses a topology with no siblings, and workers that do not fill whole cores
    plan_cores(topo, lanes, args.workers, min_cores=max(1, len(faults)))
    progress = ProgressLine(len(protocols), quiet=args.quiet)
    config = {"scenario": "stress", "protocols": protocols, "duration_s": args.duration,
              "transitions": args.transitions, "faults": list(faults), "workers": args.workers,
              "seed": args.seed, "transport": args.transport, "barrier": barrier,
              "delays": not args.no_delays}
    runs = (stress.run_stress(
        topo, p, transitions=args.transitions, duration_s=args.duration, seed=args.seed,
        delays=not args.no_delays, faults=faults, progress=progress, transport=args.transport,
        barrier=barrier, lanes_per_core=lanes, workers=args.workers) for p in protocols)
    return _run(args, "stress", topo, config, runs)


#: the options of the vCPU loop's stress (given without --strategy: refused), as KvmOptions
#: names them: their defaults and their checks are bench kvm's
_STRESS_KVM = ("guest", "profile", "gadgets", "vms")


def _stress_strategies(args: argparse.Namespace, faults: tuple[str, ...]) -> int:
    """``asirt stress --strategy LIST``: the vCPU loop under each strategy, stressed."""
    for opt, value, fix in (("--protocol", args.protocol, "a strategy has its own protocol"),
                            ("--barrier", args.barrier, "a strategy has its own barrier"),
                            ("--transitions", args.transitions,
                             "the vCPU loop runs for a time: give --duration")):
        if value is not None:
            raise BadInput(f"{opt} with --strategy", "does not apply", fix)
    opts = scenarios.KvmOptions(
        strategies=kvm_scenario.parse_strategies(args.strategy), seed=args.seed,
        transport=args.transport,
        **{k: getattr(args, k) for k in _STRESS_KVM if getattr(args, k) is not None})
    kvm_scenario.check_options(opts)           # bench kvm's checks: exit 2 before anything
    profile = kvm_profiles.load(opts.profile)
    duration = 10.0 if args.duration is None else args.duration
    topo, lanes = _stress_topology(args)
    cores = plan_cores(topo, lanes, args.workers, min_cores=max(1, len(faults)))
    guest, why = kvm_scenario.resolve_guest(opts.guest, opts.transport,
                                            lanes_per_core=max(len(c) for c in cores),
                                            nreasons=len(profile.reasons))
    progress = ProgressLine(len(opts.strategies), quiet=args.quiet)
    config = {"scenario": "stress", "strategies": list(opts.strategies), "duration_s": duration,
              "faults": list(faults), "workers": args.workers, "seed": opts.seed,
              "transport": opts.transport, "guest": guest, "guest_reason": why,
              "profile": opts.profile, "gadgets": opts.gadgets, "vms": opts.vms,
              "delays": not args.no_delays}
    if not args.quiet:
        print(f"guest {guest}: {why}", file=sys.stderr)
    runs = (stress.run_kvm_stress(
        topo, s, duration, seed=opts.seed, delays=not args.no_delays, faults=faults,
        progress=progress, transport=opts.transport, guest=guest, profile=opts.profile,
        gadgets=opts.gadgets, vms=opts.vms, lanes_per_core=lanes, workers=args.workers)
        for s in opts.strategies)
    return _run(args, "stress", topo, config, runs)


class _Interrupts:
    """SIGINT and SIGTERM while a command runs: the handler ``main`` installs.

    While ``raising``, a signal raises KeyboardInterrupt (the orchestrator's cleanup path,
    which stops and reaps the workers); it raises once, and every later signal is only
    noted in ``caught``: the command is ending already. ``_run`` clears ``raising`` the
    moment the entries are over, so nothing can tear the writing of their results.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.raising = True
        self.caught: list[str] = []
        try:
            self.previous = {s: signal.signal(s, self) for s in self.SIGNALS}
        except ValueError:         # not the main thread: Python delivers no signal here
            self.previous = {}

    def __call__(self, signum: int, frame: object) -> None:
        self.caught.append(signal.Signals(signum).name)
        if self.raising:
            self.raising = False
            raise KeyboardInterrupt

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def pause_for_tests(phase: str) -> None:
    """For tests only: with ASIRT_TEST_PAUSE=<phase>:<seconds> the CLI says so on stderr and
    sleeps there, so that a test can send a signal at a known moment."""
    want, _, seconds = os.environ.get("ASIRT_TEST_PAUSE", "").partition(":")
    if want == phase:
        print(f"asirt: test pause: {phase}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 1))


def _measure(runs: Iterable[results.Entry],
             interrupts: _Interrupts) -> tuple[list[results.Entry], bool, AsirtError | None]:
    """Run the entries: those that completed, whether a signal interrupted them, and the
    error that ended them early, if one did after the first entry (before it, it is raised:
    nothing was measured). Signals only count from the moment this returns."""
    entries: list[results.Entry] = []
    try:
        for entry in runs:
            entries.append(entry)
        interrupts.raising = False
        return entries, False, None
    except KeyboardInterrupt:
        interrupts.raising = False      # (a plain store: no signal handler runs before it)
        print("\ninterrupted: writing the entries that completed", file=sys.stderr)
        return entries, True, None
    except AsirtError as err:           # e.g. /dev/shm full at the third entry
        interrupts.raising = False
        if not entries:
            raise
        print(f"asirt: error: {err}\nasirt: writing the entries that completed",
              file=sys.stderr)
        return entries, False, err


def _run(args: argparse.Namespace, name: str, topo, config: dict[str, Any],
         runs: Iterable[results.Entry]) -> int:
    """Run the entries, print their table, write the run directory, choose the status.

    What was measured survives every signal. The first Ctrl-C or SIGTERM ends the entry
    that runs; those that completed are kept with ``"interrupted": true`` and the status is
    130. A signal once the last entry has completed interrupts nothing: it is noted, the run
    is kept with ``"interrupted": false`` and ends with its own status. An error after the
    first entry keeps those before it (``"error"``) and exits with the error's status. The
    table is printed before anything is written, and results that cannot be written where
    --out says go elsewhere (_keep): then the status is at least 1.
    """
    interrupts: _Interrupts = args.signals
    results.prepare_out_dir(args.out)   # refuse an unusable --out before anything runs
    system = read_system(topo.sysfs_root, topo.cpus)
    from asirt.clock import calibrate
    config = {**config, "topology": args.topology, "cpus": list(topo.cpus),
              "clock": calibrate()._asdict()}
    run_id = results.new_run_id(name)
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if not args.quiet:
        for line in topo.warnings:
            print(f"WARNING: {line}", file=sys.stderr)
    system_json = system.to_json()
    for line in _shared_cpus(topo.cpus):    # the measurements are worth little: say so now
        print(f"WARNING: {line}", file=sys.stderr)
        system_json["warnings"].append(line)
    entries, interrupted, error = _measure(runs, interrupts)
    pause_for_tests("write")
    result = results.build_result(run_id, started_at, topo.to_json(), system_json, config,
                                  entries, interrupted, None if error is None else str(error))
    # The table (or the JSON) first: it is on the screen whatever becomes of the files.
    if args.json:
        _out(json.dumps(result, indent=2))
    else:
        _out(results.format_table(result["scenarios"]))
        for line in (*system_json["warnings"], *_entry_warnings(entries)):
            _out(f"WARNING: {line}")
    run_dir, where_asked = _keep(args.out, result, entries)
    if run_dir is not None:
        _plot(run_dir, result["scenarios"])
        if not args.json:
            _out(f"run directory: {run_dir}")
    late = interrupts.caught[1:] if interrupted else interrupts.caught
    if late:
        print(f"asirt: {', '.join(dict.fromkeys(late))} came after "
              + ("the interrupt: ignored while the results were kept" if interrupted else
                 "the last entry had completed: nothing was interrupted, every entry was kept"),
              file=sys.stderr)
    if error is not None:
        return error.exit_code
    if interrupted:
        return EXIT_INTERRUPTED
    problems = results.check_problems(entries)
    for line in problems:
        print(f"asirt: check failed: {line}", file=sys.stderr)
    for e in entries:
        if (e.scenario != "stress" and e.claims_safety is False and not e.failures
                and not e.counters.get("violations")):
            print(f"asirt: note: the unsafe protocol {e.strategy!r} showed no violation in this "
                  "run; run longer or with delays to see the checkers catch it", file=sys.stderr)
    return EXIT_CHECK if problems or not where_asked else EXIT_OK


def _shared_cpus(cpus: Iterable[int]) -> list[str]:
    """A warning for each other active asirt run of this user on any of ``cpus``."""
    mine = set(cpus)
    return [f"another asirt run (pid {run.creator_pid}, segment {run.segment}) is using CPUs "
            f"{format_cpu_list(shared)} too: each disturbs the other's measurements; wait "
            f"for it to end, or choose other CPUs with --cpus"
            for run in active_runs() if (shared := sorted(mine & set(run.cpus)))]


def _entry_warnings(entries: list[results.Entry]) -> list[str]:
    """What each entry says about itself, and an entry that recorded nothing."""
    return [*(w for e in entries for w in e.extra.get("warnings", ())),
            *(f"{e.label} recorded no sample in {e.duration_s:.3g} s; run longer (--duration)"
              for e in entries if e.hists and not e.failures
              and not any(int(h.sum()) for h in e.hists.values()))]


def _silence_stdout() -> None:
    """The reader of stdout went away (``| head``): send the rest nowhere, as Unix tools do,
    and so that the interpreter's last flush does not fail either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):       # stdout is not a file (replaced in-process)
        pass
    finally:
        os.close(devnull)


def _out(text: str) -> None:
    """Print a line of the command's output; a closed pipe silences the rest of it."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _why(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _keep(out_dir: str, result: dict[str, Any],
          entries: list[results.Entry]) -> tuple[str | None, bool]:
    """Write the run directory into ``out_dir``; failing that (a full disk, a directory made
    read-only during the run) into a new private directory under the system's temporary
    directory; failing that too, print result.json on stderr. Each failure and where the
    results went instead are said on stderr. Returns the run directory (None: on stderr
    only) and whether it is where --out asked (the status is 1 when not)."""
    try:
        return results.write_run(out_dir, result, entries), True
    except OSError as err:
        print(f"asirt: cannot write the run directory into --out {out_dir} ({_why(err)})",
              file=sys.stderr)
    fallback = None
    try:
        fallback = tempfile.mkdtemp(prefix="asirt-run-")
        run_dir = results.write_run(fallback, result, entries)
    except OSError as err:
        if fallback is not None:
            with contextlib.suppress(OSError):
                os.rmdir(fallback)
        print(f"asirt: nor into the temporary directory ({_why(err)}); result.json follows on "
              "stderr: save it as RUN/result.json to read it with 'asirt report RUN'",
              file=sys.stderr)
        print(json.dumps(result, indent=2), file=sys.stderr)
        return None, False
    print(f"asirt: the run directory went to {run_dir} instead; move it where it belongs",
          file=sys.stderr)
    return run_dir, False


def _plot(run_dir: str, scenarios: list[dict[str, Any]]) -> None:
    from asirt import plot
    if not (plot.available() and scenarios):
        return
    try:
        plot.plot_run(run_dir, scenarios)
    except (OSError, AsirtError) as err:
        print(f"WARNING: no plots in {run_dir} ({_why(err)}); 'asirt report {run_dir} --plot' "
              "makes them later", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    result = results.load_result(args.run_dir)
    if args.json:
        _out(json.dumps(result, indent=2))
    else:
        _out(f"run {result['run_id']} started {result['started_at']} on "
             f"{result['host']['hostname']} ({result['host']['cpu_model']})")
        if result["topology"].get("emulated"):
            _out("topology: EMULATED sibling grouping")
        if result.get("interrupted"):
            _out("INTERRUPTED: only the entries that completed before the interrupt are here")
        if result.get("error"):
            _out(f"ERROR: the run stopped early: {result['error']}")
        _out(results.format_table(result["scenarios"]))
    if args.plot:
        from asirt.plot import plot_run
        for path in plot_run(args.run_dir, result["scenarios"]):   # stdout: only the report
            if args.json:
                print(f"wrote {path}", file=sys.stderr)
            else:
                _out(f"wrote {path}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = results.load_result(args.run_a), results.load_result(args.run_b)
    _out(f"A = {a['run_id']} ({a['host']['hostname']})\n"
         f"B = {b['run_id']} ({b['host']['hostname']})")
    _out(results.format_comparison(a["scenarios"], b["scenarios"]))
    return EXIT_OK


def _cleanup_line(lo: Leftover) -> str:
    if lo.removed:
        return f"removed {lo.kind} {lo.ipc_name}: {lo.why}"
    if lo.status is Status.UNJUDGED:
        return (f"kept {lo.kind} {lo.ipc_name}: {lo.why}; 'asirt cleanup --all' removes it "
                f"when no asirt run is active")
    if lo.status is Status.STALE:
        return f"could not remove {lo.kind} {lo.ipc_name}: {lo.why}"
    verb = "kept" if lo.status is Status.ACTIVE else "skipped"
    return f"{verb} {lo.path}: {lo.why}"


def cmd_cleanup(args: argparse.Namespace) -> int:
    floors = reclaim_dirs()      # a floor directory is never unjudged: --all changes nothing
    if args.all:
        active = [lo for lo in [*list_leftovers(), *floors]
                  if lo.status is Status.ACTIVE and lo.kind != "semaphore"]
        if active:
            for lo in floors:              # what plain cleanup removed already: say so
                if lo.removed:
                    _out(_cleanup_line(lo))
            raise BadInput("cleanup --all", f"{len(active)} asirt run(s) are active ("
                           + ", ".join(f"{lo.ipc_name}, pid {lo.creator_pid}" for lo in active)
                           + "): --all would break them",
                           "wait until they end, or run 'asirt cleanup' without --all: it "
                           "removes only what finished runs left")
    seen = reclaim(unjudged=args.all) + floors
    for lo in seen:
        _out(_cleanup_line(lo))
    if not seen:
        _out("nothing to clean up")
    failed = [lo for lo in seen if lo.status is Status.STALE and not lo.removed]
    return EXIT_CHECK if failed else EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from asirt.kvm import profile as kvm_profile
    if args.profile_command == "list":
        print(kvm_profile.format_profiles(kvm_profile.load(name)
                                          for name in kvm_profile.builtin_names()))
    elif args.profile_command == "show":
        prof = kvm_profile.load(args.profile)
        print(json.dumps(kvm_profile.to_json(prof), indent=2) if args.json
              else kvm_profile.format_profile(prof))
    else:
        try:
            prof = kvm_profile.read_report(args.report, name=args.name,
                                           exit_rate_hz=args.exit_rate_hz)
        except BadInput as err:     # the Profile names its field; the user typed an option
            flag = {"name": "--name", "exit_rate_hz": "--exit-rate-hz"}.get(err.what)
            if flag is None:
                raise
            raise BadInput(flag, err.problem, err.fix) from None
        if args.out:
            kvm_profile.save_new(prof, args.out, f"-o {args.out}")
            print(f"wrote {args.out}: profile {prof.name}, {len(prof.reasons)} exit reasons")
        else:
            sys.stdout.write(kvm_profile.to_toml(prof))
        if args.exit_rate_hz is None:
            print(f"asirt: note: exit_rate_hz is the stated default "
                  f"{kvm_profile.DEFAULT_EXIT_RATE_HZ:g} Hz: a perf kvm stat table has no wall "
                  "time; pass --exit-rate-hz HZ when you know the rate", file=sys.stderr)
    return EXIT_OK


COMMANDS = {"topology": cmd_topology, "bench": cmd_bench, "stress": cmd_stress,
            "report": cmd_report,
            "profile": cmd_profile,
            "compare": cmd_compare, "cleanup": cmd_cleanup}


def main(argv: Sequence[str] | None = None, *, restore_signals: bool = True) -> int:
    """The command line; returns the exit status.

    ``restore_signals`` False is for the console entry point, whose process ends with this
    call: the signal handling then stays, only noting, so that a signal that comes once the
    status is chosen cannot change it (the default action of SIGTERM would make it 143).
    """
    interrupts = _Interrupts()
    try:
        args = build_parser().parse_args(argv)
        args.signals = interrupts
        return COMMANDS[args.command](args)
    except AsirtError as err:
        interrupts.raising = False
        print(f"asirt: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        interrupts.raising = False
        print("asirt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:            # the reader stopped reading (| head): not a failure
        _silence_stdout()
        return EXIT_OK
    finally:
        interrupts.raising = False
        if restore_signals:
            interrupts.restore()

