"""Exit profiles: what a vCPU's VM exits look like, as data the benchmark draws from.

A profile lists exit reasons, each with its share of the exits, its handler time (mean, max
and min), the chance per exit that the handler touches each memory class (``global``,
``local``, ``sensitive``: see ``asirt.kvm.footprints``), the chance it is forwarded to the
user-space VMM, and ``kind``, how a real guest produces a comparable exit. ``exit_rate_hz``
is the number of exits per second of guest time per vCPU.

Files are TOML (``parse_toml`` / ``to_toml``); the built-in ones live in ``profiles/`` and
are each derived from a published ``perf kvm stat`` table (``parse_perf_kvm_stat``, whose
text parser is ``asirt.kvm.perf_kvm_stat``). ``sample`` precomputes the random draws the
vCPU loop cycles through, so the hot loop makes no per-exit Python random calls.

Distributions (what ``sample`` draws):

- guest interval between exits: exponential with mean ``1 / exit_rate_hz`` (exits as a
  Poisson process: the only assumption a bare rate supports), rounded to whole ns.
- handler time: the **maximum-entropy** distribution on ``[min_ns, max_ns]`` with mean
  ``mean_ns``, which is an exponential truncated to the interval (rising when the mean is
  above the midpoint, uniform when it is on it). A table gives min, mean and max and no
  shape; this is the one distribution that adds no other assumption, it hits the mean
  exactly (the benchmark's cost is shares x mean handler times) and never leaves the
  bounds, and its inverse CDF is closed-form, so sampling is one vectorised expression.
  Drawn values are rounded to whole ns within ``[ceil(min_ns), floor(max_ns)]``.
- reason: categorical over the shares; each memory touch and ``to_user``: an independent
  Bernoulli draw with the reason's probability.

Layering: imports numpy, the standard library, ``asirt.errors`` and its siblings
``asirt.kvm.footprints`` and ``asirt.kvm.perf_kvm_stat``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tempfile
import textwrap
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable

import numpy as np

from asirt.errors import BadInput
from asirt.kvm import footprints, perf_kvm_stat

__all__ = ["Source", "HandlerTime", "ExitReason", "Profile", "Draws", "parse_toml", "to_toml",
           "to_json", "builtin_names", "load", "parse_perf_kvm_stat", "read_report", "sample",
           "save_new", "format_profile", "format_profiles", "DEFAULT_EXIT_RATE_HZ",
           "MAX_HANDLER_NS", "MAX_EXIT_RATE_HZ", "MAX_REASONS"]

#: exits per second of guest time per vCPU when a table gives no wall time: the order of
#: magnitude commonly reported for a busy guest (1e3 to 1e5); say so wherever it is used.
DEFAULT_EXIT_RATE_HZ = 10_000.0
MAX_HANDLER_NS = 1e15          # 11.6 days: keeps every draw far inside int64
MAX_EXIT_RATE_HZ = 1e9         # one exit per ns of guest time
MAX_REASONS = 4096             # reason indices are int16
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}$")
_NAME_FIX = "use 1 to 64 letters, digits, '.', '_', ':' or '-' (not starting with '.', ':' or '-')"


# --- the data ---------------------------------------------------------------------------

def _text(what: str, value: object, *, required: bool) -> str:
    if not isinstance(value, str):
        raise BadInput(what, f"is {value!r}, not a string", "give a quoted string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(what, "is not valid Unicode text", "give plain UTF-8 text") from None
    if required and not value.strip():
        raise BadInput(what, "is empty", "give a non-empty string")
    return value


def _name(what: str, value: object) -> str:
    text = _text(what, value, required=True)
    if not _NAME.match(text):
        raise BadInput(what, f"{text!r} is not a valid name", _NAME_FIX)
    return text


def _number(what: str, value: object, lo: float, hi: float, fix: str, *,
            lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(what, f"is {value!r}, not a number", fix)
    number = float(value)
    if not math.isfinite(number) or number > hi or number < lo or (lo_open and number == lo):
        raise BadInput(what, f"is {value!r}, out of range", fix)
    return number


def _probability(what: str, value: object) -> float:
    return _number(what, value, 0.0, 1.0, "give a probability between 0 and 1")


@dataclass(frozen=True)
class Source:
    """Where a profile's numbers come from."""

    title: str
    url: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        _text("source.title", self.title, required=True)
        _text("source.url", self.url, required=False)
        _text("source.date", self.date, required=False)


