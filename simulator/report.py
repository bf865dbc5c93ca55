"""Counting what happened, showing it live, and the final report (table and JSON).

Units: `sent` counts readings (a valid message with 5 metrics is 5; a bad message carries one
value, so it is 1), re-sent duplicates included. `accepted` is what the gateway acknowledged as
stored: over HTTP its `accepted + duplicates` answers; over MQTT the valid readings the broker
acknowledged (PUBACK; the gateway's own answer is the dead-letter list and `--verify`).
`rejected` counts rejections (per reading or per message; one per bad message sent).
"""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.fleet import Payload


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(slots=True)
class Stats:
    protocol: str
    devices: int
    latency_kind: str = "request-to-response"
    sent: int = 0
    messages: int = 0
    payloads: int = 0
    accepted: int = 0
    stored_new: int = 0
    duplicates_sent: int = 0
    duplicates_reported: int = 0
    bad_sent: int = 0
    bad_by_kind: Counter[str] = field(default_factory=Counter)
    bad_by_device: Counter[str] = field(default_factory=Counter)
    expected_codes: Counter[str] = field(default_factory=Counter)
    rejected_by_code: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    probes_lost: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    phase: str = "starting"

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_code.values())

    @property
    def duration_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def payload_sent(self, p: Payload) -> None:
        self.payloads += 1
        self.messages += p.messages
        self.sent += p.readings
        self.duplicates_sent += p.duplicates
        if p.bad:
            self.bad_sent += len(p.bad)
            self.bad_by_kind.update(b.kind.value for b in p.bad)
            self.bad_by_device[p.device_id] += len(p.bad)
            self.expected_codes.update(p.expected_codes)

    def merge(self, other: Stats) -> None:
        """Add another sender process's counts (--processes)."""
        for name in (
            "sent", "messages", "payloads", "accepted", "stored_new", "duplicates_sent",
            "duplicates_reported", "bad_sent", "errors", "retries", "probes_lost",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for counter in (
            "bad_by_kind", "bad_by_device", "expected_codes", "rejected_by_code", "error_kinds",
        ):  # fmt: skip
            getattr(self, counter).update(getattr(other, counter))
        self.latencies_ms.extend(other.latencies_ms)

    def latency_summary(self) -> dict[str, float]:
        values = sorted(self.latencies_ms)
        return {
            "p50": round(percentile(values, 50), 3),
            "p95": round(percentile(values, 95), 3),
            "p99": round(percentile(values, 99), 3),
            "max": round(values[-1], 3) if values else 0.0,
        }


@dataclass(slots=True)
class Verification:
    series: int = 0
    expected: int = 0
    stored: int = 0
    missing: int = 0
    unexpected: int = 0
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "exact"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def build_report(
    stats: Stats,
    verification: Verification | None,
    *,
    interrupted: bool,
    seed: int,
    rejections_known: bool = True,
) -> dict[str, Any]:
    """The machine-readable report (the issue's fields first, then the details)."""
    duration = stats.duration_s
    rejections_match = stats.rejected_by_code == stats.expected_codes if rejections_known else None
    verified = None
    if verification is not None:
        verified = verification.ok and rejections_match is not False
    return {
        "sent": stats.sent,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "errors": stats.errors,
        "duration_s": round(duration, 3),
        "readings_per_s": round(stats.sent / duration, 1) if duration > 0 else 0.0,
        "latency_ms": stats.latency_summary(),
        "verified": verified,
        "missing": verification.missing if verification else None,
        "unexpected": verification.unexpected if verification else None,
        # details
        "protocol": stats.protocol,
        "devices": stats.devices,
        "seed": seed,
        "interrupted": interrupted,
        "messages": stats.messages,
        "payloads": stats.payloads,
        "stored_new": stats.stored_new,
        "duplicates_sent": stats.duplicates_sent,
        "duplicates_reported": stats.duplicates_reported,
        "bad_sent": stats.bad_sent,
        "bad_by_kind": dict(sorted(stats.bad_by_kind.items())),
        "expected_rejections": dict(sorted(stats.expected_codes.items())),
        "rejected_by_code": dict(sorted(stats.rejected_by_code.items())),
        "rejections_match": rejections_match,
        "errors_by_kind": dict(sorted(stats.error_kinds.items())),
        "retries": stats.retries,
        "latency_kind": stats.latency_kind,
        "latency_samples": len(stats.latencies_ms),
        "probes_lost": stats.probes_lost,
        "verify": None
        if verification is None
        else {
            "mode": verification.mode,
            "series": verification.series,
            "expected_readings": verification.expected,
            "stored_readings": verification.stored,
            "mismatched_series": verification.mismatched[:20],
            "mismatched_series_total": len(verification.mismatched),
        },
    }


class LiveView:
    """The progress table redrawn while the run goes (rates over the last refresh)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._last = (time.monotonic(), 0)
        self._rate = 0.0

    def __rich__(self) -> Table:
        s = self.stats
        now = time.monotonic()
        then, sent_then = self._last
        if now - then >= 0.5:
            self._rate = (s.sent - sent_then) / (now - then)
            self._last = (now, s.sent)
        recent = sorted(s.latencies_ms[-2000:])
        table = Table(title=f"fieldgate simulate: {s.protocol}, {s.devices} devices ({s.phase})")
        for col in (
            "elapsed",
            "sent",
            "acked",
            "rejected",
            "errors",
            "readings/s",
            "p50 ms",
            "p95 ms",
        ):
            table.add_column(col, justify="right")
        table.add_row(
            f"{s.duration_s:.1f}s",
            f"{s.sent:,}",
            f"{s.accepted:,}",
            f"{s.rejected:,}",
            f"{s.errors:,}",
            f"{self._rate:,.0f}",
            f"{percentile(recent, 50):.1f}",
            f"{percentile(recent, 95):.1f}",
        )
        return table


def print_summary(console: Console, report: dict[str, Any]) -> None:
    """The end-of-run table."""
    table = Table(title="fieldgate simulate: summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    lat = report["latency_ms"]
    stopped = " (interrupted)" if report["interrupted"] else ""
    rows: list[tuple[str, str]] = [
        ("protocol / devices", f"{report['protocol']} / {report['devices']}"),
        ("duration", f"{report['duration_s']:.1f} s{stopped}"),
        ("readings sent", f"{report['sent']:,} ({report['readings_per_s']:,.0f}/s)"),
        ("accepted", f"{report['accepted']:,}"),
        (
            "duplicates sent / reported",
            f"{report['duplicates_sent']:,} / {report['duplicates_reported']:,}",
        ),
        ("bad sent / rejected", f"{report['bad_sent']:,} / {report['rejected']:,}"),
        ("rejections as expected", str(report["rejections_match"])),
        ("errors (retries)", f"{report['errors']:,} ({report['retries']:,})"),
        (
            f"latency ms ({report['latency_kind']})",
            f"p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}"
            f"  max {lat['max']:.1f}",
        ),
    ]
    if report["verified"] is not None:
        v = report["verify"]
        rows += [
            ("verified", "[green]yes[/]" if report["verified"] else "[red]NO[/]"),
            ("series checked", f"{v['series']:,} ({v['mode']})"),
            (
                "readings expected / stored",
                f"{v['expected_readings']:,} / {v['stored_readings']:,}",
            ),
            ("missing / unexpected", f"{report['missing']:,} / {report['unexpected']:,}"),
        ]
    schedule = report.get("schedule")
    if schedule is not None:
        lag = schedule["send_lag_ms"]
        rows.append(
            (
                f"schedule ({schedule['processes']} sender process(es))",
                f"{schedule['offered_batches_per_s']:,.0f} of"
                f" {schedule['planned_batches_per_s']:,.0f} batches/s planned;"
                f" lag p99 {lag['p99']:,.0f} ms",
            )
        )
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    if schedule is not None and schedule["limit"] is not None:
        colour = "red" if schedule["limit"] == "simulator" else "yellow"
        console.print(f"[{colour}]{schedule['why']}[/]")
    elif schedule is not None and schedule["planned_batches"]:
        console.print(f"the simulator {schedule['why']}")
    mismatched = (report.get("verify") or {}).get("mismatched_series") or []
    for m in mismatched[:10]:
        console.print(f"  [red]mismatch[/] {m}")
