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
from gateway.store.chunk_codec import CorruptChunk, UInt64s, UnknownChunkVersion

HOUR_US: Final = 3_600_000_000
_VERSION: Final = 1
_HEAD: Final = struct.Struct("<BI")  # version, number of partials
_DECIMAL: Final = ("s", "lo", "hi", "v0", "v1")
_FLOAT_BITS: Final = ("mean_err", "m2")
_ZSTD_C = zstandard.ZstdCompressor(level=3)
_ZSTD_D = zstandard.ZstdDecompressor()

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
        """Version byte, count, then zstd of the columns: t0 and t1 as deltas (small where
        readings are regular) and n, as zigzagged, byte-shuffled int64s (gateway/store/
        chunk_codec.py's transforms); each value column (s, lo, hi, v0, v1) as scaled decimal
        deltas where one k round-trips it bit for bit (sensor data: the same gain as in a
        chunk), else as shuffled float bits, behind a byte saying which (k + 1, or 0); the
        mean is not stored (it is s / n, as `of_readings` computes it); mean_err and m2 as
        shuffled float bits."""
        ints = [np.diff(self.t0, prepend=0), self.t1 - self.t0, self.n]
        parts = [codec.shuffle(codec.zigzag(c.astype(np.int64))) for c in ints]
        for name in _DECIMAL:
            column = getattr(self, name).astype(np.float64)
            scaled = codec.decimal_scaled(column) if len(column) else None
            if scaled is None:
                parts.append(b"\x00" + codec.shuffle(column.view(np.uint64)))
            else:
                k, ints_k = scaled
                deltas = codec.zigzag(np.diff(ints_k, prepend=0))
                parts.append(bytes([k + 1]) + codec.shuffle(deltas))
        for name in _FLOAT_BITS:
            parts.append(codec.shuffle(getattr(self, name).astype(np.float64).view(np.uint64)))
        return _HEAD.pack(_VERSION, len(self)) + _ZSTD_C.compress(b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> Partials:
        if not data or data[0] != _VERSION:
            raise UnknownChunkVersion(data[0] if data else -1)
        _, k = _HEAD.unpack_from(data)
        size = 8 * k * 10 + len(_DECIMAL)
        try:
            body = _ZSTD_D.decompress(data[_HEAD.size :], max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"rollup does not decompress: {exc}") from exc
        if len(body) != size:
            raise CorruptChunk(f"rollup holds {len(body)} bytes, {k} partials need {size}")
        at = 0

        def column() -> UInt64s:
            nonlocal at
            out = codec.unshuffle(body[at : at + 8 * k])
            at += 8 * k
            return out

        dt0, span, n = (codec.unzigzag(column()) for _ in range(3))
        t0 = np.cumsum(dt0)
        values: dict[str, Float64s] = {}
        for name in _DECIMAL:
            mark = body[at]
            at += 1
            if mark == 0:
                values[name] = column().view(np.float64)
            else:
                values[name] = codec.unscale(np.cumsum(codec.unzigzag(column())), mark - 1)
        mean_err, m2 = column().view(np.float64), column().view(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            mean = values["s"] / n
        return cls(t0, t0 + span, n, mean=mean, mean_err=mean_err, m2=m2, **values)


def one(
    t0: int,
    t1: int,
    n: int,
    s: float,
    lo: float,
    hi: float,
    v0: float,
    v1: float,
    mean: float,
    mean_err: float,
    m2: float,
) -> Partials:
    """A single partial (a chunk's summary, a bucket of rows)."""
    return many([(t0, t1, n, s, lo, hi, v0, v1, mean, mean_err, m2)])


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


def of_readings(ts: Int64s, values: Float64s, keys: Int64s) -> tuple[Int64s, Partials]:
    """Readings sorted by ts, grouped by their (non-decreasing) bucket `keys`: the distinct keys
    and one partial per key."""
    if len(ts) == 0:
        return np.zeros(0, np.int64), empty()
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    ends = np.append(starts[1:], len(ts)) - 1
    n = np.diff(np.append(starts, len(ts))).astype(np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.add.reduceat(values, starts)
        mean = s / n
        # Corrected two-pass per group (chunk_codec.Moments.of, vectorised).
        dev = values - np.repeat(mean, n)
        ss = np.add.reduceat(dev * dev, starts)
        dev_sum = np.add.reduceat(dev, starts)
        m2 = np.maximum(ss - dev_sum * dev_sum / n, 0.0)
        finite = np.isfinite(ss) & np.isfinite(dev_sum)
        m2 = np.where(finite, m2, np.inf)
        mean_err = np.where(finite, dev_sum / n, 0.0)
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