@dataclass(frozen=True)
class HandlerTime:
    """An exit handler's run time in ns: mean and max, and min where known (else 0)."""

    mean_ns: float
    max_ns: float
    min_ns: float = 0.0

    def __post_init__(self) -> None:
        fix = f"give a time in ns between 0 and {MAX_HANDLER_NS:.0e}"
        for key in ("mean_ns", "max_ns", "min_ns"):
            object.__setattr__(self, key, _number(key, getattr(self, key), 0.0,
                                                  MAX_HANDLER_NS, fix))
        if self.max_ns == 0:
            raise BadInput("max_ns", "is 0: a handler takes some time", fix)
        if not self.min_ns <= self.mean_ns <= self.max_ns:
            bad = "mean_ns" if self.min_ns <= self.max_ns else "min_ns"
            raise BadInput(bad, f"min_ns {self.min_ns:g} <= mean_ns {self.mean_ns:g} <= "
                           f"max_ns {self.max_ns:g} does not hold",
                           "make min_ns <= mean_ns <= max_ns")


@dataclass(frozen=True)
class ExitReason:
    """One exit reason: its share of exits, handler time, footprint and how it is made."""

    name: str
    share: float
    handler: HandlerTime
    kind: str
    p_global: float
    p_local: float
    p_sensitive: float
    p_to_user: float

    def __post_init__(self) -> None:
        _name("name", self.name)
        object.__setattr__(self, "share", _number(
            "share", self.share, 0.0, 1e300, "give a positive share (any scale: shares are "
            "normalised to sum 1)", lo_open=True))
        if not isinstance(self.handler, HandlerTime):
            raise BadInput("handler", f"is {self.handler!r}, not a HandlerTime",
                           "give mean_ns, max_ns and min_ns")
        if self.kind not in footprints.KINDS:
            raise BadInput("kind", f"is {self.kind!r}", f"choose one of "
                           f"{', '.join(footprints.KINDS)}")
        for key in ("p_global", "p_local", "p_sensitive", "p_to_user"):
            object.__setattr__(self, key, _probability(key, getattr(self, key)))


@dataclass(frozen=True)
class Profile:
    """An exit profile. Errors name TOML keys (``exit[2].name``); shares are normalised."""

    name: str
    description: str
    source: Source
    exit_rate_hz: float
    reasons: tuple[ExitReason, ...]

    def __post_init__(self) -> None:
        _name("name", self.name)
        _text("description", self.description, required=False)
        if not isinstance(self.source, Source):
            raise BadInput("source", f"is {self.source!r}, not a Source", "give a source title")
        object.__setattr__(self, "exit_rate_hz", _number(
            "exit_rate_hz", self.exit_rate_hz, 0.0, MAX_EXIT_RATE_HZ,
            f"give exits per second of guest time per vCPU, above 0 and at most "
            f"{MAX_EXIT_RATE_HZ:.0e}", lo_open=True))
        reasons = tuple(self.reasons)
        if not reasons:
            raise BadInput("exit", "lists no exit reasons", "give at least one [[exit]]")
        if len(reasons) > MAX_REASONS:
            raise BadInput("exit", f"lists {len(reasons)} exit reasons",
                           f"give at most {MAX_REASONS}")
        seen: set[str] = set()
        for i, reason in enumerate(reasons):
            if not isinstance(reason, ExitReason):
                raise BadInput(f"exit[{i}]", f"is {reason!r}, not an ExitReason",
                               "give name, share, handler, kind and the probabilities")
            if reason.name in seen:
                raise BadInput(f"exit[{i}].name", f"{reason.name!r} appears twice",
                               "give each exit reason once (merge the duplicates)")
            seen.add(reason.name)
        total = math.fsum(r.share for r in reasons)
        if not math.isfinite(total):
            raise BadInput("exit", "the shares add up to more than a float holds",
                           "give shares on a smaller scale")
        if abs(total - 1.0) > 1e-12:     # leave normalised shares alone: the round trip
            reasons = tuple(dataclasses.replace(r, share=r.share / total) for r in reasons)
        object.__setattr__(self, "reasons", reasons)

    @property
    def mean_interval_ns(self) -> float:
        return 1e9 / self.exit_rate_hz


