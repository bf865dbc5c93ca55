"""The gateway's HTTP API as the simulator uses it: provision devices, post telemetry, read back.

Written against the documented API (prefix /api/v1, bearer tokens, errors as
`{"error": {"code", "message", "details"}}`), not against gateway code: the simulator is an
outside client.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from simulator.fleet import Tally
from simulator.http_lane import HttpLane, LaneError, retry_after

API: Final = "/api/v1"
PAGE: Final = 10_000  # the gateway's largest page by default; it answers fewer when it has less
MAX_ATTEMPTS: Final = 5
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


class GatewayError(Exception):
    """The gateway answered something the simulator cannot go on with."""


@dataclass(slots=True)
class Outcome:
    """What the gateway answered to one telemetry body."""

    ok: bool  # the gateway answered about every reading (2xx, or a 4xx with the rejections)
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    latency_s: float = 0.0
    retries: int = 0


def _error_code(response: httpx.Response) -> tuple[str, list[Any]]:
    return _error_of(response.content)


def _error_of(content: bytes) -> tuple[str, list[Any]]:
    """(code, details) of the API's error body (empty when it is not one)."""
    try:
        doc = orjson.loads(content)
        err = doc["error"]
        return str(err.get("code", "")), list(err.get("details") or [])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "", []


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.05, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _jittered(first_s: float, max_s: float) -> wait_base:
    """Before the n-th retry: first_s * 2**(n - 1), capped at max_s, times a random factor
    between 0.5 and 1.5 (tenacity's parts: a fixed half plus a random whole)."""
    return wait_exponential(multiplier=first_s / 2, max=max_s / 2) + wait_random_exponential(
        multiplier=first_s, max=max_s
    )


def _last_outcome(retry_state: RetryCallState) -> Any:
    """When the tries are used up: the last answer, or the last error raised."""
    assert retry_state.outcome is not None  # tenacity gives up only after a try
    return retry_state.outcome.result()


def parse_ts(text: str) -> int:
    """Epoch microseconds of the gateway's RFC 3339 timestamps (UTC, `Z`)."""
    return (datetime.fromisoformat(text) - _EPOCH) // _US


