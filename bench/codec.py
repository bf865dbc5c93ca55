"""Bytes per reading and encode/decode µs per reading of candidate encodings for packed chunks.

One chunk is one series' readings, sorted by time: `ts` int64 epoch microseconds and `value`
float64. Every candidate must give back identical ts and bit-identical values (checked here on
every chunk). Data sets (seeded; `--chunks` chunks of `--size` readings each, fresh data per chunk):

    walk      the issue's data set: a random walk at 0.01 resolution (step ~ N(0, 0.05), rounded
              to 2 decimals; --walk-step), one reading every 10 s exactly
    irregular the same walk, timestamps jittered by up to +-0.5 s with 2% gaps of 1 min to 1 h
    noisy     full-precision doubles (a random walk of N(0, 1) steps, not rounded), regular ts
    counter   an integer-valued counter (increments Poisson(30)), regular ts

Candidates:

    raw+{zlib,zstd,lz4}        ts int64 + value float64 bytes, general compressor only
    gorilla (pure Python)      delta-of-delta ts and XOR'd floats, bit-packed as in the Gorilla
                               paper (Pelkonen et al., VLDB 2015), no compressor
    xor-shuffle+{zlib,zstd,lz4}  numpy: ts delta-of-delta and values XOR'd with the previous
                               value's bits, both zigzag/uint64, byte-shuffled (all byte 0s, then
                               all byte 1s, ...), then the compressor
    dec-shuffle+{zlib,zstd,lz4}  decimal scaling: the smallest k (0..9) where every value round-
                               trips bit for bit as round(v * 10**k) / 10**k, stored as deltas
                               of the scaled int64s, zigzagged and byte-shuffled; falls back to
                               xor-shuffle for a chunk where no k round-trips
    dec-narrow+{zstd}          as dec-shuffle, but each zigzagged array stored at the narrowest
                               width (1, 2, 4 or 8 bytes) that holds its largest element
    dec-bitpack(+zstd)         as dec-shuffle, but each zigzagged array bit-packed at the width
                               of its largest element (numpy unpackbits/packbits), optionally
                               followed by zstd
    chunk_codec                the encoding gateway/store/chunk_codec.py ships

    .venv/bin/python bench/codec.py                  # the figures in bench/README.md
    .venv/bin/python bench/codec.py --chunks 20 --size 1000 --sets walk --no-gorilla
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
import zlib
from collections.abc import Callable

import numpy as np
import zstandard

from gateway.store import chunk_codec

try:  # not a project dependency: `.venv/bin/pip install lz4` for its rows
    import lz4.block  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError:
    lz4 = None

Arrays = tuple[np.ndarray, np.ndarray]
Codec = tuple[Callable[[np.ndarray, np.ndarray], bytes], Callable[[bytes], Arrays]]

START_US = 1_764_547_200_000_000  # 2025-12-01T00:00:00Z


# ---------------------------------------------------------------- data sets


WALK_STEP = [0.05]  # std-dev of one step of the walk; --walk-step


def walk(rng: np.random.Generator, n: int) -> Arrays:
    ts = START_US + np.arange(n, dtype=np.int64) * 10_000_000
    steps = np.rint(rng.normal(0.0, WALK_STEP[0] * 100, n)).astype(np.int64)  # units of 0.01
    scaled = int(rng.integers(0, 100_000)) + np.cumsum(steps)
    return ts, np.array([round(int(s) / 100, 2) for s in scaled], dtype=np.float64)


def irregular(rng: np.random.Generator, n: int) -> Arrays:
    _, values = walk(rng, n)
    gaps = np.where(rng.random(n) < 0.02, rng.integers(60_000_000, 3_600_000_000, n), 10_000_000)
    jitter = rng.integers(-500_000, 500_000, n)
    ts = START_US + np.cumsum(gaps) + jitter
    ts = np.maximum.accumulate(ts)
    ts = ts + np.arange(n)  # strictly increasing even where jitter collides
    return ts.astype(np.int64), values


def noisy(rng: np.random.Generator, n: int) -> Arrays:
    ts = START_US + np.arange(n, dtype=np.int64) * 10_000_000
    return ts, 20.0 + np.cumsum(rng.normal(0.0, 1.0, n))


def counter(rng: np.random.Generator, n: int) -> Arrays:
    ts = START_US + np.arange(n, dtype=np.int64) * 10_000_000
    return ts, (int(rng.integers(0, 10**9)) + np.cumsum(rng.poisson(30, n))).astype(np.float64)


DATA_SETS: dict[str, Callable[[np.random.Generator, int], Arrays]] = {
    "walk": walk,
    "irregular": irregular,
    "noisy": noisy,
    "counter": counter,
}


# ---------------------------------------------------------------- compressors

ZSTD_C = zstandard.ZstdCompressor(level=3)
ZSTD_D = zstandard.ZstdDecompressor()
Compressor = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]
COMPRESSORS: dict[str, Compressor] = {
    "zlib": (lambda b: zlib.compress(b, 6), zlib.decompress),
    "zstd": (ZSTD_C.compress, ZSTD_D.decompress),
}
if lz4 is not None:
    COMPRESSORS["lz4"] = (
        lambda b: lz4.block.compress(b, mode="high_compression"),
        lz4.block.decompress,
    )


def zstd_at(level: int) -> Compressor:
    return zstandard.ZstdCompressor(level=level).compress, ZSTD_D.decompress


# ---------------------------------------------------------------- building blocks


def zigzag(x: np.ndarray) -> np.ndarray:
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    return ((u >> np.uint64(1)) ^ (np.uint64(0) - (u & np.uint64(1)))).view(np.int64)


def shuffle(u: np.ndarray) -> bytes:
    return u.view(np.uint8).reshape(-1, 8).T.tobytes()


def unshuffle(b: bytes, n: int) -> np.ndarray:
    return np.frombuffer(b, np.uint8).reshape(8, n).T.copy().view(np.uint64).ravel()


def ts_dod(ts: np.ndarray) -> np.ndarray:
    """[ts0, d1, dd2, dd3, ...] with ts0 and d1 left for the header: zigzagged dd only."""
    return zigzag(np.diff(ts, 2)) if len(ts) > 2 else np.zeros(0, np.uint64)


def ts_undod(ts0: int, d1: int, dd: np.ndarray, n: int) -> np.ndarray:
    deltas = np.empty(n, np.int64)
    deltas[0] = ts0
    if n > 1:
        deltas[1] = d1
        deltas[2:] = d1 + np.cumsum(unzigzag(dd))
    return np.cumsum(deltas)


def xor_values(v: np.ndarray) -> np.ndarray:
    bits = v.view(np.uint64)
    out = bits.copy()
    out[1:] ^= bits[:-1]
    return out


def unxor_values(x: np.ndarray) -> np.ndarray:
    return np.bitwise_xor.accumulate(x).view(np.float64)


def decimal_scale(v: np.ndarray) -> tuple[int, np.ndarray] | None:
    bits = v.view(np.uint64)
    for k in range(10):
        p = 10.0**k
        s = np.rint(v * p)
        if not np.all(np.abs(s) < 2.0**53):
            return None
        scaled = s.astype(np.int64)
        if np.array_equal((scaled.astype(np.float64) / p).view(np.uint64), bits):
            return k, scaled
    return None


# ---------------------------------------------------------------- candidates


def raw(comp: Compressor) -> Codec:
    c, d = comp

    def enc(ts: np.ndarray, v: np.ndarray) -> bytes:
        return c(ts.tobytes() + v.tobytes())

    def dec(b: bytes) -> Arrays:
        body = d(b)
        n = len(body) // 16
        return np.frombuffer(body, np.int64, n), np.frombuffer(body, np.float64, n, 8 * n)

    return enc, dec


HEAD = struct.Struct("<IqqBq")  # n, ts0, d1, k (255: xor), first scaled value / bits


def packed(comp: Compressor, layout: str, decimal: bool, ts_delta: bool = False) -> Codec:
    c, d = comp

    def pack(u: np.ndarray) -> bytes:
        if layout == "shuffle":
            return shuffle(u)
        if layout == "narrow":
            top = int(u.max()) if len(u) else 0
            w = next(w for w in (1, 2, 4, 8) if top < 1 << (8 * w))
            return bytes([w]) + u.astype(f"<u{w}").tobytes()
        top = int(u.max()) if len(u) else 0  # bitpack
        w = max(top.bit_length(), 1)
        bits = np.unpackbits(u.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)[:, 64 - w :]
        return bytes([w]) + np.packbits(bits.ravel()).tobytes()

    def unpack(b: bytes, n: int) -> tuple[np.ndarray, bytes]:
        if layout == "shuffle":
            return unshuffle(b[: 8 * n], n), b[8 * n :]
        w = b[0]
        if layout == "narrow":
            size = w * n
            return np.frombuffer(b, f"<u{w}", n, 1).astype(np.uint64), b[1 + size :]
        size = (w * n + 7) // 8
        bits = np.unpackbits(np.frombuffer(b, np.uint8, size, 1))[: w * n].reshape(n, w)
        full = np.zeros((n, 64), np.uint8)
        full[:, 64 - w :] = bits
        return np.packbits(full, axis=1).view(">u8").ravel().astype(np.uint64), b[1 + size :]

    def enc(ts: np.ndarray, v: np.ndarray) -> bytes:
        n = len(ts)
        d1 = int(ts[1] - ts[0]) if n > 1 else 0
        scaled = decimal_scale(v) if decimal else None
        if scaled is None:
            k, first, rest = 255, int(v.view(np.int64)[0]), xor_values(v)[1:]
        else:
            k, s = scaled
            first, rest = int(s[0]), zigzag(np.diff(s))
        dd = zigzag(np.diff(ts, 1)[1:]) if ts_delta else ts_dod(ts)
        body = pack(dd) + pack(rest)
        return HEAD.pack(n, int(ts[0]), d1, k, first) + c(body)

    def dec(b: bytes) -> Arrays:
        n, ts0, d1, k, first = HEAD.unpack_from(b)
        body = d(b[HEAD.size :])
        dd, body = unpack(body, max(n - 2, 0))
        rest, _ = unpack(body, n - 1)
        if ts_delta:
            ts = np.cumsum(np.concatenate(([ts0, d1], unzigzag(dd))))[:n]
        else:
            ts = ts_undod(ts0, d1, dd, n)
        if k == 255:
            x = np.empty(n, np.uint64)
            x[0] = np.int64(first).view(np.uint64)
            x[1:] = rest
            return ts, unxor_values(x)
        s = np.empty(n, np.int64)
        s[0] = first
        s[1:] = unzigzag(rest)
        return ts, np.cumsum(s).astype(np.float64) / 10.0**k

    return enc, dec


class BitWriter:
    __slots__ = ("acc", "n", "out")

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, nbits: int) -> None:
        self.acc = (self.acc << nbits) | value
        self.n += nbits
        while self.n >= 8:
            self.n -= 8
            self.out.append((self.acc >> self.n) & 0xFF)
        self.acc &= (1 << self.n) - 1

    def getvalue(self) -> bytes:
        return bytes(self.out) + (bytes([(self.acc << (8 - self.n)) & 0xFF]) if self.n else b"")


class BitReader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def read(self, nbits: int) -> int:
        start, end = self.pos >> 3, (self.pos + nbits + 7) >> 3
        chunk = int.from_bytes(self.buf[start:end], "big")
        shift = (end << 3) - self.pos - nbits
        self.pos += nbits
        return (chunk >> shift) & ((1 << nbits) - 1)


DOD_BUCKETS = ((7, 0b10, 2), (9, 0b110, 3), (12, 0b1110, 4))


def gorilla_encode(ts: np.ndarray, v: np.ndarray) -> bytes:
    w = BitWriter()
    tss = ts.tolist()
    bits = v.view(np.uint64).tolist()
    w.write(len(tss), 32)
    w.write(tss[0], 64)
    w.write(bits[0], 64)
    prev_ts, prev_d, prev_bits = tss[0], 0, bits[0]
    lead, trail = 65, 0
    for t, b in zip(tss[1:], bits[1:], strict=True):
        d = t - prev_ts
        dd = d - prev_d
        prev_ts, prev_d = t, d
        if dd == 0:
            w.write(0, 1)
        else:
            for width, tag, tag_bits in DOD_BUCKETS:
                if -(1 << (width - 1)) < dd <= 1 << (width - 1):
                    w.write(tag, tag_bits)
                    w.write(dd & ((1 << width) - 1), width)
                    break
            else:
                w.write(0b1111, 4)
                w.write(dd & ((1 << 64) - 1), 64)
        x = b ^ prev_bits
        prev_bits = b
        if x == 0:
            w.write(0, 1)
            continue
        lz = 64 - x.bit_length()
        tz = (x & -x).bit_length() - 1
        lz = min(lz, 31)
        if lead <= lz and trail <= tz:
            w.write(0b10, 2)
            w.write(x >> trail, 64 - lead - trail)
        else:
            lead, trail = lz, tz
            w.write(0b11, 2)
            w.write(lz, 5)
            w.write(64 - lz - tz - 1, 6)
            w.write(x >> tz, 64 - lz - tz)
    return w.getvalue()


def gorilla_decode(b: bytes) -> Arrays:
    r = BitReader(b)
    n = r.read(32)
    tss = [r.read(64)]
    bits = [r.read(64)]
    d = 0
    lead = trail = 0
    for _ in range(n - 1):
        if r.read(1):
            for width, _tag, _tag_bits in DOD_BUCKETS:
                if not r.read(1):
                    raw_dd = r.read(width)
                    dd = raw_dd - (1 << width) if raw_dd > 1 << (width - 1) else raw_dd
                    break
            else:
                raw_dd = r.read(64)
                dd = raw_dd - (1 << 64) if raw_dd >= 1 << 63 else raw_dd
            d += dd
        tss.append(tss[-1] + d)
        if not r.read(1):
            bits.append(bits[-1])
            continue
        if r.read(1):
            lead = r.read(5)
            trail = 64 - lead - r.read(6) - 1
        bits.append(bits[-1] ^ (r.read(64 - lead - trail) << trail))
    return np.array(tss, np.int64), np.array(bits, np.uint64).view(np.float64)


def candidates(with_gorilla: bool) -> dict[str, Codec]:
    out: dict[str, Codec] = {f"raw+{name}": raw(c) for name, c in COMPRESSORS.items()}
    if with_gorilla:
        out["gorilla (pure Python)"] = (gorilla_encode, gorilla_decode)
    for name, c in COMPRESSORS.items():
        out[f"xor-shuffle+{name}"] = packed(c, "shuffle", decimal=False)
    for name, c in COMPRESSORS.items():
        out[f"dec-shuffle+{name}"] = packed(c, "shuffle", decimal=True)
    out["dec-shuffle+zstd9"] = packed(zstd_at(9), "shuffle", decimal=True)
    out["dec-shuffle+zstd19"] = packed(zstd_at(19), "shuffle", decimal=True)
    out["dec-shuffle-tsdelta+zstd"] = packed(COMPRESSORS["zstd"], "shuffle", True, ts_delta=True)
    out["dec-narrow+zstd"] = packed(COMPRESSORS["zstd"], "narrow", decimal=True)
    out["dec-bitpack"] = packed((bytes, bytes), "bitpack", decimal=True)
    out["dec-bitpack+zstd"] = packed(COMPRESSORS["zstd"], "bitpack", decimal=True)
    out["chunk_codec"] = (chunk_codec_encode, chunk_codec_decode)
    return out


def chunk_codec_encode(ts: np.ndarray, v: np.ndarray) -> bytes:
    return chunk_codec.encode(ts, v).data


def chunk_codec_decode(b: bytes) -> Arrays:
    chunk = chunk_codec.decode(b)
    return chunk.ts, chunk.values


# ---------------------------------------------------------------- measurement


def measure(codec: Codec, chunks: list[Arrays], repeat: int) -> tuple[float, float, float]:
    enc, dec = codec
    readings = sum(len(ts) for ts, _ in chunks)
    encoded = [enc(ts, v) for ts, v in chunks]
    for (ts, v), b in zip(chunks, encoded, strict=True):
        ts2, v2 = dec(b)
        assert np.array_equal(ts, ts2), "timestamps differ"
        assert np.array_equal(v.view(np.uint64), np.asarray(v2).view(np.uint64)), "values differ"
    enc_s, dec_s = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for ts, v in chunks:
            enc(ts, v)
        t1 = time.perf_counter()
        for b in encoded:
            dec(b)
        t2 = time.perf_counter()
        enc_s.append(t1 - t0)
        dec_s.append(t2 - t1)
    size = sum(len(b) for b in encoded)
    return (
        size / readings,
        statistics.median(enc_s) / readings * 1e6,
        statistics.median(dec_s) / readings * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--size", type=int, default=1000, help="readings per chunk")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--sets", default=",".join(DATA_SETS))
    parser.add_argument("--no-gorilla", action="store_true", help="skip the slow pure-Python one")
    parser.add_argument("--walk-step", type=float, default=0.05, help="std-dev of a walk step")
    parser.add_argument("--only", help="only the candidates whose name contains this")
    args = parser.parse_args()
    WALK_STEP[0] = args.walk_step
    codecs = candidates(not args.no_gorilla)
    print(f"{args.chunks} chunks x {args.size} readings per data set; µs are per reading")
    for set_name in args.sets.split(","):
        rng = np.random.default_rng([args.seed, list(DATA_SETS).index(set_name)])
        chunks = [DATA_SETS[set_name](rng, args.size) for _ in range(args.chunks)]
        print(f"\n{set_name}\n{'candidate':<26} {'bytes/reading':>13} {'enc µs':>8} {'dec µs':>8}")
        for name, codec in codecs.items():
            if args.only and args.only not in name:
                continue
            repeat = 1 if name.startswith("gorilla") else args.repeat
            size, enc_us, dec_us = measure(codec, chunks, repeat)
            print(f"{name:<26} {size:>13.3f} {enc_us:>8.3f} {dec_us:>8.3f}")


if __name__ == "__main__":
    main()