# --- TOML --------------------------------------------------------------------------------

_KEYS = {
    "": (("name", "exit_rate_hz", "source", "exit"), ("description",)),
    "source": (("title",), ("url", "date")),
    "exit": (("name", "share", "kind", "p_global", "p_local", "p_sensitive", "p_to_user",
              "handler"), ()),
    "handler": (("mean_ns", "max_ns"), ("min_ns",)),
}


def _table(raw: object, path: str, schema: str) -> dict[str, Any]:
    """``raw`` as a TOML table with exactly the keys of ``schema``."""
    required, optional = _KEYS[schema]
    if not isinstance(raw, dict):
        raise BadInput(path or "the file", f"is {raw!r}, not a table",
                       f"give a table with {', '.join(required + optional)}")
    valid = required + optional
    for key in raw:
        if key not in valid:
            raise BadInput(f"{path}.{key}" if path else key, "is not a profile key",
                           f"the valid keys here are {', '.join(valid)}")
    for key in required:
        if key not in raw:
            raise BadInput(f"{path}.{key}" if path else key, "is missing",
                           f"give it (the keys here are {', '.join(valid)}; "
                           f"{', '.join(optional) or 'none'} optional)")
    return raw


def _at(prefix: str, build: Callable[[], Any]) -> Any:
    """Build one object; a BadInput from it names the key under ``prefix``."""
    try:
        return build()
    except BadInput as err:
        raise BadInput(f"{prefix}{err.what}", err.problem, err.fix) from None


def _from_dict(raw: object) -> Profile:
    top = _table(raw, "", "")
    src = _table(top["source"], "source", "source")
    source = _at("", lambda: Source(src["title"], src.get("url", ""), src.get("date", "")))
    exits = top["exit"]
    if not isinstance(exits, list):
        raise BadInput("exit", f"is {exits!r}, not an array of tables",
                       "give each exit reason as an [[exit]] table")
    reasons = []
    for i, item in enumerate(exits):
        entry = _table(item, f"exit[{i}]", "exit")
        h = _table(entry["handler"], f"exit[{i}].handler", "handler")
        handler = _at(f"exit[{i}].handler.", lambda: HandlerTime(
            h["mean_ns"], h["max_ns"], h.get("min_ns", 0.0)))
        reasons.append(_at(f"exit[{i}].", lambda: ExitReason(
            entry["name"], entry["share"], handler, entry["kind"], entry["p_global"],
            entry["p_local"], entry["p_sensitive"], entry["p_to_user"])))
    return Profile(top["name"], top.get("description", ""), source, top["exit_rate_hz"],
                   tuple(reasons))


