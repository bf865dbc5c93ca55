"""Packed chunks: one series' readings, sorted by time, as compressed bytes plus a summary.

`encode(ts, values)` takes int64 epoch-microsecond timestamps (strictly increasing) and finite
float64 values and returns an `EncodedChunk`: the bytes and a `ChunkSummary` (count, min, max,
sum, first, last, and the `Moments` sample stddev needs). `decode(data)` gives back identical
timestamps and bit-identical values (-0.0, subnormals, 17-digit values, integers past 2**53).
The encoding was picked by measurement: bench/codec.py, bench/README.md "Packed chunks".

Format, version 1 (little-endian; every chunk starts with its version byte):

    offset  size  field
    0       1     version (1)
    1       1     value encoding: 1 = DECIMAL, 2 = XOR
    2       1     decimals k (DECIMAL), 0 (XOR)
    3       4     count n (uint32, >= 1)
    7       8     ts[0] (int64)
    15      8     ts[1] - ts[0] (int64; 0 when n == 1)
    23      8     DECIMAL: scaled[0] (int64); XOR: the bits of values[0]
    31      ...   zstd frame of the body:
                    timestamps: delta-of-delta ts[i] - 2 ts[i-1] + ts[i-2], i >= 2 (n - 2 of them)
                    values:     DECIMAL: scaled[i] - scaled[i-1]; XOR: bits[i] ^ bits[i-1] (n - 1)
                  each array zigzagged to uint64 and byte-shuffled (all low bytes, then all
                  second bytes, ...) so the zero high bytes of small numbers compress away
    -4      4     CRC-32 of every byte before it

DECIMAL is taken when one k in 0..MAX_DECIMALS makes every value of the chunk round-trip bit for
bit as `float(round(v * 10**k)) / 10**k` (sensor data with a fixed resolution: 21.37 is 2137 at
k=2; integer-valued counters at k=0); otherwise XOR (Gorilla's XOR of consecutive values' bits,
left to zstd instead of bit-packed). The round-trip test runs the decoder's own arithmetic on the
whole chunk, so a chunk is DECIMAL only when decoding it is exact.

Errors: `ChunkError` (a `ValueError`) for bytes that are not a chunk this code can read;
`UnknownChunkVersion` for a version it does not know (a newer writer); `CorruptChunk` for
truncated or damaged bytes. Decoding never returns data that failed the checksum.

Stddev, merged. A summary carries `Moments`: count, mean (as a double-double, `mean + mean_err`)
and m2, the sum of squared deviations from the mean, by the corrected two-pass formula. Not sum
and sum of squares: `sumsq - sum**2 / n` cancels catastrophically when the mean is large next to
the spread (10,000 readings of 1013.25 +- 0.01: relative error 6e-7 in the variance, against the
1e-9 tests/test_aggregate.py holds stddev to), while Chan et al.'s merge of (count, mean, m2) is
stable in any order and grouping. The aggregate engine will merge a bucket's chunk summaries with
its raw edge rows, for which its SQL already selects `n`, `av` and `ss` (gateway/store/
aggregate.py) and should add `sum(value - m)`: `Moments.from_deviations(n, av, ss, dev_sum)`,
then `Moments.merge` and `.stddev`. Without that last column (dev_sum = 0) the stddev can be off
by up to an ulp of the mean, which is far inside the tolerance for sensor-like data (~1e-11 at
1013.25 +- 0.01) but not when the spread is ~1e-7 of the mean or less.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from fractions import Fraction
from typing import Final

import numpy as np
import numpy.typing as npt
import zstandard

FORMAT_VERSION: Final = 1
MAX_DECIMALS: Final = 9
# zstd level 3 (its default): levels 9 and 19 were within 2% in bench/codec.py at 5-20x the
# encode time; decoding costs the same at every level.
ZSTD_LEVEL: Final = 3
MAX_COUNT: Final = 2**32 - 1

_HEAD: Final = struct.Struct("<BBBIqqq")
_CRC: Final = struct.Struct("<I")
_XOR_MARK: Final = 0

Int64s = npt.NDArray[np.int64]
Float64s = npt.NDArray[np.float64]
UInt64s = npt.NDArray[np.uint64]


class ValueEncoding(IntEnum):
    DECIMAL = 1
    XOR = 2


class ChunkError(ValueError):
    """Bytes that are not a chunk this code can read."""


class UnknownChunkVersion(ChunkError):
    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(
            f"chunk format version {version} is unknown (this code reads version "
            f"{FORMAT_VERSION}); was it written by a newer fieldgate?"
        )


class CorruptChunk(ChunkError):
    """Truncated or damaged bytes: the checksum or the layout does not hold."""


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and sum of squared deviations from the mean (m2) of a set of values.

    The mean is carried as `mean + mean_err` (a double-double): merging subtracts two means, and
    a rounded mean would cost up to an ulp of the mean in the stddev, which matters when the
    spread is small next to the mean (7.3e11 +- 1e-4 gave a stddev of 1.5e-4 for equal values).
    """

    count: int
    mean: float
    m2: float
    mean_err: float = 0.0

    @classmethod
    def of(cls, values: Float64s) -> Moments:
        """Corrected two-pass (Chan, Golub, LeVeque 1983, eq. 1.7): exact-ish for any offset."""
        n = len(values)
        if n == 0:
            return EMPTY_MOMENTS
        mean = _sum_and_mean(values)[1]
        with np.errstate(over="ignore"):
            dev = values - mean
            ss = float(np.sum(np.square(dev)))
        if not math.isfinite(ss):  # deviations past 1.3e154: inf, as SQL's `ss` is
            return cls(n, mean, math.inf)
        return cls.from_deviations(n, mean, ss, math.fsum(dev.tolist()))

    @classmethod
    def from_deviations(cls, count: int, mean: float, ss: float, dev_sum: float) -> Moments:
        """From a rounded `mean`, the sum of squared deviations from it (`ss`) and the sum of
        the deviations (`dev_sum`): what the aggregate SQL can select for the raw rows of an
        edge, `sum((value - m) * (value - m))` and `sum(value - m)` over `m = avg(value)`."""
        if count == 0:
            return EMPTY_MOMENTS
        if not math.isfinite(ss) or not math.isfinite(dev_sum):
            return cls(count, mean, math.inf)
        return cls(count, mean, max(ss - dev_sum * dev_sum / count, 0.0), dev_sum / count)

    def merge(self, other: Moments) -> Moments:
        """Both sets together (Chan, Golub, LeVeque 1979), in any order and grouping."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = (other.mean - self.mean) + (other.mean_err - self.mean_err)
        hi, err = _two_sum(self.mean, delta * (other.count / n))
        mean = hi + (self.mean_err + err)
        mean_err = (self.mean_err + err) - (mean - hi)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return Moments(n, mean, m2, mean_err)

    @property
    def stddev(self) -> float | None:
        """Sample standard deviation; None below two values (as the aggregate engine answers)."""
        if self.count < 2:
            return None
        return math.sqrt(max(self.m2, 0.0) / (self.count - 1))


EMPTY_MOMENTS: Final = Moments(0, 0.0, 0.0)


def _two_sum(a: float, b: float) -> tuple[float, float]:
    """a + b as the rounded sum and its exact rounding error (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@dataclass(frozen=True, slots=True)
class ChunkSummary:
    """What aggregates need from a chunk without decoding it."""

    count: int
    min: float
    max: float
    sum: float  # correctly rounded (math.fsum; exact rational sum when fsum overflows)
    first_ts: int
    first_value: float
    last_ts: int
    last_value: float
    moments: Moments  # count, mean and m2 for stddev; `Moments.merge` combines them


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    data: bytes
    summary: ChunkSummary
    encoding: ValueEncoding
    decimals: int  # k for DECIMAL, 0 for XOR


@dataclass(frozen=True, slots=True)
class DecodedChunk:
    ts: Int64s
    values: Float64s
    encoding: ValueEncoding
    decimals: int


class ZstdContexts(threading.local):
    """zstd contexts, one pair per thread: a ZstdCompressor or ZstdDecompressor used by two
    threads at once garbles its output or crashes the process (python-zstandard documents
    them as not thread-safe), and PostgreSQL's packer encodes and decodes in worker threads
    while the event loop decodes for readers (chunks here, rollups in partials.py)."""

    def __init__(self) -> None:
        self.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.d = zstandard.ZstdDecompressor()


ZSTD = ZstdContexts()


def encode(ts: Sequence[int] | Int64s, values: Sequence[float] | Float64s) -> EncodedChunk:
    """One series' readings as a chunk; raises ValueError for input a chunk cannot hold."""
    t, v = _checked(ts, values)
    n = len(t)
    d1 = int(t[1] - t[0]) if n > 1 else 0
    dod = np.diff(t, 2) if n > 2 else np.zeros(0, np.int64)
    scaled = decimal_scaled(v)
    if scaled is not None:
        k, s = scaled
        encoding, first, rest = ValueEncoding.DECIMAL, int(s[0]), zigzag(np.diff(s))
    else:
        bits = v.view(np.uint64)
        k, first = _XOR_MARK, int(v.view(np.int64)[0])
        encoding, rest = ValueEncoding.XOR, bits[1:] ^ bits[:-1]
    body = shuffle(zigzag(dod)) + shuffle(rest)
    head = _HEAD.pack(FORMAT_VERSION, encoding, k, n, int(t[0]), d1, first)
    data = head + ZSTD.c.compress(body)
    data += _CRC.pack(zlib.crc32(data))
    return EncodedChunk(data, summarize(t, v), encoding, k)


def decode(data: bytes) -> DecodedChunk:
    """The readings `encode` was given; raises ChunkError rather than return anything else."""
    if not data:
        raise CorruptChunk("chunk is empty")
    if data[0] != FORMAT_VERSION:
        raise UnknownChunkVersion(data[0])
    if len(data) < _HEAD.size + _CRC.size:
        raise CorruptChunk(f"chunk is truncated: {len(data)} bytes, shorter than its header")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise CorruptChunk("chunk checksum mismatch: truncated or damaged")
    _, encoding, k, n, ts0, d1, first = _HEAD.unpack_from(data)
    valid_k = k <= MAX_DECIMALS if encoding == ValueEncoding.DECIMAL else k == _XOR_MARK
    if encoding not in (ValueEncoding.DECIMAL, ValueEncoding.XOR) or not valid_k or n == 0:
        raise CorruptChunk(f"chunk header is invalid (encoding {encoding}, k {k}, count {n})")
    expected = 8 * (max(n - 2, 0) + n - 1)
    try:
        body = ZSTD.d.decompress(data[_HEAD.size : -_CRC.size], max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CorruptChunk(f"chunk body does not decompress: {exc}") from exc
    if len(body) != expected:
        raise CorruptChunk(f"chunk body holds {len(body)} bytes, its {n} readings need {expected}")
    split = 8 * max(n - 2, 0)
    ts = _undelta_ts(ts0, d1, unzigzag(unshuffle(body[:split])), n)
    rest = unshuffle(body[split:])
    if encoding == ValueEncoding.DECIMAL:
        scaled = np.empty(n, np.int64)
        scaled[0] = first
        scaled[1:] = unzigzag(rest)
        values = unscale(np.cumsum(scaled), k)
    else:
        bits = np.empty(n, np.uint64)
        bits[0] = np.int64(first).view(np.uint64)
        bits[1:] = rest
        values = np.bitwise_xor.accumulate(bits).view(np.float64)
    return DecodedChunk(ts, values, ValueEncoding(encoding), k)


def summarize(ts: Int64s, values: Float64s) -> ChunkSummary:
    """The summary of checked, sorted readings (`encode` computes it)."""
    total = _sum_and_mean(values)[0]
    return ChunkSummary(
        count=len(values),
        min=float(values.min()),
        max=float(values.max()),
        sum=total,
        first_ts=int(ts[0]),
        first_value=float(values[0]),
        last_ts=int(ts[-1]),
        last_value=float(values[-1]),
        moments=Moments.of(values),
    )


def _sum_and_mean(values: Float64s) -> tuple[float, float]:
    try:
        total = math.fsum(values.tolist())
        return total, total / len(values)
    except OverflowError:  # a partial sum passed float max: the exact sum, rounded once
        exact = sum(map(Fraction, values.tolist()), Fraction(0))
        mean = float(exact / len(values))  # within [min, max]: always finite
        try:
            return float(exact), mean
        except OverflowError:
            return (math.inf if exact > 0 else -math.inf), mean


def _checked(
    ts: Sequence[int] | Int64s, values: Sequence[float] | Float64s
) -> tuple[Int64s, Float64s]:
    t = np.ascontiguousarray(ts, dtype=np.int64)
    v = np.ascontiguousarray(values, dtype=np.float64)
    if t.ndim != 1 or v.ndim != 1 or len(t) != len(v):
        raise ValueError(f"ts and values must be 1-D of one length, got {t.shape} and {v.shape}")
    if not 1 <= len(t) <= MAX_COUNT:
        raise ValueError(f"a chunk holds 1..{MAX_COUNT} readings, got {len(t)}")
    if len(t) > 1 and not bool(np.all(np.diff(t) > 0)):
        raise ValueError("ts must be strictly increasing")
    if not bool(np.all(np.isfinite(v))):
        raise ValueError("values must be finite")
    if int(t[0]) < -(2**61) or int(t[-1]) >= 2**61:
        # so that every delta and delta-of-delta fits an int64 (gateway range: 0 .. 2.5e17)
        raise ValueError("ts must lie within +-2**61")
    return t, v


def decimal_scaled(v: Float64s) -> tuple[int, Int64s] | None:
    """The smallest k whose scaling round-trips the whole chunk bit for bit, and the scaled ints."""
    bits = v.view(np.uint64)
    biggest = float(np.max(np.abs(v)))
    for k in range(MAX_DECIMALS + 1):
        if biggest * 10.0**k >= 2.0**62:  # deltas of scaled values must fit an int64
            return None
        scaled = np.rint(v * 10.0**k).astype(np.int64)
        if np.array_equal(unscale(scaled, k).view(np.uint64), bits):
            return k, scaled
    return None


def unscale(scaled: Int64s, k: int) -> Float64s:
    as_float = scaled.astype(np.float64)
    # IEEE division is correctly rounded, so 2137 / 100 is the double nearest 21.37: the one
    # float('21.37') gives. Multiplying by 0.01 would not be (0.01 is not exact).
    return as_float / 10.0**k if k else as_float


def zigzag(x: Int64s) -> UInt64s:
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def unzigzag(u: UInt64s) -> Int64s:
    return ((u >> np.uint64(1)) ^ (np.uint64(0) - (u & np.uint64(1)))).view(np.int64)


def shuffle(u: UInt64s) -> bytes:
    return u.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8).T.tobytes()


def unshuffle(b: bytes) -> UInt64s:
    planes = np.frombuffer(b, np.uint8).reshape(8, -1)
    return planes.T.copy().view("<u8").ravel().astype(np.uint64, copy=False)


def _undelta_ts(ts0: int, d1: int, dod: Int64s, n: int) -> Int64s:
    steps = np.empty(n, np.int64)
    steps[0] = ts0
    if n > 1:
        steps[1] = d1
        steps[2:] = d1 + np.cumsum(dod)
    return np.cumsum(steps)
