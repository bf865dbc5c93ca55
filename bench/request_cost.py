"""What one one-reading post costs the gateway's process, in CPU, without an HTTP server: the
app's own share of issue 11's yardstick, steadier than requests per second on a shared machine.

The app (`create_app`, lifespan and all, on a fresh SQLite file or a throwaway PostgreSQL
database) is called as ASGI by `--clients` concurrent callers, each posting
`{"values": {"t": 21.5}}` with its device's token (`--devices` devices, the callers spread over
them) until `--requests` are answered; every answer must be 200. It prints the process's CPU
time per request (the event loop and SQLite's thread together) with the telemetry lane and
with FastAPI's routing (`create_app(telemetry_lane=False)`), and their ratio; `--runs` repeats
(medians). The server's own part (uvicorn's HTTP parsing and writing) is not in these figures:
bench/requests.py measures the whole.

    .venv/bin/python bench/request_cost.py                     # both databases, 3 runs
    .venv/bin/python bench/request_cost.py --databases sqlite --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import rig

sys.path.insert(0, str(rig.ROOT))

from gateway.app import create_app
from gateway.settings import Settings

BODY = b'{"values": {"t": 21.5}}'


async def cost(url: str, *, lane: bool, args: argparse.Namespace) -> float:
    """CPU microseconds per request."""
    admin = secrets.token_urlsafe(24)
    settings = Settings(
        _env_file=None,
        database_url=url,
        admin_token=admin,
        mqtt_url="",
        maintenance_interval_s=0,
    )
    app = create_app(settings, telemetry_lane=lane)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg") as client:
            tokens = []
            for i in range(args.devices):
                r = await client.post(
                    "/api/v1/devices",
                    json={"id": f"d{i:03}"},
                    headers={"Authorization": f"Bearer {admin}"},
                )
                r.raise_for_status()
                tokens.append(r.json()["token"])
        statuses: dict[int, int] = {}

        async def caller(k: int) -> None:
            device = k % args.devices
            path = f"/api/v1/devices/d{device:03}/telemetry"
            headers = [
                (b"host", b"fg"),
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {tokens[device]}".encode()),
                (b"content-length", str(len(BODY)).encode()),
            ]
            for _ in range(args.requests // args.clients):
                await app(scope(path, headers, k), receive_once(), count_status(statuses))

        started = time.process_time()
        await asyncio.gather(*(caller(k) for k in range(args.clients)))
        took = time.process_time() - started
    n = sum(statuses.values())
    if set(statuses) != {200}:
        raise SystemExit(f"answers other than 200: {statuses}")
    return took / n * 1e6


def scope(path: str, headers: list[tuple[bytes, bytes]], k: int) -> dict[str, Any]:
    # As uvicorn makes it; `fieldgate serve`'s server also marks a body that arrived whole.
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000 + k),
        "server": ("127.0.0.1", 8000),
        "state": {},
        "fieldgate.body_received": True,
    }


def receive_once() -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()  # http.disconnect never comes: the caller stays
        raise AssertionError

    return receive


def count_status(statuses: dict[int, int]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    return send


async def one(kind: str, lane: bool, args: argparse.Namespace, workdir: Path) -> float:
    if kind == "sqlite":
        return await cost(f"sqlite://{workdir / f'{lane}.db'}", lane=lane, args=args)
    pg = rig.Postgres(rig.PG_ADMIN_DSN)
    name, url = await pg.create()
    try:
        return await cost(url, lane=lane, args=args)
    finally:
        await pg.drop(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--databases", type=lambda t: t.split(","), default=["sqlite", "postgres"])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    figures: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-cost-") as tmp:
        for n in range(args.runs):
            for kind in args.databases:
                for lane in (True, False):
                    us = asyncio.run(one(kind, lane, args, Path(tmp) / f"{n}"))
                    figures.setdefault((kind, lane), []).append(us)
                    how = "lane" if lane else "FastAPI route"
                    print(
                        f"run {n + 1}: {kind:<8} {how:<14} {us:6.1f} us CPU a request", flush=True
                    )
    print(f"\nmedians of {args.runs} run(s), {args.devices} device(s), {args.clients} callers")
    for kind in args.databases:
        by_lane = statistics.median(figures[(kind, True)])
        route = statistics.median(figures[(kind, False)])
        ratio = by_lane / route
        print(f"  {kind:<8} lane {by_lane:6.1f} us  route {route:6.1f} us  lane/route {ratio:.2f}")


if __name__ == "__main__":
    main()
