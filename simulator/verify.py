"""`--verify`: read back what the gateway stored and compare it with what was sent as valid.

Per (device, metric) series, over the time range this run sent it:

- `exact` (default): page through the raw readings (`GET .../telemetry`, cursor paging, 10,000 a
  page) and compare the count and an order-independent checksum of (ts, value) pairs, so a lost,
  extra, moved or altered reading all show. Cost: every stored reading crosses the wire once.
- `aggregate`: one `agg=count,sum` query per series over whole-day buckets: exact on the count,
  the sum compared with a relative tolerance (SQL sums in its own order). For big backfills,
  where reading every reading back is the slow part.

Devices this run created are also checked whole: the gateway's per-metric counts
(`GET /devices/{id}`) must name no metric the run did not send, so a reading stored under a
wrong name shows too. With MQTT, storage trails the broker's acknowledgement, so series that
do not match yet are read again until they match or stop changing for `settle_s`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable

from simulator.fleet import Ledger, Tally
from simulator.gateway_api import API, GatewayApi, GatewayError
from simulator.report import Verification

Key = tuple[str, str]


async def _stored(api: GatewayApi, key: Key, want: Tally, mode: str) -> Tally:
    device_id, metric = key
    if mode == "exact":
        return await api.read_tally(device_id, metric, want.first_us, want.last_us + 1)
    count, total = await api.read_counts(device_id, metric, want.first_us, want.last_us + 1)
    return Tally(count=count, total=total)


def _matches(want: Tally, got: Tally, mode: str) -> bool:
    if want.count != got.count:
        return False
    if mode == "exact":
        return want.checksum == got.checksum
    return math.isclose(want.total, got.total, rel_tol=1e-9, abs_tol=1e-6 * max(want.count, 1))


async def _extra_metrics(
    api: GatewayApi, ledger: Ledger, fresh_devices: Iterable[str], limit: asyncio.Semaphore
) -> dict[Key, int]:
    sent: dict[str, set[str]] = {}
    for device_id, metric in ledger.series:
        sent.setdefault(device_id, set()).add(metric)

    async def one(device_id: str) -> dict[Key, int]:
        async with limit:
            r = await api.client.get(f"{API}/devices/{device_id}", headers=api.admin)
        if r.status_code != 200:
            raise GatewayError(f"GET /devices/{device_id} answered HTTP {r.status_code}")
        metrics = r.json().get("metrics", {})
        known = sent.get(device_id, set())
        return {
            (device_id, m): int(s.get("count", 0))
            for m, s in metrics.items()
            if m not in known and int(s.get("count", 0))
        }

    found: dict[Key, int] = {}
    for part in await asyncio.gather(*(one(d) for d in fresh_devices)):
        found.update(part)
    return found


async def verify(
    api: GatewayApi,
    ledger: Ledger,
    *,
    mode: str = "exact",
    concurrency: int = 16,
    settle_s: float = 0.0,
    fresh_devices: Iterable[str] = (),
) -> Verification:
    """Compare the ledger with the gateway's store (see the module docstring)."""
    limit = asyncio.Semaphore(concurrency)
    got, pending = await _read_until_settled(api, ledger, mode, limit, settle_s)
    result = _compare(ledger, got, pending, mode)
    _count_never_sent(result, await _extra_metrics(api, ledger, fresh_devices, limit))
    return result


async def _read_until_settled(
    api: GatewayApi, ledger: Ledger, mode: str, limit: asyncio.Semaphore, settle_s: float
) -> tuple[dict[Key, Tally], dict[Key, Tally]]:
    """What is stored for each series (read again while some do not match and their counts
    still changed within `settle_s`), and the series that still do not match."""
    pending = dict(ledger.series)
    got: dict[Key, Tally] = {}

    async def check(key: Key) -> None:
        async with limit:
            got[key] = await _stored(api, key, pending[key], mode)

    last_change = time.monotonic()
    previous: dict[Key, int] = {}
    while True:
        await asyncio.gather(*(check(k) for k in pending))
        pending = {k: t for k, t in pending.items() if not _matches(t, got[k], mode)}
        counts = {k: got[k].count for k in pending}
        if counts != previous:
            last_change = time.monotonic()
            previous = counts
        if not pending or time.monotonic() - last_change >= settle_s:
            break
        await asyncio.sleep(min(0.5, max(settle_s / 10, 0.05)))
    return got, pending


def _compare(
    ledger: Ledger, got: dict[Key, Tally], pending: dict[Key, Tally], mode: str
) -> Verification:
    """Totals over every series, and one entry per series that does not match."""
    result = Verification(series=len(ledger.series), mode=mode)
    for key, want in ledger.series.items():
        have = got[key]
        result.expected += want.count
        result.stored += have.count
        if key not in pending:
            continue
        if have.count < want.count:
            result.missing += want.count - have.count
        elif have.count > want.count:
            result.unexpected += have.count - want.count
        result.mismatched.append(
            {
                "device": key[0],
                "metric": key[1],
                "expected": want.count,
                "stored": have.count,
                "problem": "count" if have.count != want.count else "checksum",
            }
        )
    return result


def _count_never_sent(result: Verification, extra: dict[Key, int]) -> None:
    """Readings stored under metric names the run never sent: unexpected, and a mismatch."""
    for (device_id, metric), count in sorted(extra.items()):
        result.unexpected += count
        result.stored += count
        result.mismatched.append(
            {
                "device": device_id,
                "metric": metric,
                "expected": 0,
                "stored": count,
                "problem": "never sent",
            }
        )
