"""Log-linear latency histograms: recording on the hot path, merging and summaries in the parent.

The bucketing is HdrHistogram's with 128 sub-buckets (``subBucketCount``) and unit 1 ns: values
below 128 ns have a bucket each (exact); above, every power of two is cut into 64 equal steps,
so a bucket is at most 1/64 (1.6 %) of its lower bound wide::

    v < 128:   index = v
    v >= 128:  shift = v.bit_length() - 7;  index = shift * 64 + (v >> shift)

The indices are contiguous (127 -> 127, 128 -> 128, 255 -> 191, 256 -> 192) and the scheme fills
the region's ``HIST_BUCKETS`` (2304) counters exactly: the last bucket is
``[127 << 34, MAX_VALUE]`` with ``MAX_VALUE = 2**41 - 1`` ns (about 36.6 minutes). Negative
values count as 0; values above ``MAX_VALUE`` count in the last bucket (overflow; a summary
then reports ``MAX_VALUE`` as the max). In HdrHistogram's terms: 35 buckets of 128 sub-buckets,
``countsArrayLength = (35 + 1) * 64``.

A histogram is an int64 array of ``NBUCKETS`` counts. Workers record into their own histograms
in the shared region through the region's int64 ``memoryview`` (one writer per histogram, no
IPC); the parent merges them with numpy and summarizes.

Reported values, everywhere in this module (HdrHistogram's conventions):

- a percentile is the *highest value equivalent* to (the inclusive upper bound of) the bucket in
  which the cumulative count first reaches ``ceil(q * count)`` (at least 1), like
  HdrHistogram's ``getValueAtPercentile``; it is >= the exact sample percentile and at most
  1/64 above it;
- ``min`` is the lower bound of the first non-empty bucket, ``max`` the upper bound of the last;
- ``mean`` (and the standard deviation of ``.hgrm`` files) weigh each bucket by its midpoint
  ``(low + high) / 2``, exact below 128 ns.

This module imports numpy and shm_layout only.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Callable, Iterable, NamedTuple, overload

import numpy as np

from shm_layout.sections import HIST_BUCKETS

__all__ = ["SUB_BITS", "SUB_BUCKETS", "NBUCKETS", "MAX_VALUE", "HDR_BUCKETS", "TABLE_LIMIT",
           "bucket_index", "bucket_indices", "bucket_bounds", "record", "recorder",
           "record_many", "invalid", "merge", "Summary", "summarize", "to_dict", "HgrmRow",
           "percentile_distribution", "write_hgrm", "read_hgrm"]

SUB_BITS = 6                         #: log2 of the linear steps per power of two (64)
SUB_BUCKETS = 2 << SUB_BITS          #: HdrHistogram's subBucketCount: 128, exact below it
NBUCKETS = HIST_BUCKETS              #: counters per histogram (the region's item size)
_MAX_SHIFT = NBUCKETS // (1 << SUB_BITS) - 2          # 34: shift of the last bucket
MAX_VALUE = (1 << (_MAX_SHIFT + SUB_BITS + 1)) - 1    #: 2**41 - 1 ns: highest value kept apart
HDR_BUCKETS = _MAX_SHIFT + 1         #: HdrHistogram's bucketCount (for .hgrm footers): 35
TABLE_LIMIT = 1 << 16                #: record() looks indices up in a table below this (65.5 us)


def bucket_index(v: int) -> int:
    """The bucket of a value in integer nanoseconds (the reference form of the scheme)."""
    v = operator.index(v)           # numpy integers too; floats are refused
    if v < SUB_BUCKETS:
        return v if v > 0 else 0
    if v > MAX_VALUE:
        return NBUCKETS - 1
    shift = v.bit_length() - (SUB_BITS + 1)
    return (shift << SUB_BITS) + (v >> shift)


# The scheme must fill the region's histogram exactly, no counter unused, none missing.
assert NBUCKETS % (1 << SUB_BITS) == 0, NBUCKETS
assert bucket_index(MAX_VALUE) == NBUCKETS - 1 and bucket_index(MAX_VALUE + 1) == NBUCKETS - 1
assert bucket_index(1 << (_MAX_SHIFT + SUB_BITS)) == NBUCKETS - (1 << SUB_BITS)
assert bucket_index(SUB_BUCKETS) == SUB_BUCKETS
assert HDR_BUCKETS + 1 == NBUCKETS // (1 << SUB_BITS)


def _bounds_of(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shift = np.maximum((idx >> SUB_BITS) - 1, 0)
    low = (idx - (shift << SUB_BITS)) << shift
    return low, low + (np.int64(1) << shift) - 1


_IDX = np.arange(NBUCKETS, dtype=np.int64)
_LOW, _HIGH = _bounds_of(_IDX)
_LOW.flags.writeable = False
_HIGH.flags.writeable = False
_MID = (_LOW + _HIGH) / 2.0          # float64: exact for every bound below 2**53
_MID.flags.writeable = False
assert _LOW[0] == 0 and _HIGH[-1] == MAX_VALUE and np.all(_LOW[1:] == _HIGH[:-1] + 1)
assert np.all((_HIGH - _LOW) * (1 << SUB_BITS) <= np.maximum(_LOW, 1))   # width <= low / 64


@overload
def bucket_bounds(idx: int) -> tuple[int, int]: ...
@overload
def bucket_bounds(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
def bucket_bounds(idx):
    """``(low, high)``, inclusive, of bucket ``idx``; for an array of indices, two int64 arrays."""
    if isinstance(idx, np.ndarray):
        if idx.size and (idx.min() < 0 or idx.max() >= NBUCKETS):
            raise IndexError(f"bucket indices must lie in [0, {NBUCKETS})")
        return _LOW[idx], _HIGH[idx]
    if not 0 <= idx < NBUCKETS:
        raise IndexError(f"bucket index {idx} outside [0, {NBUCKETS})")
    return int(_LOW[idx]), int(_HIGH[idx])


def bucket_indices(values: np.ndarray) -> np.ndarray:
    """Vectorised :func:`bucket_index` (int64 result); floats are truncated toward zero."""
    v = np.asarray(values)
    if v.dtype.kind == "f":
        if np.isnan(v).any():
            raise ValueError("cannot bucket NaN latencies")
    elif v.dtype.kind not in "iub":
        raise TypeError(f"latencies must be numbers, got an array of {v.dtype}")
    # Clamp first: every value then fits int64 and converts exactly to float64 (< 2**53).
    v = np.clip(v, 0, MAX_VALUE + 1).astype(np.int64)
    bits = np.frexp(v.astype(np.float64))[1].astype(np.int64)     # == v.bit_length(), exactly
    shift = np.maximum(bits - (SUB_BITS + 1), 0)
    idx = (shift << SUB_BITS) + (v >> shift)
    return np.minimum(idx, NBUCKETS - 1, out=idx)


# --- recording (the hot path) ------------------------------------------------------------------
#
# On CPython 3.11 the increment of a memoryview word (read, int add, write) costs ~55 ns and a
# call ~25 ns; computing the index with int.bit_length() adds ~60 ns. A list lookup replaces that
# below TABLE_LIMIT, where nearly all samples fall (bench/test_bench_histogram.py measures it).
# The literals in record() and recorder() are checked against the constants just below.

def _build_table(offset: int) -> list[int]:
    """Word index (``offset`` + bucket) of every value below TABLE_LIMIT, sharing int objects."""
    table: list[int] = []
    for idx in range(bucket_index(TABLE_LIMIT - 1) + 1):
        table.extend([offset + idx] * (int(_HIGH[idx]) - int(_LOW[idx]) + 1))
    assert len(table) == TABLE_LIMIT
    return table


_TABLE = _build_table(0)
assert TABLE_LIMIT == 65536 and MAX_VALUE + 1 == 2199023255552 and NBUCKETS - 1 == 2303
assert SUB_BITS == 6 and SUB_BUCKETS == 128


def record(words: memoryview, base: int, v: int) -> None:
    """Count one sample ``v`` (a Python int, ns) in the histogram whose bucket 0 is ``words[base]``.

    ``words`` is ``memoryview(mapping).cast('q')`` over the whole region (``Region.words``) and
    ``base`` is ``Region.word_index('hist', item)``. For a loop that records into one histogram
    many times, :func:`recorder` is faster still.
    """
    if v < 65536:
        words[base + _TABLE[v if v > 0 else 0]] += 1
    elif v < 2199023255552:
        s = v.bit_length() - 7
        words[base + (s << 6) + (v >> s)] += 1
    else:
        words[base + 2303] += 1


def recorder(words: memoryview, base: int) -> Callable[[int], None]:
    """A function ``rec(v)`` that does ``record(words, base, v)``, about 10 ns sooner.

    It carries its own table of word indices (512 KiB): build one per histogram once, before
    the measured loop, not per sample.
    """
    table = _build_table(base)
    last = base + NBUCKETS - 1

    def rec(v: int, words: memoryview = words, table: list[int] = table, base: int = base,
            last: int = last) -> None:
        if v < 65536:
            words[table[v if v > 0 else 0]] += 1
        elif v < 2199023255552:
            s = v.bit_length() - 7
            words[base + (s << 6) + (v >> s)] += 1
        else:
            words[last] += 1

    return rec


def _check_counts(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts)
    if c.shape != (NBUCKETS,):
        raise ValueError(f"a histogram is {NBUCKETS} counts, got an array of shape {c.shape}")
    if c.dtype != np.int64:
        raise TypeError(f"histogram counts must be int64, got {c.dtype}")
    return c


def invalid(counts: np.ndarray, samples: int, slack: int = 0) -> str | None:
    """Why ``counts`` cannot be the histogram of ``samples`` recorded samples (a negative
    count, or another total, up to ``slack`` short), or None: the check of a histogram read
    back from shared memory, which has no header of its own to validate."""
    c = _check_counts(counts)
    neg = np.flatnonzero(c < 0)
    if neg.size:
        return f"bucket {int(neg[0])} holds {int(c[neg[0]])}"
    total = int(c.sum())
    if not samples - slack <= total <= samples:
        return f"it counts {total} samples where {samples} were recorded"
    return None


def record_many(counts: np.ndarray, values: np.ndarray) -> None:
    """Add every sample of ``values`` to ``counts`` in place (e.g. a view into the region)."""
    _check_counts(counts)
    counts += np.bincount(bucket_indices(values).ravel(), minlength=NBUCKETS)


def merge(hists: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of histograms (a 2-D array counts as its rows); a new array, zeros if none."""
    total = np.zeros(NBUCKETS, dtype=np.int64)
    for h in hists:
        total += _check_counts(h)
    return total


