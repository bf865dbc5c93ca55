"""The packed-chunk codec (gateway/store/chunk_codec.py): decode(encode(x)) gives back x bit for
bit, each value encoding is taken where it should be, the summary matches a direct computation,
and damaged, truncated or newer-version bytes are refused instead of decoded.

Property tests are derandomized (a fixed sequence of examples), so CI runs the same cases.
"""

from __future__ import annotations

import itertools
import math
import statistics
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.formats import TS_MAX_US, TS_MIN_US
from gateway.store import partials
from gateway.store.chunk_codec import (
    FORMAT_VERSION,
    ChunkError,
    CorruptChunk,
    Moments,
    UnknownChunkVersion,
    ValueEncoding,
    decode,
    encode,
)

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
START_US = 1_764_547_200_000_000  # 2025-12-01T00:00:00Z
# The tolerance tests/test_aggregate.py holds every aggregate (stddev included) to.
REL, ABS = 1e-9, 1e-9

FINITE = st.floats(allow_nan=False, allow_infinity=False)
AWKWARD = st.sampled_from(
    [
        0.0,
        -0.0,
        5e-324,  # smallest subnormal
        -2.2250738585072014e-308,  # smallest normal, negative
        1.7976931348622e-310,  # a subnormal with many digits
        1e308,
        -1.7976931348623157e308,
        0.1 + 0.2,  # 17 significant digits
        1.2345678901234567,
        2.0**53 + 2,  # integers above 2**53
        -(2.0**62),
        2.0**63,
        9.007199254740993e15,
        21.37,
    ]
)
VALUE = st.one_of(FINITE, AWKWARD)


def bits(values: np.ndarray) -> list[int]:
    out: list[int] = np.asarray(values, np.float64).view(np.uint64).tolist()
    return out


def assert_round_trip(ts: list[int], values: list[float]) -> ValueEncoding:
    encoded = encode(ts, values)
    decoded = decode(encoded.data)
    assert decoded.ts.dtype == np.int64
    assert decoded.values.dtype == np.float64
    assert decoded.ts.tolist() == ts
    assert bits(decoded.values) == bits(np.array(values, np.float64))
    assert (decoded.encoding, decoded.decimals) == (encoded.encoding, encoded.decimals)
    return encoded.encoding