def parse_toml(text: str, origin: str) -> Profile:
    """Parse a profile; every error is BadInput naming ``origin`` and the key (or line)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"at line (\d+)", str(err))
        where = f"line {m.group(1)}" if m else "somewhere"
        raise BadInput(f"profile {origin}", f"TOML syntax error at {where}: {err}",
                       "fix the TOML syntax (see https://toml.io)") from None
    except (ValueError, RecursionError) as err:   # a 5000-digit integer, [[[[...]]]]
        raise BadInput(f"profile {origin}", f"cannot be read as TOML: {err}",
                       "fix the TOML (see https://toml.io)") from None
    return _at(f"profile {origin}: ", lambda: _from_dict(raw))


def to_json(profile: Profile) -> dict[str, Any]:
    """The profile as plain data with the TOML's keys (``asirt profile show --json``)."""
    return {
        "name": profile.name, "description": profile.description,
        "source": dataclasses.asdict(profile.source), "exit_rate_hz": profile.exit_rate_hz,
        "exit": [{"name": r.name, "share": r.share, "kind": r.kind, "p_global": r.p_global,
                  "p_local": r.p_local, "p_sensitive": r.p_sensitive, "p_to_user": r.p_to_user,
                  "handler": dataclasses.asdict(r.handler)} for r in profile.reasons],
    }