class GatewayApi:
    """Connections to one gateway: a shared pool for admin and reads, and `concurrency` lanes
    of one connection each for telemetry.

    A lane is a transport with one keep-alive connection, taken by one request at a time. With
    one shared pool, httpcore rescans every connection and waiting request whenever one
    finishes, and retries requests that lost a race for a connection: that, not the network,
    was most of the simulator's CPU per request at 16-64 requests in flight."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        *,
        concurrency: int = 64,
        timeout_s: float = 30.0,
    ) -> None:
        base_url = base_url.rstrip("/")
        timeout = httpx.Timeout(timeout_s, pool=None)
        self.client = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, transport=_transport(min(concurrency, 32))
        )
        self._lanes: asyncio.Queue[HttpLane] = asyncio.Queue()
        self._all_lanes = [
            HttpLane(base_url, timeout_s=timeout_s, tls=_tls()) for _ in range(concurrency)
        ]
        for lane in self._all_lanes:
            self._lanes.put_nowait(lane)
        self.admin = {"Authorization": f"Bearer {admin_token}"}

    async def aclose(self) -> None:
        await self.client.aclose()
        for lane in self._all_lanes:
            await lane.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """A request retried on connection errors (backoff with jitter) and 503 (after the
        gateway's Retry-After), MAX_ATTEMPTS tries in all; then the last answer or error."""
        backoff = _jittered(0.2, 6.4)

        def wait(retry_state: RetryCallState) -> float:
            outcome = retry_state.outcome
            if outcome is not None and not outcome.failed:
                return _retry_after(outcome.result())  # a 503
            return backoff(retry_state)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(httpx.TransportError)
            | retry_if_result(lambda r: r.status_code == 503),
            wait=wait,
            stop=stop_after_attempt(MAX_ATTEMPTS),
            retry_error_callback=_last_outcome,
        )
        response: httpx.Response = await retrying(self.client.request, method, url, **kwargs)
        return response

    # -- devices (admin) -------------------------------------------------------------------

    async def ensure_device(self, device_id: str) -> tuple[str, bool]:
        """Create the device, or take over an existing one by rotating its token: (its token,
        whether it was created now)."""
        r = await self._request(
            "POST",
            f"{API}/devices",
            json={"id": device_id, "name": "fieldgate simulator", "metadata": {"simulated": True}},
            headers=self.admin,
        )
        if r.status_code == 201:
            return str(r.json()["token"]), True
        code, _ = _error_code(r)
        if r.status_code == 409:
            r = await self._request("POST", f"{API}/devices/{device_id}/token", headers=self.admin)
            if r.status_code == 200:
                return str(r.json()["token"]), False
            code, _ = _error_code(r)
        raise GatewayError(
            f"cannot provision {device_id}: HTTP {r.status_code} {code} {r.text[:200]}"
        )

    async def check(self) -> None:
        """Fail early with a clear message when the gateway or the admin token is wrong."""
        try:
            r = await self.client.get(f"{API}/devices", params={"limit": 1}, headers=self.admin)
        except httpx.TransportError as exc:
            raise GatewayError(
                f"cannot reach the gateway at {self.client.base_url}: {exc!r}"
            ) from None
        if r.status_code in (401, 403):
            raise GatewayError(f"the admin token was refused (HTTP {r.status_code})")
        if r.status_code != 200:
            raise GatewayError(f"GET /api/v1/devices answered HTTP {r.status_code}")

    # -- telemetry ---------------------------------------------------------------------------

    async def post_telemetry(
        self, device_id: str, token: str, body: bytes, *, stopping: Callable[[], bool]
    ) -> Outcome:
        """POST one body; retried on 503 and connection errors (storage is idempotent).

        A loop of our own, not tenacity like `_request`: this is the simulator's hot path, and
        an AsyncRetrying per POST took its CPU from 2.9 s to 5.0 s for 40,000 requests to the
        sink (~73 to ~125 us a request; bench/README.md, "Library parts (issue 9)")."""
        path = f"{API}/devices/{device_id}/telemetry"
        headers = b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % (
            token.encode()
        )
        retries = 0
        while True:
            lane = await self._lanes.get()
            started = time.perf_counter()
            failure: LaneError | None = None
            try:
                status, head, content = await lane.post(path, headers, body)
            except LaneError as exc:
                failure = exc
            finally:
                self._lanes.put_nowait(lane)
            if failure is not None:
                if retries >= MAX_ATTEMPTS or stopping():
                    return Outcome(False, error=str(failure)[:80], retries=retries)
                retries += 1
                await asyncio.sleep(0.2 * 2 ** min(retries, 5) * random.uniform(0.5, 1.5))
                continue
            latency = time.perf_counter() - started
            if status == 200:
                doc = orjson.loads(content)
                return Outcome(
                    True,
                    accepted=int(doc["accepted"]),
                    duplicates=int(doc["duplicates"]),
                    rejected=Counter(str(x["code"]) for x in doc["rejected"]),
                    latency_s=latency,
                    retries=retries,
                )
            code, details = _error_of(content)
            if status == 422 and code == "no_valid_readings":
                return Outcome(
                    True,
                    rejected=Counter(str(x["code"]) for x in details),
                    latency_s=latency,
                    retries=retries,
                )
            if status == 400 and code == "invalid_json":
                return Outcome(
                    True, rejected=Counter({code: 1}), latency_s=latency, retries=retries
                )
            if status == 503 and not stopping() and retries < 100:
                retries += 1
                await asyncio.sleep(retry_after(head) * random.uniform(0.5, 1.5))
                continue
            return Outcome(
                False, error=f"HTTP {status} {code}".strip(), latency_s=latency, retries=retries
            )

    async def read_tally(self, device_id: str, metric: str, start_us: int, end_us: int) -> Tally:
        """Count and checksum of the stored readings with start <= ts < end (all pages)."""
        tally = Tally()
        params: dict[str, Any] = {
            "metric": metric,
            "start": _rfc3339(start_us),
            "end": _rfc3339(end_us),
            "limit": PAGE,
        }
        url = f"{API}/devices/{device_id}/telemetry"
        while True:
            r = await self._request("GET", url, params=params, headers=self.admin)
            if r.status_code == 404:
                return tally
            if r.status_code != 200:
                raise GatewayError(f"GET {url} answered HTTP {r.status_code}: {r.text[:200]}")
            doc = orjson.loads(r.content)
            points = doc["points"]
            tally.add([parse_ts(p["ts"]) for p in points], [float(p["value"]) for p in points])
            cursor = doc.get("next_cursor")
            if not cursor:
                return tally
            params["cursor"] = cursor

    async def read_counts(
        self, device_id: str, metric: str, start_us: int, end_us: int
    ) -> tuple[int, float]:
        """Count and sum of the stored readings with start <= ts < end, from the aggregate API
        (a few whole-day buckets: cheap, but the sum is compared with a tolerance)."""
        url = f"{API}/devices/{device_id}/telemetry/aggregate"
        params = {
            "metric": metric,
            "start": _rfc3339(start_us),
            "end": _rfc3339(end_us),
            "window": "1d",
            "agg": "count,sum",
        }
        r = await self._request("GET", url, params=params, headers=self.admin)
        if r.status_code == 404:
            return 0, 0.0
        if r.status_code != 200:
            raise GatewayError(f"GET {url} answered HTTP {r.status_code}: {r.text[:200]}")
        buckets = orjson.loads(r.content)["buckets"]
        count = sum(int(b.get("count") or 0) for b in buckets)
        total = sum(float(b.get("sum") or 0.0) for b in buckets)
        return count, total

    async def has_reading(self, device_id: str, metric: str, ts_us: int) -> bool:
        """Whether the reading at `ts_us` can be read back yet."""
        r = await self.client.get(
            f"{API}/devices/{device_id}/telemetry",
            params={
                "metric": metric,
                "start": _rfc3339(ts_us),
                "end": _rfc3339(ts_us + 1),
                "limit": 1,
            },
            headers=self.admin,
        )
        return r.status_code == 200 and bool(orjson.loads(r.content)["points"])

    async def rejected_since(self, since_us: int) -> list[dict[str, Any]] | None:
        """The gateway's dead letters (MQTT rejections, one per refused payload) received since
        `since_us`, all devices, following the pages (newest first); None when the gateway has
        no dead-letter endpoint."""
        url = f"{API}/rejected"
        params: dict[str, Any] = {"limit": PAGE}
        out: list[dict[str, Any]] = []
        while True:
            r = await self._request("GET", url, params=params, headers=self.admin)
            if r.status_code == 404:
                return None
            if r.status_code != 200:
                raise GatewayError(f"GET {url} answered HTTP {r.status_code}: {r.text[:200]}")
            doc = orjson.loads(r.content)
            if not isinstance(doc, dict) or not isinstance(doc.get("rejected"), list):
                return None  # not a fieldgate dead-letter list (e.g. simulator.sink)
            for letter in doc["rejected"]:
                if parse_ts(letter["received_at"]) < since_us:
                    return out
                out.append(letter)
            cursor = doc.get("next_cursor")
            if not cursor:
                return out
            params["cursor"] = cursor


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for all connections (each costs ~0.1 s of CPU to make)."""
    return ssl.create_default_context()


def _transport(connections: int) -> httpx.AsyncHTTPTransport:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # httpx writes a request's head and body separately: without TCP_NODELAY, Nagle may hold
    # the body until the head is acknowledged, and a delayed ACK makes that ~40 ms.
    return httpx.AsyncHTTPTransport(
        verify=_tls(),
        limits=limits,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


def _rfc3339(us: int) -> str:
    sec, frac = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:06d}Z"