@st.composite
def timestamps(draw: st.DrawFn, n: int) -> list[int]:
    """n sorted unique ts in the gateway's range: regular, jittered, gappy or anywhere."""
    kind = draw(st.sampled_from(["regular", "jitter", "anywhere", "edges"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    if kind == "anywhere":
        ts = set(rng.integers(TS_MIN_US, TS_MAX_US, n, endpoint=True).tolist())
        while len(ts) < n:
            ts.add(int(rng.integers(TS_MIN_US, TS_MAX_US, endpoint=True)))
        return sorted(ts)
    step = draw(st.sampled_from([1, 1000, 1_000_000, 10_000_000, 3_600_000_000]))
    steps = np.full(n, step, np.int64)
    if kind == "jitter":
        steps += rng.integers(0, step + 500_000, n)
        steps[rng.random(n) < 0.02] += rng.integers(1, 86_400_000_000)  # gaps
    deltas = np.cumsum(steps) - steps[0]
    if kind == "edges":  # the first at TS_MIN_US or the last at TS_MAX_US
        first = TS_MIN_US if draw(st.booleans()) else TS_MAX_US - int(deltas[-1])
    else:
        first = draw(st.integers(TS_MIN_US, TS_MAX_US - int(deltas[-1])))
    out: list[int] = (first + deltas).tolist()
    return out


@st.composite
def long_values(draw: st.DrawFn, n: int) -> list[float]:
    """n values, made by numpy from a drawn seed, with drawn awkward values spliced in."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    kind = draw(st.sampled_from(["walk", "counter", "doubles", "bits"]))
    made: np.ndarray
    if kind == "walk":
        k = draw(st.integers(0, 6))
        scaled = int(rng.integers(-(10**6), 10**6)) + np.cumsum(rng.integers(-50, 51, n))
        made = scaled / 10.0**k
    elif kind == "counter":
        made = 2.0**53 * draw(st.sampled_from([0, 1, 64])) + np.cumsum(rng.poisson(30, n))
    elif kind == "doubles":
        made = rng.normal(0, 1, n) * 10.0 ** draw(st.integers(-300, 300))
    else:  # any bit pattern that is a finite double: subnormals, extremes, -0.0
        raw = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False).view(np.float64)
        made = np.where(np.isfinite(raw), raw, 1.0)
    values: list[float] = made.astype(np.float64).tolist()
    for _ in range(draw(st.integers(0, 3))):
        values[draw(st.integers(0, n - 1))] = draw(VALUE)
    return values


@st.composite
def short_series(draw: st.DrawFn) -> tuple[list[int], list[float]]:
    values = draw(st.lists(VALUE, min_size=1, max_size=60))
    return draw(timestamps(len(values))), values


@st.composite
def long_series(draw: st.DrawFn) -> tuple[list[int], list[float]]:
    n = draw(st.integers(1, 5000))
    return draw(timestamps(n)), draw(long_values(n))


class TestRoundTrip:
    @PROPERTIES
    @given(short_series())
    def test_any_finite_floats(self, series: tuple[list[int], list[float]]) -> None:
        assert_round_trip(*series)

    @PROPERTIES
    @given(long_series())
    def test_long_series(self, series: tuple[list[int], list[float]]) -> None:
        assert_round_trip(*series)

    @PROPERTIES
    @given(
        st.lists(st.integers(-(10**12), 10**12), min_size=1, max_size=300),
        st.integers(0, 9),
        st.integers(TS_MIN_US, TS_MAX_US - 10**9),
    )
    def test_decimal_values_take_the_decimal_path(
        self, scaled: list[int], k: int, first: int
    ) -> None:
        values = [s / 10**k for s in scaled]  # what float(str(round(x, k))) gives
        ts = [first + 1000 * i for i in range(len(values))]
        assert assert_round_trip(ts, values) is ValueEncoding.DECIMAL
        assert encode(ts, values).decimals <= k

    @pytest.mark.parametrize(
        ("values", "encoding", "decimals"),
        [
            ([21.37, 21.38, 21.36, 21.4], ValueEncoding.DECIMAL, 2),
            ([1013.0, 1014.0, 1012.0], ValueEncoding.DECIMAL, 0),
            ([0.0, 0.5, 0.25, 0.125], ValueEncoding.DECIMAL, 3),
            ([1e-9, 2e-9, 0.0], ValueEncoding.DECIMAL, 9),
            ([2.0**53 + 2, 2.0**60, -(2.0**61)], ValueEncoding.DECIMAL, 0),
            ([2.0**62], ValueEncoding.XOR, 0),  # its deltas could pass the int64 range
            ([0.0, -0.0, 1.0], ValueEncoding.XOR, 0),  # -0.0 scales to 0, which is +0.0
            ([5e-324, 1.0], ValueEncoding.XOR, 0),
            ([1e308, -1e308], ValueEncoding.XOR, 0),
            ([0.1 + 0.2, 0.3], ValueEncoding.XOR, 0),
            ([1.2345678901234567], ValueEncoding.XOR, 0),
            ([1e-10], ValueEncoding.XOR, 0),  # needs k = 10 > MAX_DECIMALS
        ],
    )
    def test_path_taken(self, values: list[float], encoding: ValueEncoding, decimals: int) -> None:
        ts = [START_US + 10_000_000 * i for i in range(len(values))]
        encoded = encode(ts, values)
        assert (encoded.encoding, encoded.decimals) == (encoding, decimals)
        assert assert_round_trip(ts, values) is encoding

    def test_random_doubles_fall_back_to_xor(self) -> None:
        rng = np.random.default_rng(7)
        values = rng.normal(20.0, 3.0, 1000)
        ts = START_US + np.arange(1000, dtype=np.int64) * 10_000_000
        encoded = encode(ts, values)
        assert encoded.encoding is ValueEncoding.XOR
        assert bits(decode(encoded.data).values) == bits(values)

    def test_the_issue_data_set_packs_small(self) -> None:
        """A random walk at 0.01 resolution every 10 s: bench/codec.py measures ~0.64 B/reading."""
        rng = np.random.default_rng(10)
        values = np.round(1000 + np.cumsum(np.rint(rng.normal(0, 5, 1000))) / 100, 2)
        ts = START_US + np.arange(1000, dtype=np.int64) * 10_000_000
        encoded = encode(ts, values)
        assert encoded.encoding is ValueEncoding.DECIMAL
        assert len(encoded.data) / 1000 < 1.2  # the issue's moonshot

    def test_version_1_bytes_still_decode(self) -> None:
        """A chunk written by this version, pinned: a change of layout needs a new version."""
        data = bytes.fromhex(
            "0101020300000000a00ba9d84406008096980000000000590800000000000028b5"
            "2ffd20186d00002800000203000200e08c0160016322d23f"
        )
        chunk = decode(data)
        assert chunk.ts.tolist() == [START_US, START_US + 10_000_000, START_US + 20_000_000]
        assert chunk.values.tolist() == [21.37, 21.38, 21.36]
        assert (chunk.encoding, chunk.decimals) == (ValueEncoding.DECIMAL, 2)
        assert encode(chunk.ts, chunk.values).data == data


class TestSummary:
    @PROPERTIES
    @given(short_series())
    def test_exact_parts(self, series: tuple[list[int], list[float]]) -> None:
        ts, values = series
        s = encode(ts, values).summary
        assert s.count == len(values)
        assert s.min == min(values)
        assert s.max == max(values)
        assert s.first_ts == ts[0]
        assert s.last_ts == ts[-1]
        assert bits(np.array([s.first_value, s.last_value])) == bits(
            np.array([values[0], values[-1]])
        )
        exact = sum(map(Fraction, values), Fraction(0))
        try:
            assert s.sum == float(exact)  # correctly rounded
        except OverflowError:
            assert s.sum == (math.inf if exact > 0 else -math.inf)

    @PROPERTIES
    @given(
        st.lists(st.floats(-1e100, 1e100), min_size=1, max_size=200),
        st.floats(-1e12, 1e12),
    )
    def test_stddev_matches_the_raw_computation(self, values: list[float], offset: float) -> None:
        values = [v * 1e-100 * abs(offset) + offset for v in values]  # spread << mean, often
        ts = [START_US + i for i in range(len(values))]
        moments = encode(ts, values).summary.moments
        assert_stddev(moments, values)

    @PROPERTIES
    @given(
        st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300),
        st.lists(st.integers(1, 299), max_size=6),
        st.floats(-1e9, 1e9),
    )
    def test_chunks_and_raw_edges_merge_to_the_raw_stddev(
        self, values: list[float], cuts: list[int], offset: float
    ) -> None:
        """What the aggregate engine will do: a bucket's chunk summaries merged with the
        (count, mean, sum of squared deviations) its SQL gives for the raw rows at the edges."""
        values = [v + offset for v in values]
        bounds = sorted({0, len(values), *(c for c in cuts if c < len(values))})
        merged = Moments(0, 0.0, 0.0)
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            part = values[lo:hi]
            if i % 2:  # a raw edge, as gateway/store/aggregate.py computes n, av and ss
                mean = sum(part) / len(part)
                ss = sum((v - mean) * (v - mean) for v in part)
                dev_sum = sum(v - mean for v in part)
                merged = merged.merge(Moments.from_deviations(len(part), mean, ss, dev_sum))
            else:
                ts = [START_US + j for j in range(len(part))]
                merged = merged.merge(encode(ts, part).summary.moments)
        assert merged.count == len(values)
        assert_stddev(merged, values)

    def test_large_mean_small_spread(self) -> None:
        """Pressure at 1013.25 +- 0.01 in 10 chunks: sum and sum of squares would be off by ~6e-7
        (relative) here; the merged moments hold the aggregate tolerance."""
        rng = np.random.default_rng(3)
        values = np.round(1013.25 + rng.normal(0, 0.01, 10_000), 2).tolist()
        merged = Moments(0, 0.0, 0.0)
        for lo in range(0, len(values), 1000):
            ts = [START_US + j for j in range(1000)]
            merged = merged.merge(encode(ts, values[lo : lo + 1000]).summary.moments)
        assert_stddev(merged, values)
        assert merged.stddev == pytest.approx(statistics.stdev(values), rel=1e-12)

    def test_sum_past_float_max_mid_way_is_still_correctly_rounded(self) -> None:
        s = encode([1, 2, 3], [1e308, 1e308, -1e308]).summary  # math.fsum overflows here
        assert s.sum == 1e308
        assert s.moments.mean == pytest.approx(1e308 / 3)
        assert encode([1, 2], [1e308, 1e308]).summary.sum == math.inf

    def test_one_reading(self) -> None:
        s = encode([START_US], [-0.0]).summary
        assert (s.count, s.moments.m2, s.moments.stddev) == (1, 0.0, None)
        assert math.copysign(1.0, s.first_value) == -1.0


def assert_stddev(moments: Moments, values: list[float]) -> None:
    if len(values) < 2:
        assert moments.stddev is None
        return
    exact = math.sqrt(statistics.variance(map(Fraction, values)))
    assert moments.stddev == pytest.approx(exact, rel=REL, abs=ABS)


def sample_chunk() -> bytes:
    rng = np.random.default_rng(5)
    values = np.round(20 + np.cumsum(rng.normal(0, 0.05, 200)), 2)
    ts = START_US + np.arange(200, dtype=np.int64) * 10_000_000
    return encode(ts, values).data


class TestRefusals:
    def test_every_truncation_is_refused(self) -> None:
        data = sample_chunk()
        for length in range(len(data)):
            with pytest.raises(CorruptChunk):
                decode(data[:length])

    def test_every_damaged_byte_is_refused(self) -> None:
        data = sample_chunk()
        for i in range(len(data)):
            for flip in (0x01, 0x80, 0xFF):
                damaged = bytearray(data)
                damaged[i] ^= flip
                with pytest.raises(ChunkError):
                    decode(bytes(damaged))

    def test_extra_bytes_are_refused(self) -> None:
        with pytest.raises(CorruptChunk, match="checksum"):
            decode(sample_chunk() + b"\x00")

    @pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 255])
    def test_unknown_version_is_refused(self, version: int) -> None:
        body = bytes([version]) + sample_chunk()[1:-4]
        data = body + struct.pack("<I", zlib.crc32(body))  # intact, only newer
        with pytest.raises(UnknownChunkVersion, match=f"version {version} is unknown") as err:
            decode(data)
        assert err.value.version == version

    @pytest.mark.parametrize(
        ("offset", "fmt", "lie"),
        [
            (3, "<I", 201),  # count: one more than the body holds
            (3, "<I", 199),
            (3, "<I", 0),
            (1, "<B", 3),  # no such value encoding
            (2, "<B", 10),  # decimals past MAX_DECIMALS
        ],
    )
    def test_a_well_formed_lie_is_refused(self, offset: int, fmt: str, lie: int) -> None:
        """A header that disagrees with its body or the format, checksum recomputed."""
        data = bytearray(sample_chunk()[:-4])
        struct.pack_into(fmt, data, offset, lie)
        data += struct.pack("<I", zlib.crc32(data))
        with pytest.raises(CorruptChunk, match=r"header|body"):
            decode(bytes(data))

    @pytest.mark.parametrize(
        ("ts", "values", "message"),
        [
            ([], [], "1.."),
            ([1, 2], [1.0], "one length"),
            ([2, 1], [1.0, 2.0], "strictly increasing"),
            ([1, 1], [1.0, 2.0], "strictly increasing"),
            ([1, 2], [1.0, math.nan], "finite"),
            ([1, 2], [math.inf, 2.0], "finite"),
            ([-(2**62), 0], [1.0, 2.0], "within"),
        ],
    )
    def test_input_a_chunk_cannot_hold(
        self, ts: list[int], values: list[float], message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            encode(ts, values)


def test_threads_encode_and_decode_at_once() -> None:
    """PostgreSQL's packer encodes and decodes in a worker thread while the event loop decodes
    chunks for readers (and two packers each have one): every round trip stays exact."""
    rng = np.random.default_rng(5)
    inputs = []
    for k in range(16):
        n = 3000 + 97 * k
        ts = np.cumsum(rng.integers(1, 10_000_000, n)).astype(np.int64)
        values = np.round(rng.normal(0, 50, n), 2) if k % 2 else rng.normal(0, 50, n)
        inputs.append((ts, values))
    blobs = [encode(ts, values).data for ts, values in inputs]

    def work(i: int) -> bool:
        ts, values = inputs[i % len(inputs)]
        got = decode(blobs[i % len(blobs)]) if i % 2 else decode(encode(ts, values).data)
        return bool(
            np.array_equal(got.ts, ts)
            and np.array_equal(got.values.view(np.int64), values.view(np.int64))
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(800)))
    assert all(results), f"{results.count(False)} of {len(results)} round trips failed"


def test_threads_write_and_read_rollups_at_once() -> None:
    """The same for the rollups kept with each chunk (partials.Partials.to_bytes on the
    packer's thread, from_bytes on the event loop for an aggregate)."""
    rng = np.random.default_rng(6)
    inputs = []
    for k in range(16):
        ts = np.cumsum(rng.integers(1, 60_000_000, 4000 + 50 * k)).astype(np.int64)
        values = np.round(rng.normal(0, 50, len(ts)), 2)
        inputs.append(partials.hourly(ts, values))
    blobs = [p.to_bytes() for p in inputs]

    def work(i: int) -> bool:
        want = inputs[i % len(inputs)]
        blob = blobs[i % len(blobs)] if i % 2 else want.to_bytes()
        got = partials.Partials.from_bytes(blob)
        return all(
            np.array_equal(getattr(got, name), getattr(want, name))
            for name in ("t0", "t1", "n", "s", "lo", "hi", "v0", "v1")
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(800)))
    assert all(results), f"{results.count(False)} of {len(results)} round trips failed"