def _toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_num(value: float) -> str:
    """Whole numbers as integers, the rest as the shortest float that reads back exactly."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _footprint_note(reason: ExitReason) -> str | None:
    fp, known = footprints.lookup(reason.name)
    if (reason.p_global, reason.p_local, reason.p_sensitive, reason.p_to_user, reason.kind) \
            != (fp.p_global, fp.p_local, fp.p_sensitive, fp.p_to_user, fp.kind):
        return None
    label = "stated default" if known else "fallback default (no entry for this reason)"
    return f"# footprint: {label}: {fp.why}"


def to_toml(profile: Profile) -> str:
    """The profile as TOML that ``parse_toml`` reads back to an equal Profile."""
    lines = [f"name = {_toml_str(profile.name)}",
             f"description = {_toml_str(profile.description)}",
             f"exit_rate_hz = {_toml_num(profile.exit_rate_hz)}", "", "[source]",
             f"title = {_toml_str(profile.source.title)}",
             f"url = {_toml_str(profile.source.url)}",
             f"date = {_toml_str(profile.source.date)}"]
    for r in profile.reasons:
        note = _footprint_note(r)
        h = r.handler
        lines += ["", *([note] if note else []), "[[exit]]",
                  f"name = {_toml_str(r.name)}", f"share = {_toml_num(r.share)}",
                  f"kind = {_toml_str(r.kind)}", f"p_global = {_toml_num(r.p_global)}",
                  f"p_local = {_toml_num(r.p_local)}",
                  f"p_sensitive = {_toml_num(r.p_sensitive)}",
                  f"p_to_user = {_toml_num(r.p_to_user)}",
                  f"handler = {{ mean_ns = {_toml_num(h.mean_ns)}, max_ns = "
                  f"{_toml_num(h.max_ns)}, min_ns = {_toml_num(h.min_ns)} }}"]
    return "\n".join(lines) + "\n"


# --- files ------------------------------------------------------------------------------

def builtin_names() -> list[str]:
    """The names of the built-in profiles (``asirt/kvm/profiles/*.toml``)."""
    folder = resources.files("asirt.kvm").joinpath("profiles")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read(path: str, what: str, fix: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise BadInput(what, "no such file", fix) from None
    except IsADirectoryError:
        raise BadInput(what, "is a directory, not a file", fix) from None
    except UnicodeDecodeError as err:
        raise BadInput(what, f"is not UTF-8 text (byte {err.start})",
                       "give a text file") from None
    except OSError as err:
        raise BadInput(what, f"cannot be read ({err.strerror})", fix) from err


def load(name_or_path: str) -> Profile:
    """A built-in profile by name, else a profile TOML file by path."""
    names = builtin_names()
    if name_or_path in names:
        text = resources.files("asirt.kvm").joinpath("profiles", f"{name_or_path}.toml")
        return parse_toml(text.read_text(encoding="utf-8"), f"built-in {name_or_path}")
    text = _read(name_or_path, f"profile {name_or_path!r}",
                 f"choose a built-in profile ({', '.join(names)}) or give the path of a "
                 "profile TOML file")
    return parse_toml(text, name_or_path)


def save_new(profile: Profile, path: str, what: str) -> None:
    """Write the profile's TOML to a new file at ``path``, atomically; never overwrite.

    The text goes to a temporary file in the same directory, is fsynced, and is then
    hard-linked to ``path`` (link fails if ``path`` exists, so no check-then-write race) and
    the temporary name removed; on a file system without hard links it is renamed after an
    existence check. Every way out removes the temporary file: no half-written profile.
    """
    fix = "choose a new file name (asirt never overwrites a profile)"
    if os.path.lexists(path):
        raise BadInput(what, "already exists", fix)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".asirt-profile-", suffix=".tmp", dir=folder)
    except OSError as err:
        raise BadInput(what, f"cannot be written ({err.strerror})",
                       "give a path in an existing, writable directory") from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_toml(profile))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise BadInput(what, "already exists", fix) from None
        except OSError:                    # no hard links here: rename, checked just before
            if os.path.lexists(path):
                raise BadInput(what, "already exists", fix) from None
            os.rename(tmp, path)
    except OSError as err:
        raise BadInput(what, f"cannot be written ({err.strerror})",
                       "give a path in an existing, writable directory") from err
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


# --- perf kvm stat -----------------------------------------------------------------------

def _merge(rows: Iterable[perf_kvm_stat.Row]) -> dict[str, list[perf_kvm_stat.Row]]:
    """Rows by normalised reason, in table order (perf can print a reason twice)."""
    merged: dict[str, list[perf_kvm_stat.Row]] = {}
    for row in rows:
        merged.setdefault(footprints.normalise(row.name), []).append(row)
    return merged


def _reason(key: str, rows: list[perf_kvm_stat.Row], origin: str) -> ExitReason:
    samples = sum(r.samples for r in rows)
    mean = math.fsum(r.samples * r.mean_ns for r in rows) / samples
    mins = [r.min_ns for r in rows if r.min_ns is not None]
    fp, _ = footprints.lookup(key)
    hi = max(r.max_ns for r in rows)
    lo = min(mins) if len(mins) == len(rows) else 0.0
    return _at(f"{origin} line {rows[0].line}: ", lambda: ExitReason(
        key, float(samples), HandlerTime(float(round(mean)), float(round(hi)),
                                         float(round(lo))),
        fp.kind, fp.p_global, fp.p_local, fp.p_sensitive, fp.p_to_user))


def _default_name(origin: str) -> str:
    stem = os.path.splitext(os.path.basename(origin))[0]
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", stem).strip("-._:")[:64]
    return name if name and _NAME.match(name) else "imported"


def parse_perf_kvm_stat(text: str, origin: str, *, name: str | None = None,
                        exit_rate_hz: float | None = None) -> Profile:
    """A profile from the text of ``perf kvm stat report`` (see ``asirt.kvm.perf_kvm_stat``).

    Shares and handler times are the table's; each reason's footprint, ``to_user`` and
    ``kind`` are the stated defaults of ``asirt.kvm.footprints``; ``exit_rate_hz`` is
    ``DEFAULT_EXIT_RATE_HZ`` unless given (a table has no wall time). The description says
    which is which.
    """
    table = perf_kvm_stat.parse_table(text, origin)
    merged = _merge(table.rows)
    reasons = tuple(_reason(key, rows, origin) for key, rows in merged.items())
    exits = sum(r.samples for r in table.rows)
    notes = [f"Imported from the perf kvm stat report in {os.path.basename(origin)}: "
             f"{len(reasons)} exit reasons, {exits} exits. Shares and handler times "
             "(min, avg, max) are the table's."]
    if table.total_samples is None:
        notes.append("The table has no Total Samples line, so whether rows were left out "
                     "could not be checked.")
    else:
        notes.append(f"The rows add up to Total Samples ({table.total_samples}).")
    twice = [f"{k} ({len(v)} rows)" for k, v in merged.items() if len(v) > 1]
    if twice:
        notes.append(f"Rows of one reason were merged (samples summed, mean weighted): "
                     f"{', '.join(twice)}.")
    notes.append("Memory footprints, to_user and kind are stated defaults per reason "
                 "(asirt/kvm/footprints.py).")
    fallback = [k for k in merged if not footprints.lookup(k)[1]]
    if fallback:
        notes.append(f"No footprint entry for {', '.join(fallback)}: they got the fallback "
                     f"default ({footprints.FALLBACK.why}).")
    if exit_rate_hz is None:
        exit_rate_hz = DEFAULT_EXIT_RATE_HZ
        notes.append(f"exit_rate_hz is a stated default of {DEFAULT_EXIT_RATE_HZ:g} Hz: a "
                     "perf kvm stat table has no wall time to derive it from.")
    else:
        notes.append(f"exit_rate_hz {exit_rate_hz:g} Hz was given at import.")
    base = os.path.basename(origin)
    return _at("", lambda: Profile(name or _default_name(origin), " ".join(notes),
                                   Source(f"perf kvm stat report {base}"), exit_rate_hz,
                                   reasons))


def read_report(path: str, *, name: str | None = None,
                exit_rate_hz: float | None = None) -> Profile:
    """``parse_perf_kvm_stat`` of a file."""
    text = _read(path, f"report {path!r}",
                 "give the path of a file holding `perf kvm stat report` output")
    return parse_perf_kvm_stat(text, path, name=name, exit_rate_hz=exit_rate_hz)


# --- sampling ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Draws:
    """``n`` precomputed exits; the vCPU loop cycles through these arrays."""

    interval_ns: np.ndarray       # int64: guest time before the exit
    reason: np.ndarray            # int16: index into Profile.reasons
    handler_ns: np.ndarray        # int64: the handler's run time
    touch_global: np.ndarray      # bool
    touch_local: np.ndarray       # bool
    touch_sensitive: np.ndarray   # bool
    to_user: np.ndarray           # bool

    def __len__(self) -> int:
        return len(self.reason)


def _mean_of(a: float) -> float:
    """Mean of the density proportional to exp(-a t) on [0, 1]."""
    if abs(a) < 1e-4:                       # series: avoids 1/a - 1/a cancellation
        return 0.5 - a / 12.0
    if a > 0:
        return 1.0 / a - math.exp(-a) / -math.expm1(-a)
    return 1.0 - _mean_of(-a)


@functools.lru_cache(maxsize=4096)
def _exp_param(m: float) -> float:
    """The ``a`` whose truncated exponential on [0, 1] has mean ``m`` (0 < m < 1)."""
    if abs(m - 0.5) < 1e-12:
        return 0.0
    if m > 0.5:
        return -_exp_param(1.0 - m)
    lo, hi = 0.0, 2.0 / m + 10.0            # mean(a) < 1/a: the root is below 1/m
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _mean_of(mid) > m:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _handler_params(reasons: tuple[ExitReason, ...]) -> tuple[np.ndarray, ...]:
    """Per reason: low end, width, exponent a (0: uniform, nan: constant at the mean), and
    the whole-ns bounds draws are rounded into."""
    lo, width, a, low_ns, high_ns = [], [], [], [], []
    for r in reasons:
        h = r.handler
        w = h.max_ns - h.min_ns
        m = (h.mean_ns - h.min_ns) / w if w > 0 else 0.5
        lo.append(h.min_ns)
        width.append(w)
        a.append(math.nan if w <= 0 or m <= 0.0 or m >= 1.0 else _exp_param(m))
        first, last = math.ceil(h.min_ns), math.floor(h.max_ns)
        if first > last:                    # no whole ns inside: the nearest to the mean
            first = last = round(h.mean_ns)
        low_ns.append(first)
        high_ns.append(last)
    return tuple(np.array(x) for x in (lo, width, a, low_ns, high_ns))


def sample(profile: Profile, rng: np.random.Generator, n: int) -> Draws:
    """``n`` exits drawn from ``profile`` (see the module docstring for the distributions).

    Vectorised: a fixed number of numpy calls whatever ``n``; the same generator state gives
    the same draws.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise BadInput("the number of draws", f"is {n!r}", "give a whole number >= 0")
    reasons = profile.reasons
    interval = np.rint(rng.exponential(profile.mean_interval_ns, n)).astype(np.int64)
    cum = np.cumsum([r.share for r in reasons])
    idx = np.minimum(np.searchsorted(cum / cum[-1], rng.random(n), side="right"),
                     len(reasons) - 1).astype(np.int16)

    lo, width, a, low_ns, high_ns = (x[idx] for x in _handler_params(reasons))
    mean = np.array([r.handler.mean_ns for r in reasons])[idx]
    u = rng.random(n)
    flat = np.isnan(a)                          # min == max, or the mean sits on a bound
    k = np.where(flat | (a == 0.0), 1.0, np.abs(a))
    t = -np.log1p(u * np.expm1(-k)) / k         # inverse CDF of the density ~ exp(-k t)
    t = np.where(a == 0.0, u, np.where(a < 0.0, 1.0 - t, t))   # uniform; mirrored
    raw = np.where(flat, mean, lo + width * t)
    handler = np.clip(np.rint(raw), low_ns, high_ns).astype(np.int64)

    probs = np.array([[r.p_global, r.p_local, r.p_sensitive, r.p_to_user] for r in reasons])
    touches = rng.random((4, n)) < probs.T[:, idx]
    return Draws(interval, idx, handler, touches[0], touches[1], touches[2], touches[3])


# --- text --------------------------------------------------------------------------------

def _fmt_ns(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f}{unit}"
    return f"{ns:.0f}ns"


def _columns(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in col) for col in zip(head, *rows)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in (head, ["-" * w for w in widths], *rows)]


def format_profile(profile: Profile) -> str:
    """A profile for people: what it is, where it comes from, and a table of its reasons."""
    src = profile.source
    lines = [f"profile {profile.name}",
             *textwrap.wrap(profile.description, 100, initial_indent="  ",
                            subsequent_indent="  "),
             f"source: {src.title}" + (f" ({src.date})" if src.date else ""),
             *([f"        {src.url}"] if src.url else []),
             f"exit rate: {profile.exit_rate_hz:g} Hz per vCPU of guest time "
             f"(mean guest interval {_fmt_ns(profile.mean_interval_ns)})", ""]
    rows = [[r.name, f"{100 * r.share:.3g}%", r.kind, _fmt_ns(r.handler.mean_ns),
             _fmt_ns(r.handler.min_ns), _fmt_ns(r.handler.max_ns), f"{r.p_global:g}",
             f"{r.p_local:g}", f"{r.p_sensitive:g}", f"{r.p_to_user:g}"]
            for r in profile.reasons]
    head = ["REASON", "SHARE", "KIND", "MEAN", "MIN", "MAX", "GLOBAL", "LOCAL", "SENSITIVE",
            "TO_USER"]
    return "\n".join(lines + _columns(head, rows))


def format_profiles(profiles: Iterable[Profile]) -> str:
    """One line per profile: name, exit rate, number of reasons, source."""
    rows = [[p.name, f"{p.exit_rate_hz:g} Hz", str(len(p.reasons)),
             p.source.title if len(p.source.title) <= 70 else p.source.title[:67] + "..."]
            for p in profiles]
    return "\n".join(_columns(["NAME", "EXIT RATE", "REASONS", "SOURCE"], rows))
