"""Partial aggregates as numpy columns: what packed history answers aggregates from.

A `Partials` holds k partial aggregates of one series, each over a set of readings: the first
and last reading's ts (`t0`, `t1`) and value (`v0`, `v1`), count `n`, sum `s`, `lo`, `hi`, and
the stddev moments (`mean` + `mean_err`, a double-double, and `m2`, the sum of squared
deviations from the mean; gateway/store/chunk_codec.py's `Moments`, as columns). Any two
partials of a series merge exactly in count, min, max, first and last, and within floating-point
rounding in sum, mean and stddev (the order of the additions differs from a scan of the raw
rows: tests hold them to 1e-9 relative, as against an independent computation).

Where partials come from:
- `of_readings(ts, values, keys)`: decoded readings grouped by bucket key (one partial per key);
- `hourly(ts, values)`: a chunk's readings per UTC hour: the 1-hour rollup kept with each chunk
  (`to_bytes`/`from_bytes`), so long ranges are answered without decoding readings;
- a chunk's own summary (one partial), and the SQL buckets of rows not yet packed.
`merge_by_key` combines partials that fall in the same bucket.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import numpy.typing as npt
import zstandard

from gateway.store import chunk_codec as codec
from gateway.store.chunk_codec import CorruptChunk, UnknownChunkVersion

HOUR_US: Final = 3_600_000_000
_VERSION: Final = 1
_HEAD: Final = struct.Struct("<BI")  # version, number of partials
_DECIMAL: Final = ("s", "lo", "hi", "v0", "v1")
_FLOAT_BITS: Final = ("mean_err", "m2")

Int64s = npt.NDArray[np.int64]
Float64s = npt.NDArray[np.float64]


@dataclass(slots=True)
class Partials:
    t0: Int64s
    t1: Int64s
    n: Int64s
    s: Float64s
    lo: Float64s
    hi: Float64s
    v0: Float64s
    v1: Float64s
    mean: Float64s
    mean_err: Float64s
    m2: Float64s

    def __len__(self) -> int:
        return len(self.n)

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Partials:
        return Partials(*(getattr(self, f.name)[index] for f in fields(self)))

    def to_bytes(self) -> bytes:
        """The rollup kept with a chunk. Header: version byte, count k, then one byte for each
        value column (s, lo, hi, v0, v1): k + 1 when its scaled decimals round-trip it bit for
        bit (sensor data: the gain a chunk gets), 0 when it is kept as float bits. Then zstd
        of ten uint64 columns of k, byte-shuffled as one (10, 8, k) array: t0 as deltas, t1 -
        t0 and n (zigzagged int64s: small where readings are regular), the five value columns
        (zigzagged deltas of the scaled ints, or float bits), mean_err and m2 (float bits).
        The mean is not stored: it is s / n, as `of_readings` computes it."""
        k = len(self)
        cols = np.empty((10, k), dtype=np.uint64)
        cols[0] = codec.zigzag(np.diff(self.t0, prepend=0).astype(np.int64))
        cols[1] = codec.zigzag((self.t1 - self.t0).astype(np.int64))
        cols[2] = codec.zigzag(self.n.astype(np.int64))
        marks = bytearray()
        for i, name in enumerate(_DECIMAL, start=3):
            column = getattr(self, name).astype(np.float64)
            scaled = codec.decimal_scaled(column) if k else None
            if scaled is None:
                marks.append(0)
                cols[i] = column.view(np.uint64)
            else:
                marks.append(scaled[0] + 1)
                cols[i] = codec.zigzag(np.diff(scaled[1], prepend=0))
        cols[8] = self.mean_err.astype(np.float64).view(np.uint64)
        cols[9] = self.m2.astype(np.float64).view(np.uint64)
        shuffled = cols.astype("<u8").view(np.uint8).reshape(10, k, 8).transpose(0, 2, 1)
        head = _HEAD.pack(_VERSION, k) + bytes(marks)
        return head + codec.ZSTD.c.compress(np.ascontiguousarray(shuffled).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Partials:
        if not data or data[0] != _VERSION:
            raise UnknownChunkVersion(data[0] if data else -1)
        if len(data) < _HEAD.size + len(_DECIMAL):
            raise CorruptChunk("rollup is truncated")
        _, k = _HEAD.unpack_from(data)
        marks = data[_HEAD.size : _HEAD.size + len(_DECIMAL)]
        try:
            body = codec.ZSTD.d.decompress(
                data[_HEAD.size + len(_DECIMAL) :], max_output_size=80 * k
            )
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"rollup does not decompress: {exc}") from exc
        if len(body) != 80 * k:
            raise CorruptChunk(f"rollup holds {len(body)} bytes, {k} partials need {80 * k}")
        cols = (
            np.frombuffer(body, np.uint8)
            .reshape(10, 8, k)
            .transpose(0, 2, 1)
            .copy()
            .view("<u8")
            .reshape(10, k)
            .astype(np.uint64, copy=False)
        )
        ints = codec.unzigzag(cols[:3])
        t0 = np.cumsum(ints[0])
        n = ints[2]
        # The five value columns at once: scaled decimals where marked, float bits elsewhere
        # (dividing by 1.0 is exact, so one division serves every k, as codec.unscale does).
        scale = np.array([10.0 ** (m - 1) if m else 1.0 for m in marks])[:, None]
        scaled = np.cumsum(codec.unzigzag(cols[3:8]), axis=1).astype(np.float64) / scale
        decimal = np.array([m != 0 for m in marks])[:, None]
        values = np.where(decimal, scaled, cols[3:8].view(np.float64))
        with np.errstate(over="ignore", invalid="ignore"):
            mean = values[0] / n
        s, lo, hi, v0, v1 = values
        mean_err, m2 = cols[8].view(np.float64), cols[9].view(np.float64)
        return cls(t0, t0 + ints[1], n, s, lo, hi, v0, v1, mean, mean_err, m2)


def many(rows: Sequence[Sequence[float]]) -> Partials:
    """Partials from rows of (t0, t1, n, s, lo, hi, v0, v1, mean, mean_err, m2)."""
    if not rows:
        return empty()
    cols = list(zip(*rows, strict=True))
    i, f = np.int64, np.float64
    return Partials(
        np.array(cols[0], dtype=i),
        np.array(cols[1], dtype=i),
        np.array(cols[2], dtype=i),
        *(np.array(c, dtype=f) for c in cols[3:]),
    )


def empty() -> Partials:
    i = np.zeros(0, np.int64)
    f = np.zeros(0, np.float64)
    return Partials(i, i, i, f, f, f, f, f, f, f, f)


def concat(parts: Sequence[Partials]) -> Partials:
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty()
    if len(parts) == 1:
        return parts[0]
    return Partials(
        *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Partials))
    )


def of_readings(
    ts: Int64s, values: Float64s, keys: Int64s, *, moments: bool = True
) -> tuple[Int64s, Partials]:
    """Readings sorted by ts, grouped by their (non-decreasing) bucket `keys`: the distinct keys
    and one partial per key. Without `moments` (no stddev asked) m2 and mean_err are zeros."""
    if len(ts) == 0:
        return np.zeros(0, np.int64), empty()
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    ends = np.append(starts[1:], len(ts)) - 1
    n = np.diff(np.append(starts, len(ts))).astype(np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.add.reduceat(values, starts)
        mean = s / n
        if moments:
            # Corrected two-pass per group (chunk_codec.Moments.of, vectorised).
            dev = values - np.repeat(mean, n)
            ss = np.add.reduceat(dev * dev, starts)
            dev_sum = np.add.reduceat(dev, starts)
            m2 = np.maximum(ss - dev_sum * dev_sum / n, 0.0)
            finite = np.isfinite(ss) & np.isfinite(dev_sum)
            m2 = np.where(finite, m2, np.inf)
            mean_err = np.where(finite, dev_sum / n, 0.0)
        else:
            m2 = mean_err = np.zeros(len(n))
    partials = Partials(
        t0=ts[starts],
        t1=ts[ends],
        n=n,
        s=s,
        lo=np.minimum.reduceat(values, starts),
        hi=np.maximum.reduceat(values, starts),
        v0=values[starts],
        v1=values[ends],
        mean=mean,
        mean_err=mean_err,
        m2=m2,
    )
    return keys[starts], partials


def hourly(ts: Int64s, values: Float64s) -> Partials:
    """One partial per UTC hour that has readings (the rollup kept with a chunk)."""
    return of_readings(ts, values, ts - ts % HOUR_US)[1]


def merge_by_key(keys: Int64s, partials: Partials) -> tuple[Int64s, Partials]:
    """Partials with the same key combined into one (any order in, keys ascending out)."""
    if len(partials) == 0:
        return keys, partials
    order = np.lexsort((partials.t0, keys))
    k = keys[order]
    p = partials.take(order)
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    if len(starts) == len(k):
        return k, p
    n = np.add.reduceat(p.n, starts)
    counts = np.diff(np.append(starts, len(k)))
    with np.errstate(over="ignore", invalid="ignore"):
        weighted = p.n * (p.mean + p.mean_err)
        mean = np.add.reduceat(weighted, starts) / n
        d = (p.mean - np.repeat(mean, counts)) + p.mean_err
        m2 = np.add.reduceat(p.m2, starts) + np.add.reduceat(p.n * d * d, starts)
    last_order = np.lexsort((p.t1, k))
    ends = np.append(starts[1:], len(k)) - 1
    merged = Partials(
        t0=p.t0[starts],
        t1=p.t1[last_order][ends],
        n=n,
        s=np.add.reduceat(p.s, starts),
        lo=np.minimum.reduceat(p.lo, starts),
        hi=np.maximum.reduceat(p.hi, starts),
        v0=p.v0[starts],
        v1=p.v1[last_order][ends],
        mean=mean,
        mean_err=np.zeros(len(starts)),
        m2=np.where(np.isfinite(m2), m2, np.inf),
    )
    return k[starts], merged