# --- summaries -----------------------------------------------------------------------------------

class Summary(NamedTuple):
    """One metric, in ns. With ``count == 0`` every other field is None."""
    count: int
    min: int | None
    p50: int | None
    p90: int | None
    p99: int | None
    p999: int | None
    max: int | None
    mean: float | None


# Quantiles as exact fractions, so the rank ceil(q * count) has no float rounding.
_QUANTILES = ((50, 100), (90, 100), (99, 100), (999, 1000))


def summarize(counts: np.ndarray) -> Summary:
    """count, min, p50, p90, p99, p99.9, max and mean of a histogram (module docstring)."""
    c = _check_counts(counts)
    if c.min() < 0:
        raise ValueError("histogram has negative counts (not a histogram, or corrupted)")
    cum = np.cumsum(c)
    total = int(cum[-1])
    if total == 0:
        return Summary(0, None, None, None, None, None, None, None)
    ranks = [max(1, -(-total * num // den)) for num, den in _QUANTILES]
    at = np.searchsorted(cum, ranks, side="left")     # first bucket whose cumulative count >= rank
    nonzero = np.flatnonzero(c)
    p50, p90, p99, p999 = (int(x) for x in _HIGH[at])
    return Summary(total, int(_LOW[nonzero[0]]), p50, p90, p99, p999, int(_HIGH[nonzero[-1]]),
                   float(np.dot(c, _MID)) / total)


def to_dict(s: Summary, unit: str = "ns") -> dict:
    """The ``metrics`` entry of result.json: ``{unit, count, min, p50, p90, p99, p999, max, mean}``."""
    return {"unit": unit, **s._asdict()}


# --- HdrHistogram percentile distribution (.hgrm) -------------------------------------------------

class HgrmRow(NamedTuple):
    """One line of a percentile distribution: value (in the file's unit), percentile in [0, 1]."""
    value: float
    percentile: float
    total_count: int


_TICKS_PER_HALF_DISTANCE = 5


def percentile_distribution(counts: np.ndarray, unit_ratio: float = 1.0) -> list[HgrmRow]:
    """The rows of HdrHistogram's ``outputPercentileDistribution`` (values divided by unit_ratio).

    This follows HdrHistogram's PercentileIterator: percentile levels advance in ticks of fixed
    size, 5 per half of the remaining distance to 100 % (0, 10, ..., 50, 55, ..., 75, 77.5, ...);
    a row is the first non-empty bucket whose cumulative percentile reaches the level, one bucket
    may give several rows, and a last row at 100 % repeats the max.
    """
    c = _check_counts(counts)
    total = int(c.sum())
    rows: list[HgrmRow] = []
    if total == 0:
        return rows
    nonzero = np.flatnonzero(c)
    level = 0.0
    cum = 0
    done = False
    for i in nonzero:
        cum += int(c[i])
        reached = 100.0 * cum / total
        value = float(_HIGH[i]) / unit_ratio
        while reached >= level:
            rows.append(HgrmRow(value, level / 100.0, cum))
            if cum >= total or level >= 100.0:
                done = True
                break
            # Same float expression as HdrHistogram (Java), so the levels match digit for digit.
            ticks = _TICKS_PER_HALF_DISTANCE * 2 ** (
                int(math.log(100.0 / (100.0 - level)) / math.log(2)) + 1)
            level += 100.0 / ticks
        if done:
            break
    rows.append(HgrmRow(float(_HIGH[nonzero[-1]]) / unit_ratio, 1.0, total))
    return rows


def write_hgrm(path: str | os.PathLike, counts: np.ndarray, unit_ratio: float = 1.0) -> None:
    """Write ``counts`` as an HdrHistogram percentile distribution text file.

    Values are ns divided by ``unit_ratio`` (1.0: ns, 1000.0: us), printed with 3 decimals;
    the format (header, rows, ``#[...]`` footer) is HdrHistogram's own, which its plotter
    (https://hdrhistogram.github.io/HdrHistogram/plotFiles.html) reads. The unit is not in the
    file: name the file or the plot after it.
    """
    c = _check_counts(counts)
    if not unit_ratio > 0:
        raise ValueError(f"unit_ratio must be positive, got {unit_ratio}")
    total = int(c.sum())
    lines = ["%12s %14s %10s %14s\n\n" % ("Value", "Percentile", "TotalCount", "1/(1-Percentile)")]
    for row in percentile_distribution(c, unit_ratio):
        if row.percentile < 1.0:
            lines.append("%12.3f %2.12f %10d %14.2f\n"
                         % (row.value, row.percentile, row.total_count, 1.0 / (1.0 - row.percentile)))
        else:
            lines.append("%12.3f %2.12f %10d\n" % (row.value, row.percentile, row.total_count))
    if total:
        mean = float(np.dot(c, _MID)) / total
        std = math.sqrt(float(np.dot(c, (_MID - mean) ** 2)) / total)
        top = float(_HIGH[np.flatnonzero(c)[-1]])
    else:
        mean = std = top = 0.0      # what HdrHistogram prints for an empty histogram
    lines.append("#[Mean    = %12.3f, StdDeviation   = %12.3f]\n" % (mean / unit_ratio, std / unit_ratio))
    lines.append("#[Max     = %12.3f, Total count    = %12d]\n" % (top / unit_ratio, total))
    lines.append("#[Buckets = %12d, SubBuckets     = %12d]\n" % (HDR_BUCKETS, SUB_BUCKETS))
    with open(path, "w", encoding="ascii") as f:
        f.writelines(lines)


def read_hgrm(path: str | os.PathLike) -> list[HgrmRow]:
    """The rows of a percentile distribution file (ours or HdrHistogram's); header/footer skipped."""
    rows: list[HgrmRow] = []
    with open(path, encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#") or fields[0] == "Value":
                continue
            try:
                rows.append(HgrmRow(float(fields[0]), float(fields[1]), int(fields[2])))
            except (ValueError, IndexError):
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a percentile distribution "
                                 f"row: {line.rstrip()!r}") from None
    return rows
