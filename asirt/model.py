"""Run the SPIN model of the strict stun handshake (``model/stun.pml``).

``verify(n, variant)`` generates the verifier with ``spin -a``, compiles it with gcc and
runs it in a temporary directory (removed afterwards), and returns what pan found.
When pan reports an error, the trail is replayed with ``spin -t`` and the monitor's
verdict (``MONITOR: S1 violated ...``) is put in ``violations``.

Variants (see model/README.md): ``strict`` (the reference protocol; must verify),
``naive`` (no ack wait: S1 must fail), ``peek`` (wait only for siblings seen in GUEST:
S1 must fail), ``hold`` (a lane going idle raises its generation without waiting for acks
and shows domain 0 before its flush: S3 must fail). Checks: ``safety`` (S1, S2, S3 and invalid end states = deadlock),
``progress`` (no non-progress cycle under weak fairness), ``granted`` (LTL: a waiting
requester always gets HOST, under weak fairness; strict only).

    python -m asirt.model            # strict 2 and 4, naive 2
    python -m asirt.model -n 3 --variant naive
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from asirt.errors import BadInput, FeatureMissing

__all__ = ["ModelResult", "verify", "model_path", "VARIANTS", "CHECKS"]

VARIANTS = ("strict", "naive", "peek", "hold")
CHECKS = ("safety", "progress", "granted")

#: the model, in the source tree next to the package
MODEL = Path(__file__).resolve().parent.parent / "model" / "stun.pml"

#: pan search depth per N (deep DFS paths: the model loops forever)
_DEPTH = {2: 200_000, 3: 2_000_000, 4: 5_000_000}
#: pan hash table size (2^w slots) per N
_HASH = {2: 20, 3: 23, 4: 26}


@dataclass
class ModelResult:
    """What one pan run found. ``ok``: no error and the search was complete."""

    ok: bool
    errors: int
    states: int
    depth: int
    output: str
    variant: str = "strict"
    check: str = "safety"
    n: int = 2
    defines: list[str] = field(default_factory=list)
    complete: bool = True
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        verdict = "verified" if self.ok else (
            "INCOMPLETE" if not self.complete and not self.errors else "ERRORS")
        extra = f" [{'; '.join(self.violations)}]" if self.violations else ""
        return (f"N={self.n} {self.variant}/{self.check} {' '.join(self.defines)}: {verdict}, "
                f"errors={self.errors} states={self.states} depth={self.depth} "
                f"{self.seconds:.1f}s{extra}")


def model_path() -> Path:
    if not MODEL.is_file():
        raise FeatureMissing("the SPIN model", f"{MODEL} does not exist",
                             "run from an asirt source checkout (model/stun.pml)")
    return MODEL


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FeatureMissing(name, f"'{name}' is not on PATH, needed to verify the model",
                             "install it: apt-get install spin gcc")
    return path


def _defines(n: int, variant: str, check: str, domains: str) -> list[str]:
    if n not in _DEPTH:
        raise BadInput("n", f"{n} siblings are not modelled", "use 2, 3 or 4")
    if variant not in VARIANTS:
        raise BadInput("variant", f"unknown variant {variant!r}", f"use one of {VARIANTS}")
    if check not in CHECKS:
        raise BadInput("check", f"unknown check {check!r}", f"use one of {CHECKS}")
    if check == "granted" and variant != "strict":
        raise BadInput("check", "'granted' refers to the strict wait (label R2)",
                       "use it with variant='strict'")
    if domains not in ("auto", "any", "fixed"):
        raise BadInput("domains", f"unknown value {domains!r}", "use auto, any or fixed")
    defs = [f"-DN={n}"]
    if variant != "strict":
        defs.append(f"-D{variant.upper()}")
    if domains == "fixed" or (domains == "auto" and n >= 4):
        defs.append("-DFIXDOM")
    if check == "granted":
        defs.append("-DLIVE")
    return defs


#: pan prints the count with "%9.8g": 1.2345678e+08 above 10^8 states
STATES_RE = r"([\d.e+]+) states, stored"


def _int(pattern: str, text: str, default: int = 0) -> int:
    m = re.search(pattern, text)
    return int(float(m.group(1))) if m else default


def _run(cmd: list[str], cwd: Path, deadline: float, what: str) -> str:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"model check ran out of time before {what}")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=left,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{what} did not finish in time ({' '.join(cmd)})") from exc
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and what != "pan":
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out}")
    return out


def verify(n: int, variant: str = "strict", workdir: str | Path | None = None,
           timeout: float = 300.0, *, check: str = "safety", domains: str = "auto",
           model: str | Path | None = None, keep: bool = False) -> ModelResult:
    """Model-check the handshake with ``n`` siblings.

    ``domains``: ``any`` (every schedule may pick any domain), ``fixed`` (-DFIXDOM: each
    CPU runs idle or its own VM), ``auto`` (any for n <= 3, fixed for n = 4, whose full
    space takes minutes and gigabytes). ``workdir``: parent directory for the temporary
    build directory (default: the system's); ``keep`` leaves that directory in place
    (for reading the trail). Raises FeatureMissing without spin or gcc, TimeoutError
    when ``timeout`` seconds (for the whole run) pass.
    """
    defs = _defines(n, variant, check, domains)
    spin, gcc = _tool("spin"), _tool("gcc")
    src = Path(model) if model is not None else model_path()
    if not src.is_file():
        raise BadInput("model", f"{src} does not exist", "pass the path of stun.pml")
    deadline = time.monotonic() + timeout
    tmp = Path(tempfile.mkdtemp(prefix="asirt-model-", dir=workdir))
    try:
        shutil.copy(src, tmp / "stun.pml")
        _run([spin, "-a", *defs, "stun.pml"], tmp, deadline, "spin -a")
        cflags = ["-O2", "-w", "-DCOLLAPSE"]
        pan_args = [f"-m{_DEPTH[n]}", f"-w{_HASH[n]}"]
        if check == "safety":
            cflags.append("-DSAFETY")
        elif check == "progress":
            cflags.append("-DNP")
            pan_args += ["-l", "-f"]
        else:
            pan_args += ["-a", "-f"]
        _run([gcc, *cflags, "-o", "pan", "pan.c"], tmp, deadline, "gcc")
        start = time.monotonic()
        out = _run(["./pan", *pan_args], tmp, deadline, "pan")
        seconds = time.monotonic() - start
        errors = _int(r"errors: (\d+)", out, default=-1)
        if errors < 0:
            raise RuntimeError(f"could not read pan's result:\n{out}")
        complete = "max search depth too small" not in out and "out of memory" not in out
        violations: list[str] = []
        if errors and (tmp / "stun.pml.trail").exists():
            trail = _run([spin, "-t", *defs, "stun.pml"], tmp, deadline, "spin -t")
            violations = sorted(set(re.findall(r"MONITOR: (S\d violated[^\n]*)", trail)))
            if not violations:
                kinds = re.findall(r"pan:1: ([a-z -]+?) \(at depth", out)
                violations = kinds or ["error (see output)"]
            out += "\n--- trail replay (spin -t) ---\n" + trail
        return ModelResult(
            ok=errors == 0 and complete, errors=errors,
            states=_int(STATES_RE, out), depth=_int(r"depth reached (\d+)", out),
            output=out, variant=variant, check=check, n=n, defines=defs[1:],
            complete=complete, violations=violations, seconds=seconds)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asirt.model", description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, action="append", help="siblings (repeatable; default 2 4)")
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--check", choices=CHECKS, default="safety")
    ap.add_argument("--domains", choices=("auto", "any", "fixed"), default="auto")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("-v", "--verbose", action="store_true", help="print pan's output")
    args = ap.parse_args(argv)
    ns = args.n or [2, 4]
    runs = ([(n, args.variant) for n in ns] if args.variant
            else [(n, "strict") for n in ns] + [(2, "naive")])
    bad = False
    for n, variant in runs:
        res = verify(n, variant, timeout=args.timeout, check=args.check, domains=args.domains)
        print(res.summary())
        if args.verbose:
            print(res.output)
        expected_ok = variant == "strict"
        bad |= res.ok != expected_ok or (not expected_ok and not res.errors)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
