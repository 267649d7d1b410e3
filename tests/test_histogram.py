"""The log-linear histogram: bucketing, recording, merge, summaries and .hgrm files."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asirt import histogram as h
from shm_layout.sections import HIST_BUCKETS

values = st.integers(min_value=-(1 << 20), max_value=1 << 62)
in_range = st.integers(min_value=0, max_value=h.MAX_VALUE)


# --- bucketing -----------------------------------------------------------------------------

def test_scheme_fills_the_region_histogram_exactly():
    assert h.NBUCKETS == HIST_BUCKETS
    assert h.bucket_index(h.MAX_VALUE) == h.NBUCKETS - 1
    assert h.MAX_VALUE == 2**41 - 1
    lows, highs = h.bucket_bounds(np.arange(h.NBUCKETS))
    assert lows[0] == 0 and highs[-1] == h.MAX_VALUE
    assert np.all(lows[1:] == highs[:-1] + 1)          # contiguous, no gap, no overlap


def test_small_values_are_exact():
    for v in range(128):
        assert h.bucket_index(v) == v
        assert h.bucket_bounds(v) == (v, v)


@pytest.mark.parametrize("v, idx", [(128, 128), (129, 128), (130, 129), (255, 191), (256, 192),
                                    (1000, 317), (65535, 703), (65536, 704)])
def test_known_indices(v, idx):
    assert h.bucket_index(v) == idx


def test_scalar_accepts_numpy_ints():
    assert h.bucket_index(np.int64(1000)) == h.bucket_index(1000)
    assert h.bucket_index(np.uint64(1 << 63)) == h.NBUCKETS - 1


def test_clamps_negative_and_huge():
    for v in (-1, -(1 << 40), -(1 << 70)):
        assert h.bucket_index(v) == 0
    for v in (h.MAX_VALUE + 1, 1 << 50, 1 << 63, 1 << 80):
        assert h.bucket_index(v) == h.NBUCKETS - 1
    arr = np.array([-5, -(1 << 62), h.MAX_VALUE + 1, np.iinfo(np.int64).max], dtype=np.int64)
    assert h.bucket_indices(arr).tolist() == [0, 0, h.NBUCKETS - 1, h.NBUCKETS - 1]
    big = np.array([np.iinfo(np.uint64).max, 5], dtype=np.uint64)
    assert h.bucket_indices(big).tolist() == [h.NBUCKETS - 1, 5]


@given(in_range)
def test_bounds_contain_value_within_one_64th(v):
    low, high = h.bucket_bounds(h.bucket_index(v))
    assert low <= v <= high
    assert (high - low) * 64 <= max(low, 1)            # relative error <= 1/64
    if v < 128:
        assert low == high == v


@given(values, values)
def test_monotone(a, b):
    a, b = min(a, b), max(a, b)
    assert h.bucket_index(a) <= h.bucket_index(b)


@given(st.lists(values, min_size=1, max_size=200))
def test_vectorised_agrees_with_scalar(vs):
    arr = np.array(vs, dtype=np.int64)
    assert h.bucket_indices(arr).tolist() == [h.bucket_index(int(v)) for v in arr]


def test_vectorised_agrees_at_every_power_of_two_edge():
    edges = [(1 << k) + d for k in range(45) for d in (-2, -1, 0, 1)]
    arr = np.array(edges, dtype=np.int64)
    assert h.bucket_indices(arr).tolist() == [h.bucket_index(v) for v in edges]


def test_vectorised_accepts_floats_and_lists():
    assert h.bucket_indices([1.9, 200.0, -3.0]).tolist() == [1, h.bucket_index(200), 0]
    with pytest.raises(ValueError, match="NaN"):
        h.bucket_indices(np.array([1.0, np.nan]))


def test_bucket_bounds_rejects_bad_indices():
    with pytest.raises(IndexError):
        h.bucket_bounds(h.NBUCKETS)
    with pytest.raises(IndexError):
        h.bucket_bounds(np.array([0, -1]))


# --- recording -------------------------------------------------------------------------------

def _words(n_hists=2, pad=3):
    buf = bytearray(8 * (pad + n_hists * h.NBUCKETS))
    return buf, memoryview(buf).cast("q")


@given(values)
@settings(max_examples=300)
def test_record_increments_the_right_word(v):
    buf, words = _words()
    base = 3 + h.NBUCKETS                     # the second histogram, not at word 0
    h.record(words, base, v)
    h.record(words, base, v)
    counts = np.frombuffer(buf, dtype=np.int64)
    assert counts.sum() == 2
    assert counts[base + h.bucket_index(v)] == 2


@given(values)
@settings(max_examples=300)
def test_recorder_matches_record(v):
    buf, words = _words()
    rec = h.recorder(words, 3)
    rec(v)
    h.record(words, 3 + h.NBUCKETS, v)
    counts = np.frombuffer(buf, dtype=np.int64)
    assert counts[3:3 + h.NBUCKETS].tolist() == counts[3 + h.NBUCKETS:].tolist()
    assert counts[3 + h.bucket_index(v)] == 1


def test_record_at_table_edges_and_into_a_region(region):
    words = region.words
    base = region.word_index("hist", 1)
    samples = [-1, 0, 127, 128, h.TABLE_LIMIT - 1, h.TABLE_LIMIT, h.MAX_VALUE, h.MAX_VALUE + 1]
    for v in samples:
        h.record(words, base, v)
    hists = region.array("hist")
    assert hists[0].sum() == 0
    expected = np.zeros(h.NBUCKETS, dtype=np.int64)
    np.add.at(expected, [h.bucket_index(v) for v in samples], 1)
    assert np.array_equal(hists[1], expected)


def test_record_many_matches_record():
    rng = np.random.default_rng(7)
    vals = np.concatenate([rng.integers(-100, 300, 1000), rng.lognormal(10, 3, 5000).astype(np.int64)])
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, vals)
    h.record_many(counts, vals[:10])
    _, words = _words(1, 0)
    for v in list(vals) + list(vals[:10]):
        h.record(words, 0, int(v))
    assert np.array_equal(counts, np.frombuffer(words, dtype=np.int64))


def test_record_many_rejects_wrong_arrays():
    with pytest.raises(ValueError, match="shape"):
        h.record_many(np.zeros(10, dtype=np.int64), np.arange(3))
    with pytest.raises(TypeError, match="int64"):
        h.record_many(np.zeros(h.NBUCKETS, dtype=np.int32), np.arange(3))


# --- merge and summaries ------------------------------------------------------------------------

def test_merge():
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 10**6, 1000) for _ in range(4)]
    hists = []
    for p in parts:
        c = np.zeros(h.NBUCKETS, dtype=np.int64)
        h.record_many(c, p)
        hists.append(c)
    whole = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(whole, np.concatenate(parts))
    assert np.array_equal(h.merge(hists), whole)
    assert np.array_equal(h.merge(np.stack(hists)), whole)     # rows of a region section
    assert np.array_equal(h.merge([]), np.zeros(h.NBUCKETS, dtype=np.int64))
    assert h.merge(hists) is not hists[0]
    with pytest.raises(ValueError):
        h.merge([np.zeros(5, dtype=np.int64)])


def test_summarize_empty():
    s = h.summarize(np.zeros(h.NBUCKETS, dtype=np.int64))
    assert s == h.Summary(0, None, None, None, None, None, None, None)
    assert h.to_dict(s) == {"unit": "ns", "count": 0, "min": None, "p50": None, "p90": None,
                            "p99": None, "p999": None, "max": None, "mean": None}


def test_summarize_exact_small_values():
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, np.arange(1, 101))     # 1..100, all exact buckets
    s = h.summarize(counts)
    assert s == h.Summary(100, 1, 50, 90, 99, 100, 100, 50.5)


def test_summarize_single_sample():
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, [5000])
    low, high = h.bucket_bounds(h.bucket_index(5000))
    s = h.summarize(counts)
    assert s.count == 1 and s.min == low
    assert s.p50 == s.p90 == s.p99 == s.p999 == s.max == high
    assert s.mean == (low + high) / 2


@pytest.mark.parametrize("seed, n", [(0, 1), (1, 7), (2, 1000), (3, 100_000), (4, 12_345)])
def test_summarize_against_numpy(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=9, sigma=1.5, size=n).astype(np.int64)
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, x)
    s = h.summarize(counts)
    assert s.count == n
    srt = np.sort(x)
    for got, (num, den) in zip((s.p50, s.p90, s.p99, s.p999), h._QUANTILES):
        exact = int(srt[max(1, math.ceil(n * num / den)) - 1])     # nearest rank
        # the reported value is the top of the bucket holding the exact sample percentile
        assert got == h.bucket_bounds(h.bucket_index(exact))[1]
        assert exact <= got <= exact + exact / 64
        if n * num % den:   # at an exact rank numpy's float q * n may round up to the next one
            ref = np.percentile(x, 100 * num / den, method="inverted_cdf")
            assert ref <= got <= ref + ref / 64
    assert s.min <= x.min() and x.min() - s.min <= x.min() / 64
    assert s.max >= x.max() and s.max - x.max() <= x.max() / 64
    assert abs(s.mean - x.mean()) <= x.mean() / 128 + 1e-9


def test_summarize_rejects_negative_counts():
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    counts[3] = -1
    with pytest.raises(ValueError, match="negative"):
        h.summarize(counts)


def test_to_dict_is_json_ready():
    import json
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, [10, 20, 3000])
    d = h.to_dict(h.summarize(counts), unit="ns")
    assert list(d) == ["unit", "count", "min", "p50", "p90", "p99", "p999", "max", "mean"]
    assert all(type(v) in (int, float, str) for v in d.values())
    assert json.loads(json.dumps(d)) == d


# --- .hgrm files --------------------------------------------------------------------------------

def _lognormal_counts(n=100_000, seed=5):
    x = np.random.default_rng(seed).lognormal(9, 1.5, n).astype(np.int64)
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, x)
    return counts


def test_hgrm_round_trip_and_format(tmp_path):
    counts = _lognormal_counts()
    path = tmp_path / "rtt.hgrm"
    h.write_hgrm(path, counts)
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "       Value     Percentile TotalCount 1/(1-Percentile)"
    assert lines[1] == ""
    assert lines[-3].startswith("#[Mean    = ") and ", StdDeviation   = " in lines[-3]
    assert lines[-2].startswith("#[Max     = ") and lines[-2].endswith(", Total count    =       100000]")
    assert lines[-1] == "#[Buckets =           35, SubBuckets     =          128]"

    rows = h.read_hgrm(path)
    assert rows == [h.HgrmRow(round(r.value, 3), float("%.12f" % r.percentile), r.total_count)
                    for r in h.percentile_distribution(counts)]
    s = h.summarize(counts)
    first = int(np.flatnonzero(counts)[0])
    assert rows[0] == (h.bucket_bounds(first)[1], 0.0, counts[first])   # top of the min's bucket
    assert rows[-1] == (s.max, 1.0, s.count)            # last row: percentile 1.0, all counts
    assert rows[-2].total_count == s.count               # HdrHistogram repeats the max row
    pct = [r.percentile for r in rows]
    assert pct == sorted(pct)
    assert [r.value for r in rows] == sorted(r.value for r in rows)
    assert [r.total_count for r in rows] == sorted(r.total_count for r in rows)
    # the ticks: 5 per half-distance, as HdrHistogram prints them
    assert pct[:7] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55]
    assert 0.775 in pct and 0.9875 in pct
    # each data row's 4th column is 1/(1-percentile); the last row has 3 columns
    data = [ln.split() for ln in lines[2:-3]]
    assert all(len(f) == 4 for f in data[:-1]) and len(data[-1]) == 3
    assert float(data[5][3]) == 2.0
    mean = float(lines[-3].split("=")[1].split(",")[0])
    assert mean == pytest.approx(s.mean, abs=0.001)
    assert float(lines[-2].split("=")[1].split(",")[0]) == s.max


def test_hgrm_percentile_rows_match_summary():
    counts = _lognormal_counts(5000, seed=9)
    s = h.summarize(counts)
    rows = h.percentile_distribution(counts)
    by_pct = {r.percentile: r.value for r in rows}
    assert by_pct[0.5] == s.p50 and by_pct[0.9] == s.p90


def test_hgrm_unit_ratio(tmp_path):
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.record_many(counts, [1500, 2500, 100_000])
    h.write_hgrm(tmp_path / "us.hgrm", counts, unit_ratio=1000.0)
    h.write_hgrm(tmp_path / "ns.hgrm", counts)
    us, ns = h.read_hgrm(tmp_path / "us.hgrm"), h.read_hgrm(tmp_path / "ns.hgrm")
    assert [r.value * 1000 for r in us] == pytest.approx([r.value for r in ns], abs=0.5)
    assert us[-1].value == pytest.approx(h.summarize(counts).max / 1000, abs=0.0005)
    with pytest.raises(ValueError):
        h.write_hgrm(tmp_path / "bad.hgrm", counts, unit_ratio=0)


def test_hgrm_single_sample_and_empty(tmp_path):
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    h.write_hgrm(tmp_path / "empty.hgrm", counts)
    assert h.read_hgrm(tmp_path / "empty.hgrm") == []
    text = (tmp_path / "empty.hgrm").read_text()
    assert "#[Max     =        0.000, Total count    =            0]" in text
    counts[50] = 3
    h.write_hgrm(tmp_path / "one.hgrm", counts)
    assert h.read_hgrm(tmp_path / "one.hgrm") == [(50.0, 0.0, 3), (50.0, 1.0, 3)]


def test_read_hgrm_rejects_garbage(tmp_path):
    p = tmp_path / "x.hgrm"
    p.write_text("       Value     Percentile TotalCount 1/(1-Percentile)\n\nhello world\n")
    with pytest.raises(ValueError, match="x.hgrm:3"):
        h.read_hgrm(p)
