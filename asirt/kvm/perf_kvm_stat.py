"""The VM-EXIT table of ``perf kvm stat report`` (and ``perf kvm stat live``) as text.

A pure parser: ``parse_table(text, origin) -> Table``. It reads the table as perf prints it
and as it survives being pasted into mail, blogs and bug reports:

- perf up to 6.x (``tools/perf/builtin-kvm.c``, ``print_result``; spacing narrowed here)::

      Analyze events for all VMs, all VCPUs:

          VM-EXIT  Samples  Samples%  Time%  Min Time   Max Time  Avg time

        MSR_WRITE     9167    35.40%  0.04%    0.45us  9554.94us    3.00us ( +-  41.94% )

      Total Samples:25898, Total events handled time:68281638.61us.

  The ``( +- x% )`` is perf's ``rel_stddev_stats``: the standard deviation *of the mean*
  (``stddev / sqrt(n)``) relative to the mean, in percent.
- the column layout with the unit in the header (RISC-V's port, 2024)::

      Event name    Samples  Sample%  Time (ns)  Time%  Max Time (ns)  Min Time (ns)  Mean Time (ns)
      LOAD_ACCESS       986    1.00%  671556200 13.00%        4180200         100700          681091

  Columns are taken from the header line, so their order and units come from it.
- ``perf kvm stat live``: a wall-clock line (``15:52:35.709821``) above each table.
- mail and web: ``> `` quote prefixes (any depth), CRLF, tabs, trailing blanks, a row or the
  header wrapped onto the next line, a ``( +- x%`` that lost its ``)``, no Total line.

Lines perf itself prints and that carry no data are skipped: blank lines, ``Analyze events
for ...:``, the live-mode time stamp, and ``unknown kvm exit code:N on VMX`` warnings (perf
prints them before an ``UNKNOWN`` row). Anything else is refused with its line number and
text: import the report, not the mail around it. One table per input.

The Samples of the rows must add up to ``Total Samples`` when that line is present: tables
whose author left rows out (``[..]``, a truncated paste) would give wrong shares. Without a
Total line the check cannot be made and ``Table.total_samples`` is None (say so downstream).

Imports only the standard library and ``asirt.errors``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from asirt.errors import BadInput

__all__ = ["Row", "Table", "parse_table", "TOTAL_TOLERANCE"]

#: how far the sum of the rows' Samples may be off Total Samples, as a fraction of the total:
#: the 0.01% a row whose Samples% prints as 0.00% can hide. More is rows left out or added.
TOTAL_TOLERANCE = 1e-4

_UNIT_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}
_NUM = r"(\d{1,15}(?:\.\d{1,9})?)(?!\d|\.\d)"      # bounded: no 5000-digit int() calls
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+")
_ANALYZE = re.compile(r"^Analyze\s+events\s+for\s.*:$", re.IGNORECASE)
_STAMP = re.compile(r"^\d{1,2}:\d{2}:\d{2}(?:\.\d+)?$")
_UNKNOWN = re.compile(r"^unknown\s+kvm\s+exit\s+code:\s*-?\d+\s+on\s+(?:VMX|SVM)$",
                      re.IGNORECASE)
_TOTAL_START = re.compile(r"^Total\s+Samples\s*:", re.IGNORECASE)
_TOTAL = re.compile(r"^Total\s+Samples\s*:\s*(\d{1,15})\s*,\s*Total\s+events\s+handled\s+"
                    r"time\s*:\s*"
                    + _NUM + r"\s*(ns|us|ms|s)?\s*\.?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]*$")
_HEAD = re.compile(r"\s*(?:vm-exit|event\s+name|msr\s+access|io\s+port\s+access|"
                   r"mmio\s+access)(?![\w-])", re.IGNORECASE)
# One column label of the header, longest spellings first; a unit may follow in brackets.
_LABEL = re.compile(
    r"\s*(?:(?P<name>vm-exit|event\s+name)|(?P<other>msr\s+access|io\s+port\s+access|"
    r"mmio\s+access)|(?P<spct>samples?%)|(?P<count>samples)|(?P<tpct>time%)|"
    r"(?P<min>min\s+time)|(?P<max>max\s+time)|(?P<mean>(?:avg|mean)\s+time)|(?P<total>time))"
    r"(?:\s*\((?P<unit>ns|us|ms)\))?(?![\w%])", re.IGNORECASE)
_KINDS = ("name", "other", "spct", "count", "tpct", "min", "max", "mean", "total")
_VALUE = re.compile(r"\s*" + _NUM + r"\s*(%|ns|us|ms|s(?![A-Za-z]))?")
_TAIL = re.compile(r"\s*\(\s*\+-\s*" + _NUM + r"\s*%\s*\)?\s*$")
_REQUIRED = ("count", "max", "mean")
_ROUNDING_NS = 10.0                  # perf prints times to 0.01us
_LABELS = {"count": "Samples", "spct": "Samples%", "tpct": "Time%", "min": "Min Time",
           "max": "Max Time", "mean": "Avg time", "total": "Time"}


@dataclass(frozen=True)
class Row:
    """One exit reason as the table states it; times in ns."""

    name: str
    line: int
    samples: int
    mean_ns: float
    max_ns: float
    min_ns: float | None
    rel_stderr_pct: float | None      # perf's ( +- x% ): stddev of the mean / mean


@dataclass(frozen=True)
class Table:
    rows: tuple[Row, ...]
    total_samples: int | None
    total_time_ns: float | None
    total_line: int | None


@dataclass(frozen=True)
class _Header:
    line: int
    columns: tuple[tuple[str, str | None], ...]   # (kind, unit from the header) after the name


def _labels(text: str) -> tuple[list[tuple[str, str | None]], str]:
    """The column labels at the start of ``text`` and what is left after them."""
    columns: list[tuple[str, str | None]] = []
    pos = 0
    while (m := _LABEL.match(text, pos)) is not None and m.end() > pos:
        kind = next(k for k in _KINDS if m.group(k))
        columns.append((kind, m.group("unit") and m.group("unit").lower()))
        pos = m.end()
    return columns, text[pos:].strip()


class _Parser:
    """A line-at-a-time reader of one table; every refusal names the line and its text."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.header: _Header | None = None
        self.head_text = ""             # a header that may continue on the next line
        self.head_line = 0
        self.rows: list[Row] = []
        self.pending: tuple[int, str, str] | None = None   # a row still missing columns
        self.tail_open = False           # the last row may still get its ( +- x% )
        self.total: tuple[int, float, int] | None = None
        self.total_text: tuple[int, str] | None = None      # a Total line cut in two

    def fail(self, lineno: int, text: str, problem: str, fix: str) -> BadInput:
        return BadInput(f"{self.origin} line {lineno}", f"{problem}: {text.strip()!r}", fix)

    # --- header ---------------------------------------------------------------------------

    def start_header(self, lineno: int, text: str) -> bool:
        if not _HEAD.match(text):
            return False
        if self.header is not None or self.rows or self.total is not None:
            raise self.fail(lineno, text, "a second table starts here",
                            "import one table per file (perf kvm stat live prints one per "
                            "interval: keep one)")
        self.head_text, self.head_line = text, lineno
        columns, rest = _labels(text)
        if not rest and all(k in (c for c, _ in columns) for k in _REQUIRED):
            self.end_header()
        return True

    def extend_header(self, text: str) -> bool:
        """A header wrapped by a mail client continues with a column label; join it."""
        columns, _ = _labels(text)
        if not columns or columns[0][0] in ("name", "other"):
            self.end_header()
            return False
        self.head_text = f"{self.head_text} {text}"
        columns, rest = _labels(self.head_text)
        if not rest and all(k in (c for c, _ in columns) for k in _REQUIRED):
            self.end_header()
        return True

    def end_header(self) -> None:
        text, line = self.head_text, self.head_line
        self.head_text = ""
        columns, rest = _labels(text)
        kinds = [k for k, _ in columns] or ["?"]
        if kinds[0] == "other":
            raise self.fail(line, text, "this is not the VM-EXIT table",
                            "import the table of `perf kvm stat report --event=vmexit`")
        if rest or "name" in kinds[1:] or "other" in kinds:
            raise self.fail(line, text, "unknown column in the header",
                            "give the header as perf prints it (VM-EXIT  Samples  Samples%  "
                            "Time%  Min Time  Max Time  Avg time)")
        missing = [_LABELS[k] for k in _REQUIRED if k not in kinds]
        if missing:
            raise self.fail(line, text, f"the table has no {' and no '.join(missing)} column",
                            "import a table from a perf that prints Samples, Min/Max Time and "
                            "Avg time (perf 3.12 and later)")
        if len(set(kinds)) != len(kinds):
            raise self.fail(line, text, "a column appears twice in the header",
                            "give the header as perf prints it")
        self.header = _Header(line, tuple(columns[1:]))

    # --- rows -----------------------------------------------------------------------------

    def start_row(self, lineno: int, text: str) -> bool:
        name, *more = text.split(None, 1)
        rest = more[0] if more else ""
        if not _NAME.match(name) or (rest and not rest[0].isdigit()):
            return False
        if self.header is None:
            raise self.fail(lineno, text, "a table row before the header line",
                            "include the VM-EXIT header line perf prints above the rows")
        if self.total is not None:
            raise self.fail(lineno, text, "a table row after the Total line",
                            "import one table per file")
        self.pending = (lineno, name, rest)
        self.finish_row()
        return True

    def finish_row(self) -> None:
        """Turn the pending row into a Row once it has a value for every column."""
        assert self.pending is not None and self.header is not None
        lineno, name, text = self.pending
        where = f"{name} {text}"
        values: dict[str, float] = {}
        pos = 0
        for kind, unit in self.header.columns:
            m = _VALUE.match(text, pos)
            if m is None:
                if text[pos:].strip():
                    raise self.fail(lineno, where, f"cannot read the {_LABELS[kind]} value",
                                    "give the row as perf prints it")
                return                     # wrapped: the rest comes on the next line
            values[kind] = self.value(lineno, where, kind, unit, m)
            pos = m.end()
        stderr: float | None = None
        if text[pos:].strip():
            tail = _TAIL.match(text, pos)
            if tail is None:
                raise self.fail(lineno, where, "unexpected text after the row's values",
                                "give the row as perf prints it")
            stderr = float(tail.group(1))
        self.pending = None
        self.tail_open = stderr is None
        self.rows.append(self.make_row(lineno, where, name, values, stderr))

    def value(self, lineno: int, where: str, kind: str, unit: str | None,
              m: re.Match[str]) -> float:
        number, suffix = m.group(1), m.group(2)
        if kind in ("spct", "tpct"):
            if suffix != "%":
                raise self.fail(lineno, where, f"the {_LABELS[kind]} value has no %",
                                "give the row as perf prints it")
            return float(number)
        if kind == "count":
            if suffix or "." in number:
                raise self.fail(lineno, where, "Samples is not a whole number",
                                "give the row as perf prints it")
            return float(number)
        if suffix == "%" or (suffix is None and unit is None):
            raise self.fail(lineno, where, f"the {_LABELS[kind]} has no time unit",
                            "times need a unit: 0.45us, or a header like Max Time (ns)")
        return float(number) * _UNIT_NS[(suffix or unit or "us").lower()]

    def make_row(self, lineno: int, where: str, name: str, v: dict[str, float],
                 stderr: float | None) -> Row:
        samples = int(v["count"])
        if samples <= 0:
            raise self.fail(lineno, where, "a row with no samples",
                            "remove the row: an exit that never happened has no share")
        lo, mean, hi = v.get("min"), v["mean"], v["max"]
        # perf rounds every time to 0.01us: allow that much disorder, refuse more
        floor = 0.0 if lo is None else lo
        if floor > hi or not floor - _ROUNDING_NS <= mean <= hi + _ROUNDING_NS:
            raise self.fail(lineno, where, "the times are not ordered Min <= Avg <= Max",
                            "check the row's Min, Max and Avg time")
        return Row(name, lineno, samples, min(max(mean, floor), hi), hi, lo, stderr)

    def tail(self, lineno: int, text: str) -> None:
        """The ( +- x% ) of the row above, wrapped onto a line of its own."""
        m = _TAIL.match(text)
        if m is None:
            raise self.fail(lineno, text, "cannot read the ( +- x% ) of the row above",
                            "give the row as perf prints it")
        self.tail_open = False
        last = self.rows[-1]
        self.rows[-1] = Row(last.name, last.line, last.samples, last.mean_ns, last.max_ns,
                            last.min_ns, float(m.group(1)))

    # --- lines ----------------------------------------------------------------------------

    def read_total(self, lineno: int, text: str) -> bool:
        if not _TOTAL_START.match(text):
            return False
        m = _TOTAL.match(text)
        if m is None:                    # wrapped by a mail client: join the next line
            self.total_text = (lineno, text)
        else:
            self.set_total(lineno, text, m)
        return True

    def end_total(self, text: str) -> None:
        assert self.total_text is not None
        lineno, head = self.total_text
        self.total_text = None
        m = _TOTAL.match(f"{head} {text}")
        if m is None:
            raise self.fail(lineno, head, "cannot read the Total line",
                            "give it as perf prints it: Total Samples:N, Total events handled "
                            "time:T us.")
        self.set_total(lineno, head, m)

    def set_total(self, lineno: int, text: str, m: re.Match[str]) -> None:
        if self.total is not None:
            raise self.fail(lineno, text, "a second Total line", "import one table per file")
        time_ns = float(m.group(2)) * _UNIT_NS[(m.group(3) or "us").lower()]
        self.total = (int(m.group(1)), time_ns, lineno)

    def line(self, lineno: int, raw: str) -> None:
        text = _QUOTE.sub("", raw, count=1).strip()
        if self.pending is not None:
            if text[:1].isdigit() or text[:1] == "(":
                start, name, values = self.pending
                self.pending = (start, name, f"{values} {text}")
                self.finish_row()
                return
            start, name, values = self.pending
            raise self.fail(start, f"{name} {values}", "the row ends before its last column",
                            "give the row with all its values")
        if self.total_text is not None:
            self.end_total(text)
            return
        if not text or _ANALYZE.match(text) or _STAMP.match(text) or _UNKNOWN.match(text):
            return
        if self.head_text and self.extend_header(text):
            return
        if self.tail_open and text.startswith("("):
            self.tail(lineno, text)
            return
        self.tail_open = False
        if self.read_total(lineno, text) or self.start_header(lineno, text) \
                or self.start_row(lineno, text):
            return
        raise self.fail(lineno, text, "not part of a perf kvm stat table",
                        "import only the report perf printed (header, rows, Total line)")

    def finish(self) -> Table:
        if self.pending is not None:
            start, name, values = self.pending
            raise self.fail(start, f"{name} {values}", "the row ends before its last column",
                            "give the row with all its values")
        if self.head_text:
            self.end_header()
        if self.total_text is not None:
            lineno, head = self.total_text
            raise self.fail(lineno, head, "the Total line is cut off",
                            "give it as perf prints it: Total Samples:N, Total events handled "
                            "time:T us.")
        if not self.rows:
            raise BadInput(self.origin, "has no VM-EXIT table rows",
                           "give the output of `perf kvm stat report --event=vmexit`")
        if self.total is None:
            return Table(tuple(self.rows), None, None, None)
        total, time_ns, total_line = self.total
        got = sum(r.samples for r in self.rows)
        if abs(got - total) > total * TOTAL_TOLERANCE:
            raise BadInput(f"{self.origin} line {total_line}",
                           f"the rows' Samples add up to {got} but Total Samples is {total}: "
                           "rows are missing or extra",
                           "import the complete table perf printed (no rows left out)")
        return Table(tuple(self.rows), total, time_ns, total_line)


def parse_table(text: str, origin: str) -> Table:
    """Parse the VM-EXIT table of ``perf kvm stat report``; BadInput names line and text."""
    parser = _Parser(origin)
    for lineno, raw in enumerate(text.splitlines(), 1):
        parser.line(lineno, raw)
    return parser.finish()
