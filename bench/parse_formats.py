"""Parsing alone, per format: readings/s of each parser on the bodies bench/ingest_http.py posts,
in one run, beside native JSON's (the ratio the issue 13 target is about).

Each format's body holds the same readings (`ingest_http.Workload.body`, the same device, times
and values; `--metrics` fields a line or message): native JSON (`parse_telemetry`), line
protocol as `parse_lines` reads it (the columnar fast path for such bodies) and line by line
(`line_by_line=True`, the parser every other body takes), SenML (`parse_senml`), and, when
it is installed, the PyPI package line-protocol-parser (a C parser of one line into a dict)
with the least Python that makes the columns of its dicts, none of the checks. Line protocol is
parsed with the gateway's settings in ingest_http.py (FIELDGATE_LINE_PROTOCOL_METRIC `{field}`,
precision ms) and with the default metric template. Each parse is checked to give all the
readings. Time is the process's CPU time (steadier than wall time on a shared machine):
the best and the median of `--repeat` rounds (the formats take turns in each round) of parses
of `--readings` readings.

    .venv/bin/python bench/parse_formats.py
    .venv/bin/python bench/parse_formats.py --sizes 100,1000,10000 --repeat 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from ingest_http import Workload

from devices.formats import parse_telemetry
from devices.line_protocol import DEFAULT_METRIC_TEMPLATE, parse_lines
from devices.senml import parse_senml

try:  # not a project dependency: `.venv/bin/pip install line-protocol-parser` for its row
    from line_protocol_parser import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        parse_line,
    )
except ImportError:
    parse_line = None

NOW_US = int(time.time() * 1_000_000)
LIMITS: dict[str, Any] = {"now_us": NOW_US, "max_future_us": 300_000_000, "earliest_us": 0}


def parsers(size: int, metrics: int) -> list[tuple[str, bytes, Callable[[bytes], int]]]:
    """(name, body, parse -> readings) of each format, for bodies of `size` readings."""

    def body(fmt: str) -> bytes:
        return Workload(size=size, metrics=metrics, devices=1, requests=1, fmt=fmt).body(0, 1)

    def native(b: bytes) -> int:
        return len(parse_telemetry(b, max_messages=100_000, **LIMITS))

    def senml(b: bytes) -> int:
        return len(parse_senml(b, max_messages=100_000, **LIMITS))

    def lines(template: str, *, line_by_line: bool = False) -> Callable[[bytes], int]:
        def parse(b: bytes) -> int:
            batch = parse_lines(
                b,
                precision="ms",
                max_lines=100_000,
                metric_template=template,
                default_device="bench-0",
                line_by_line=line_by_line,
                **LIMITS,
            )
            return sum(len(d.readings) for d in batch.devices.values())

        return parse

    def library(b: bytes) -> int:
        """line-protocol-parser's C parser, a dict a line, into the columns (no checks)."""
        metrics: list[str] = []
        ts: list[int] = []
        values: list[float] = []
        for line in b.decode().split("\n"):
            point = parse_line(line)
            us = point["time"] * 1000
            for key, value in point["fields"].items():
                metrics.append(key)
                ts.append(us)
                values.append(float(value))
        return len(values)

    lp = body("lp")
    cases = [
        ("native JSON", body("json"), native),
        ("line protocol", lp, lines("{field}")),
        ("line protocol, line by line", lp, lines("{field}", line_by_line=True)),
        ("line protocol, {measurement}.{field}", lp, lines(DEFAULT_METRIC_TEMPLATE)),
        ("SenML", body("senml"), senml),
    ]
    if parse_line is not None:
        cases.append(("line-protocol-parser + columns, no checks", lp, library))
    return cases


def measure(
    cases: list[tuple[str, bytes, Callable[[bytes], int]]], number: int, repeat: int
) -> list[list[float]]:
    """CPU seconds a parse, one figure a round, for each case: the cases take turns in every
    round, so that a busy spell of a shared machine falls on all of them alike."""
    rounds: list[list[float]] = [[] for _ in cases]
    for _ in range(repeat):
        for (_, body, parse), times in zip(cases, rounds, strict=True):
            started = time.process_time()
            for _ in range(number):
                parse(body)
            times.append((time.process_time() - started) / number)
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="readings a body, comma list")
    parser.add_argument("--metrics", type=int, default=4, help="readings a line or message")
    parser.add_argument("--repeat", type=int, default=9, help="rounds (best and median)")
    parser.add_argument("--readings", type=int, default=200_000, help="readings parsed a round")
    args = parser.parse_args()
    print(f"{'body':<44}{'size':>6}{'best/s':>12}{'median/s':>12}{'vs JSON':>9}  us/body")
    for size in (int(s) for s in args.sizes.split(",")):
        cases = parsers(size, args.metrics)
        for name, body, parse in cases:
            if parse(body) != size:
                raise AssertionError(f"{name}: {parse(body)} readings of {size}")
        rounds = measure(cases, max(1, args.readings // size), args.repeat)
        native = statistics.median(rounds[0])
        for (name, _, _), times in zip(cases, rounds, strict=True):
            median = statistics.median(times)
            print(
                f"{name:<44}{size:>6}{size / min(times):>12,.0f}{size / median:>12,.0f}"
                f"{native / median:>8.2f}x  {1e6 * median:.0f}"
            )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
