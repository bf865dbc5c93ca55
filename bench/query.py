"""Aggregate read latency of a real `fieldgate serve`, next to the same SQL run on its database.

For each database (SQLite, PostgreSQL):

1. start `fieldgate serve` as a subprocess on a free 127.0.0.1 port, on a fresh SQLite file or a
   fresh throwaway PostgreSQL database (dropped afterwards);
2. create 100 devices through the API and post one reading per device (so the gateway creates
   the series rows), then delete those readings and load the data set directly with the raw
   driver into `reading`, under the series ids the gateway created:
   - device `q000`: `--days` days (default 30) at 1 reading/s of `temperature` (2.59M readings);
   - devices `q001`..`q099`: the last 24 h at 1 reading/10 s of `temperature` (8,640 each);
   PostgreSQL then gets `VACUUM ANALYZE reading` (what autovacuum does soon after a bulk load);
3. for each query: `--warmup` untimed rounds, then `--runs` rounds of one API request
   (httpx.Client, keep-alive; the full answer read) followed by the same SQL run directly on the
   database (the exact text from `gateway.store.aggregate.build_sql` with the window the API
   chooses, same parameters; sqlite3 / asyncpg `fetch`, every row fetched); medians reported,
   with the ratio median API / median SQL.

The queries end at the last whole hour, where the data ends: (a) q000, 24h at 1m; (b) q000, 30d
at 1h; (c) q000, 30d window=auto; (d) the fleet (all 100 devices), 24h at 15m; each with
agg=avg,min,max,count; then (a) and (b) again with agg=first,last,stddev. Only 127.0.0.1 is
contacted; every wait has a deadline.

    .venv/bin/python bench/query.py --db both --runs 15
    .venv/bin/python bench/query.py --db sqlite --days 2 --runs 3     # a quick smoke run

`--console` (PostgreSQL) times instead the requests the operator console (issue 14) makes when
its device page (a device with 30 days at 1 Hz of two metrics) and its devices page (10,000
devices: first page, searches, a later page) open, before and after `fieldgate maintain`, then
a page of 100 devices that each have 30 days at 1 Hz (bench/README.md, "Console page loads"):

    .venv/bin/python bench/query.py --console --db postgres --runs 7 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.aggregation import AggregateQuery  # noqa: E402
from gateway.store.aggregate import build_sql  # noqa: E402
from gateway.store.database import Dialect, tortoise_config  # noqa: E402
from gateway.store.raw_sql import placeholders  # noqa: E402
from gateway.timespec import format_ts  # noqa: E402

HOST = "127.0.0.1"
FIELDGATE = Path(sys.executable).parent / "fieldgate"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgres://postgres@127.0.0.1:5432/{db}"
METRIC = "temperature"
DEVICES = 100
FLEET_STEP_S = 10
HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
# The data ends at the last whole hour (an hour ago, so ingest's future-skew check is irrelevant).
END_US = (int(time.time()) * 1_000_000 // HOUR_US - 1) * HOUR_US


def device_id(i: int) -> str:
    return f"q{i:03d}"


@dataclass(frozen=True)
class Case:
    name: str
    fleet: bool
    span_us: int
    window: str
    agg: str


def cases(days: int) -> list[Case]:
    basic = "avg,min,max,count"
    edge = "first,last,stddev"
    return [
        Case("a  24h @1m", False, DAY_US, "1m", basic),
        Case(f"b  {days}d @1h", False, days * DAY_US, "1h", basic),
        Case(f"c  {days}d @auto", False, days * DAY_US, "auto", basic),
        Case("d  fleet 24h @15m", True, DAY_US, "15m", basic),
        Case("a' 24h @1m", False, DAY_US, "1m", edge),
        Case(f"b' {days}d @1h", False, days * DAY_US, "1h", edge),
    ]


# ---------------------------------------------------------------------------------------------
# The data set.


def device0_rows(sid: int, days: int, day: int) -> Iterator[tuple[int, int, float]]:
    """Day `day` (0 = oldest) of q000: 1 reading/s, a daily sine with noise."""
    rng = random.Random(day)
    first_s = (END_US - (days - day) * DAY_US) // 1_000_000
    for s in range(first_s, first_s + 86_400):
        yield (sid, s * 1_000_000, 20.0 + 5.0 * math.sin(s * 2 * math.pi / 86_400) + rng.random())


def fleet_rows(sid: int, seed: int) -> Iterator[tuple[int, int, float]]:
    """The last 24 h of one of q001..q099: 1 reading / 10 s."""
    rng = random.Random(1_000 + seed)
    first_s = (END_US - DAY_US) // 1_000_000
    for s in range(first_s, first_s + 86_400, FLEET_STEP_S):
        yield (sid, s * 1_000_000, 15.0 + seed / 10 + 3.0 * rng.random())


def load_sqlite(path: Path, ids: dict[str, int], days: int) -> int:
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("DELETE FROM reading")
        n = 0
        sid0 = ids[device_id(0)]
        for day in range(days):
            db.executemany("INSERT INTO reading VALUES (?, ?, ?)", device0_rows(sid0, days, day))
            n += 86_400
        for i in range(1, DEVICES):
            db.executemany("INSERT INTO reading VALUES (?, ?, ?)", fleet_rows(ids[device_id(i)], i))
            n += 86_400 // FLEET_STEP_S
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n
    finally:
        db.close()


async def load_postgres(dsn: str, ids: dict[str, int], days: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM reading")
        n = 0
        cols = ["series_id", "ts", "value"]
        sid0 = ids[device_id(0)]
        for day in range(days):
            await conn.copy_records_to_table(
                "reading", records=list(device0_rows(sid0, days, day)), columns=cols
            )
            n += 86_400
        for i in range(1, DEVICES):
            await conn.copy_records_to_table(
                "reading", records=list(fleet_rows(ids[device_id(i)], i)), columns=cols
            )
            n += 86_400 // FLEET_STEP_S
        await conn.execute("VACUUM ANALYZE reading")
        return n
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# The gateway under test.


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Gateway:
    def __init__(self, database_url: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self.log = workdir / "serve.log"
        env = {
            **os.environ,
            "FIELDGATE_DATABASE_URL": database_url,
            "FIELDGATE_ADMIN_TOKEN": self.token,
            "FIELDGATE_MQTT_URL": "",
        }
        cmd = [str(FIELDGATE), "serve", "--host", HOST, "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fieldgate serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("fieldgate serve did not answer /healthz within 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def provision(client: httpx.Client) -> None:
    """100 devices, each with one reading of METRIC (so the gateway creates its series)."""
    for i in range(DEVICES):
        r = client.post("/api/v1/devices", json={"id": device_id(i)})
        r.raise_for_status()
        token = r.json()["token"]
        r = client.post(
            f"/api/v1/devices/{device_id(i)}/telemetry",
            json={"ts": END_US // 1000 - 1, "values": {METRIC: 0.0}},
            headers={"Authorization": f"Bearer {token}"},
        )
        r.raise_for_status()


# ---------------------------------------------------------------------------------------------
# Measurement.


class Direct:
    """The same SQL, run by the benchmark on its own connection to the database."""

    def __init__(self, dialect: Dialect, target: str) -> None:
        self.dialect = dialect
        self.loop = asyncio.new_event_loop()
        if dialect is Dialect.SQLITE:
            self.db = sqlite3.connect(target)
            for pragma in ("journal_mode=WAL", "journal_size_limit=16384", "foreign_keys=ON"):
                self.db.execute(f"PRAGMA {pragma}")
        else:
            # The session settings the gateway uses (gateway/store/database.py: jit off).
            settings = tortoise_config(target)["connections"]["default"]["credentials"]
            self.pg = self.loop.run_until_complete(
                asyncpg.connect(target, server_settings=settings["server_settings"])
            )

    def fetch(self, sql: str, params: list[int]) -> list[Any]:
        if self.dialect is Dialect.SQLITE:
            return self.db.execute(sql, params).fetchall()
        query = placeholders(Dialect.POSTGRES, sql)
        return list(self.loop.run_until_complete(self.pg.fetch(query, *params)))

    def explain(self, sql: str, params: list[int]) -> str:
        if self.dialect is Dialect.SQLITE:
            rows = self.db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            return "\n".join(f"  {r[3]}" for r in rows)
        query = "EXPLAIN (ANALYZE, BUFFERS) " + placeholders(Dialect.POSTGRES, sql)
        rows = self.loop.run_until_complete(self.pg.fetch(query, *params))
        return "\n".join(f"  {r[0]}" for r in rows)

    def ids(self) -> dict[str, int]:
        rows = self.fetch("SELECT device_id, id FROM series WHERE metric = 'temperature'", [])
        return {str(d): int(i) for d, i in rows}

    def close(self) -> None:
        if self.dialect is Dialect.SQLITE:
            self.db.close()
        else:
            self.loop.run_until_complete(self.pg.close())
        self.loop.close()


@dataclass
class Result:
    case: Case
    window: str
    buckets: int
    api_ms: float
    sql_ms: float
    packed_ms: float | None = None  # the API again once `fieldgate maintain` has packed
    answer: Any = None

    @property
    def ratio(self) -> float:
        return self.api_ms / self.sql_ms


def measure(
    case: Case, client: httpx.Client, direct: Direct, ids: dict[str, int], args: argparse.Namespace
) -> Result:
    start_us, end_us = END_US - case.span_us, END_US
    params: dict[str, Any] = {
        "metric": METRIC,
        "start": format_ts(start_us),
        "end": format_ts(end_us),
        "window": case.window,
        "agg": case.agg,
    }
    q = AggregateQuery.parse(
        metrics=[METRIC],
        start=params["start"],
        end=params["end"],
        window=case.window,
        agg=case.agg,
        fill="none",
        tz=None,
        now_us=END_US,
    )
    if case.fleet:
        path = "/api/v1/telemetry/aggregate"
        series = [ids[d] for d in sorted(ids)]
    else:
        path = f"/api/v1/devices/{device_id(0)}/telemetry/aggregate"
        series = [ids[device_id(0)]]
    sql = build_sql(len(series), set(q.aggs), window_us=q.window_us, bounds=())
    values = [*series, q.start_us, q.end_us]
    if args.explain:
        print(f"--- {case.name} ({case.agg}): plan\n{direct.explain(sql, values)}", flush=True)
    api: list[float] = []
    direct_ms: list[float] = []
    buckets = rows = 0
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        r = client.get(path, params=params)
        t1 = time.perf_counter()
        r.raise_for_status()
        found = direct.fetch(sql, values)
        t2 = time.perf_counter()
        if i == 0:
            body = r.json()
            groups = body.get("series", [body])
            buckets = sum(len(s["buckets"]) for s in groups)
            rows = len(found)
            if buckets != rows:
                print(f"!! {case.name}: the API answered {buckets} buckets, the SQL {rows} rows")
        if i >= args.warmup:
            api.append((t1 - t0) * 1000)
            direct_ms.append((t2 - t1) * 1000)
    return Result(
        case,
        body["window"],
        buckets,
        statistics.median(api),
        statistics.median(direct_ms),
        answer=body,
    )


def measure_packed(result: Result, client: httpx.Client, args: argparse.Namespace) -> None:
    """The same API request after packing: its median, and the answer checked against the one
    from unpacked rows (counts, min, max, first, last equal; avg and stddev within 1e-9)."""
    case = result.case
    path = (
        "/api/v1/telemetry/aggregate"
        if case.fleet
        else f"/api/v1/devices/{device_id(0)}/telemetry/aggregate"
    )
    params = {
        "metric": METRIC,
        "start": format_ts(END_US - case.span_us),
        "end": format_ts(END_US),
        "window": case.window,
        "agg": case.agg,
    }
    times: list[float] = []
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        r = client.get(path, params=params)
        t1 = time.perf_counter()
        r.raise_for_status()
        if i == 0:
            _same_answer(result.answer, r.json(), case.name)
        if i >= args.warmup:
            times.append((t1 - t0) * 1000)
    result.packed_ms = statistics.median(times)


def _same_answer(raw: Any, packed: Any, name: str) -> None:
    raw_series, packed_series = raw.get("series", [raw]), packed.get("series", [packed])
    if len(raw_series) != len(packed_series):
        raise SystemExit(f"!! {name}: {len(raw_series)} series raw, {len(packed_series)} packed")
    for s, p in zip(raw_series, packed_series, strict=True):
        if len(s["buckets"]) != len(p["buckets"]):
            raise SystemExit(
                f"!! {name}: {len(s['buckets'])} buckets raw, {len(p['buckets'])} packed"
            )
        for a, b in zip(s["buckets"], p["buckets"], strict=True):
            for key, value in a.items():
                other = b[key]
                same = (
                    math.isclose(value, other, rel_tol=1e-9, abs_tol=1e-9)
                    if isinstance(value, float) and isinstance(other, float)
                    else value == other
                )
                if not same:
                    raise SystemExit(f"!! {name} {a['start']} {key}: raw {value}, packed {other}")


def run_maintain(url: str, token: str) -> str:
    """`fieldgate maintain` on the database (everything before the last hour is packed)."""
    env = {
        **os.environ,
        "FIELDGATE_DATABASE_URL": url,
        "FIELDGATE_ADMIN_TOKEN": token,
        "FIELDGATE_MQTT_URL": "",
    }
    t0 = time.monotonic()
    done = subprocess.run(
        [str(FIELDGATE), "maintain", "--json"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode:
        done = subprocess.run(
            [str(FIELDGATE), "maintain"], env=env, cwd=ROOT, capture_output=True, text=True
        )
    if done.returncode:
        raise RuntimeError(f"fieldgate maintain exited {done.returncode}: {done.stderr[-2000:]}")
    return f"maintain took {time.monotonic() - t0:.1f} s"


def run_database(kind: str, args: argparse.Namespace) -> list[Result]:
    workdir = Path(tempfile.mkdtemp(prefix="fieldgate-bench-query-"))
    pg_db = f"fieldgate_bench_query_{secrets.token_hex(4)}"
    if kind == "sqlite":
        path = workdir / "fieldgate.db"
        url, dialect, target = f"sqlite://{path}", Dialect.SQLITE, str(path)
    else:
        url, dialect = PG_URL.format(db=pg_db), Dialect.POSTGRES
        target = url.replace("postgres://", "postgresql://")
        asyncio.run(_pg_admin(f'CREATE DATABASE "{pg_db}"'))
    gateway: Gateway | None = None
    try:
        t0 = time.monotonic()
        gateway = Gateway(url, workdir)
        headers = {"Authorization": f"Bearer {gateway.token}"}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as client:
            provision(client)
            direct = Direct(dialect, target)
            try:
                ids = direct.ids()
                if kind == "sqlite":
                    n = load_sqlite(Path(target), ids, args.days)
                else:
                    n = asyncio.run(load_postgres(target, ids, args.days))
                print(
                    f"[{kind}] {len(ids)} devices, {n:,} readings loaded"
                    f" in {time.monotonic() - t0:.0f} s",
                    flush=True,
                )
                results = []
                chosen = [c for c in cases(args.days) if c.name.split()[0] in args.queries]
                for case in chosen if args.runs else []:
                    res = measure(case, client, direct, ids, args)
                    results.append(res)
                    print(f"[{kind}] {_row(res)}", flush=True)
                if args.packed and args.runs:
                    print(f"[{kind}] {run_maintain(url, gateway.token)}", flush=True)
                    for res in results:
                        measure_packed(res, client, args)
                        print(f"[{kind}] {_row(res)}", flush=True)
                return results
            finally:
                direct.close()
    finally:
        if gateway is not None:
            gateway.stop()
        if args.keep:
            print(f"[{kind}] kept: {url}", flush=True)
        else:
            if kind == "postgres":
                asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
            for f in sorted(workdir.iterdir()):
                f.unlink()
            workdir.rmdir()


async def _pg_admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# The console's page loads (issue 14): `--console`, PostgreSQL.

CONSOLE_METRICS = ("temperature", "humidity")
HEAVY = "c000"  # the device page's device: 30 days at 1 reading/s of each metric
FLEET = 10_000  # the devices page: f00000.. with a reading every FLEET_STEP_CONSOLE_S for 48 h
FLEET_STEP_CONSOLE_S = 300
LETTERS_HEAVY = 2_000  # dead letters of c000, over 30 days
LETTERS_OTHERS = 50_000  # dead letters of fleet devices and of unknown ones, over 30 days


def fleet_id(i: int) -> str:
    return f"f{i:05d}"


def fleet_name(i: int) -> str:
    return f"Pump {i} at site {i % 50}"


def console_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, path, params) of what the console asks when the device page opens."""
    base = f"/api/v1/devices/{HEAVY}"
    out: list[tuple[str, str, dict[str, Any]]] = [
        ("device", base, {}),
        ("latest", base + "/telemetry/latest", {}),
    ]
    for span in ("-24h", "-30d"):
        for metric in CONSOLE_METRICS:
            params = {"metric": metric, "start": span, "window": "auto", "agg": "avg,min,max"}
            out.append((f"aggregate {metric} {span}", base + "/telemetry/aggregate", params))
    out.append(("rejected", "/api/v1/rejected", {"device": HEAVY, "limit": 50}))
    return out


def devices_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """What the devices page asks: the first page, searches, a later page."""
    return [
        ("devices first page (50)", "/api/v1/devices", {"limit": 50}),
        ("devices q=site 7 (50)", "/api/v1/devices", {"limit": 50, "q": "site 7"}),
        ("devices q=f0999 (50)", "/api/v1/devices", {"limit": 50, "q": "f0999"}),
        ("devices q=no match (50)", "/api/v1/devices", {"limit": 50, "q": "no such device"}),
        (
            "devices later page (50)",
            "/api/v1/devices",
            {"limit": 50, "cursor": fleet_id(FLEET // 2)},
        ),
    ]


def heavy_rows(sid: int, metric: int, day: int, end_s: int, days: int) -> list[Any]:
    """Day `day` (0 = oldest) of one of c000's metrics: 1 reading/s, a daily sine with noise."""
    rng = random.Random(day * 10 + metric)
    first_s = end_s - (days - day) * 86_400
    base = 20.0 if metric == 0 else 50.0
    return [
        (
            sid,
            t * 1_000_000,
            round(base + 5.0 * math.sin(t * 2 * math.pi / 86_400) + rng.random(), 2),
        )
        for t in range(first_s, first_s + 86_400)
    ]


async def load_console(dsn: str, heavy_ids: dict[str, int], end_s: int, days: int) -> int:
    """c000's history, the fleet (devices, series, readings) and the dead letters, by COPY."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM reading")
        n = 0
        cols = ["series_id", "ts", "value"]
        for k, metric in enumerate(CONSOLE_METRICS):
            for day in range(days):
                rows = heavy_rows(heavy_ids[metric], k, day, end_s, days)
                await conn.copy_records_to_table("reading", records=rows, columns=cols)
                n += len(rows)
        now = datetime.now(UTC)
        await conn.copy_records_to_table(
            "device",
            records=[
                (fleet_id(i), fleet_name(i), "{}", True, now, now, end_s * 1_000_000, None)
                for i in range(FLEET)
            ],
            columns=[
                "id", "name", "metadata", "enabled", "created_at", "updated_at", "last_seen_us",
                "retention_days",
            ],
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO series (device_id, metric) SELECT id, 'temperature' FROM device"
            " WHERE id LIKE 'f%' ORDER BY id"
        )
        fleet_sids = await conn.fetch("SELECT id FROM series WHERE device_id LIKE 'f%'")
        per = 2 * 86_400 // FLEET_STEP_CONSOLE_S
        first_s = end_s - 2 * 86_400
        rng = random.Random(7)
        for i in range(0, len(fleet_sids), 500):
            rows = [
                (int(r[0]), (first_s + k * FLEET_STEP_CONSOLE_S) * 1_000_000, rng.random() * 30)
                for r in fleet_sids[i : i + 500]
                for k in range(1, per + 1)
            ]
            await conn.copy_records_to_table("reading", records=rows, columns=cols)
            n += len(rows)
        letters = []
        for j in range(LETTERS_HEAVY + LETTERS_OTHERS):
            device = HEAVY if j < LETTERS_HEAVY else fleet_id(rng.randrange(FLEET + 500))
            received = end_s * 1_000_000 - rng.randrange(days * 86_400_000_000)
            letters.append(
                (received, "mqtt", device, f"devices/{device}/telemetry", "invalid_json",
                 "the payload is not JSON", "[]", 12, b"not json {{{")
            )  # fmt: skip
        letters.sort()
        await conn.copy_records_to_table(
            "dead_letter",
            records=letters,
            columns=[
                "received_us", "transport", "device_id", "topic", "reason", "message", "details",
                "payload_bytes", "payload",
            ],
        )  # fmt: skip
        await conn.execute("VACUUM ANALYZE")
        return n
    finally:
        await conn.close()


async def copy_heavy(dsn: str, copies: int) -> float:
    """c001..c0NN as copies of c000 as it is stored (its chunks and its unpacked rows, under
    new series): a page of `copies + 1` devices with 30 days at 1 Hz each. Seconds it took."""
    t0 = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        for i in range(1, copies + 1):
            device = f"c{i:03d}"
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO device SELECT $1, name, metadata, enabled, created_at,"
                    " updated_at, last_seen_us, retention_days FROM device WHERE id = $2",
                    device,
                    HEAVY,
                )
                for metric in CONSOLE_METRICS:
                    old = await conn.fetchval(
                        "SELECT id FROM series WHERE device_id = $1 AND metric = $2", HEAVY, metric
                    )
                    new = await conn.fetchval(
                        "INSERT INTO series (device_id, metric, packed_until_us, unit) SELECT"
                        " $1, metric, packed_until_us, unit FROM series WHERE id = $2 RETURNING id",
                        device,
                        old,
                    )
                    await conn.execute(
                        "INSERT INTO chunk SELECT $1, first_ts, last_ts, n, s, lo, hi, v0, v1,"
                        " mean, mean_err, m2, hours, minutes, data FROM chunk WHERE series_id = $2",
                        new,
                        old,
                    )
                    await conn.execute(
                        "INSERT INTO reading SELECT $1, ts, value FROM reading"
                        " WHERE series_id = $2",
                        new,
                        old,
                    )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.monotonic() - t0


def time_requests(
    client: httpx.Client, requests: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace
) -> tuple[dict[str, float], float, dict[str, Any]]:
    """Each request's median ms over `--runs` rounds (after `--warmup`), the median of the
    rounds' totals, and each request's answer (the first round's)."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in requests}
    totals: list[float] = []
    answers: dict[str, Any] = {}
    for i in range(args.warmup + args.runs):
        total = 0.0
        for label, path, params in requests:
            t0 = time.perf_counter()
            r = client.get(path, params=params)
            ms = (time.perf_counter() - t0) * 1000
            r.raise_for_status()
            answers.setdefault(label, r.json())
            total += ms
            if i >= args.warmup:
                times[label].append(ms)
        if i >= args.warmup:
            totals.append(total)
    return {k: statistics.median(v) for k, v in times.items()}, statistics.median(totals), answers


def _summary(label: str, answer: Any) -> str:
    """A few words of what an answer held (to check it and to quote)."""
    if "buckets" in answer:
        return f"{len(answer['buckets'])} buckets at {answer['window']}"
    if "devices" in answer:
        devs = answer["devices"]
        r24 = sum(d["readings_24h"] for d in devs)
        return f"{len(devs)} devices, readings_24h summed {r24:,}"
    if "rejected" in answer:
        return f"{len(answer['rejected'])} letters"
    if "readings_24h" in answer:
        return (
            f"readings {answer['readings']:,}, readings_24h {answer['readings_24h']:,},"
            f" rejected_24h {answer['rejected_24h']:,}"
        )
    return f"{len(answer.get('metrics', answer))} metrics"


def print_console(phase: str, medians: dict[str, float], total: float, answers: Any) -> None:
    print(f"\n[console] {phase} (medians of the runs; ms)", flush=True)
    for label, ms in medians.items():
        print(f"  {label:<32} {ms:>8.1f}   {_summary(label, answers[label])}", flush=True)
    print(f"  {'total (median of the rounds)':<32} {total:>8.1f}", flush=True)


def run_console(args: argparse.Namespace) -> None:
    """The device page and the devices page, before and after `fieldgate maintain`, then with
    a page of 100 devices of 30 days at 1 Hz each (`--heavy-copies`)."""
    workdir = Path(tempfile.mkdtemp(prefix="fieldgate-bench-console-"))
    pg_db = f"fieldgate_bench_console_{secrets.token_hex(4)}"
    url = PG_URL.format(db=pg_db)
    target = url.replace("postgres://", "postgresql://")
    asyncio.run(_pg_admin(f'CREATE DATABASE "{pg_db}"'))
    gateway: Gateway | None = None
    end_s = int(time.time()) - 1  # the data ends now: the last hours stay rows after packing
    try:
        t0 = time.monotonic()
        gateway = Gateway(url, workdir)
        headers = {"Authorization": f"Bearer {gateway.token}"}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=300) as client:
            r = client.post("/api/v1/devices", json={"id": HEAVY, "name": "Boiler room"})
            r.raise_for_status()
            r = client.post(
                f"/api/v1/devices/{HEAVY}/telemetry",
                json={"ts": end_s * 1000, "values": dict.fromkeys(CONSOLE_METRICS, 0.0)},
                headers={"Authorization": f"Bearer {r.json()['token']}"},
            )
            r.raise_for_status()
            heavy_ids = asyncio.run(_series_of(target, HEAVY))
            n = asyncio.run(load_console(target, heavy_ids, end_s, args.days))
            print(
                f"[console] {HEAVY} ({args.days} d at 1 Hz x {len(CONSOLE_METRICS)} metrics),"
                f" {FLEET:,} fleet devices, {n:,} readings,"
                f" {LETTERS_HEAVY + LETTERS_OTHERS:,} dead letters loaded"
                f" in {time.monotonic() - t0:.0f} s",
                flush=True,
            )
            page = console_requests() + devices_requests()
            if not args.console_skip_rows:
                print_console("rows: nothing packed", *time_requests(client, page, args))
            print(f"[console] {run_maintain(url, gateway.token)}", flush=True)
            print_console("after fieldgate maintain", *time_requests(client, page, args))
            if args.heavy_copies:
                took = asyncio.run(copy_heavy(target, args.heavy_copies))
                print(
                    f"[console] c001..c{args.heavy_copies:03d}: copies of {HEAVY} as stored"
                    f" ({took:.0f} s)",
                    flush=True,
                )
                heavy_pages = [
                    ("devices first page (50)", "/api/v1/devices", {"limit": 50}),
                    ("devices page of 100", "/api/v1/devices", {"limit": 100}),
                ]
                print_console(
                    f"{args.heavy_copies + 1} devices of {args.days} d at 1 Hz",
                    *time_requests(client, heavy_pages, args),
                )
    finally:
        if gateway is not None:
            gateway.stop()
        if args.keep:
            print(f"[console] kept: {url}", flush=True)
        else:
            asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
            for f in sorted(workdir.iterdir()):
                f.unlink()
            workdir.rmdir()


async def _series_of(dsn: str, device: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT metric, id FROM series WHERE device_id = $1", device)
        return {str(m): int(i) for m, i in rows}
    finally:
        await conn.close()


HEADER = (
    f"{'query':<18} {'agg':<18} {'window':>6} {'buckets':>7}"
    f" {'API ms':>8} {'SQL ms':>8} {'API/SQL':>7} {'packed':>8}"
)


def _row(r: Result) -> str:
    packed = f"{r.packed_ms:>8.1f}" if r.packed_ms is not None else f"{'-':>8}"
    return (
        f"{r.case.name:<18} {r.case.agg:<18} {r.window:>6} {r.buckets:>7}"
        f" {r.api_ms:>8.1f} {r.sql_ms:>8.1f} {r.ratio:>7.2f} {packed}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--runs", type=int, default=15, help="timed rounds per query (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds per query first")
    ap.add_argument("--days", type=int, default=30, help="history of the 1 reading/s device")
    ap.add_argument(
        "--queries",
        type=lambda text: text.split(","),
        default=["a", "b", "c", "d", "a'", "b'"],
        help="which queries, e.g. a,d (default: all)",
    )
    ap.add_argument("--explain", action="store_true", help="print each query's plan first")
    ap.add_argument(
        "--packed",
        action="store_true",
        help="then run `fieldgate maintain` (packs all but the last hour) and time the API again",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the SQLite file / PostgreSQL database afterwards"
    )
    ap.add_argument(
        "--console",
        action="store_true",
        help="instead: the console's page loads (issue 14), PostgreSQL only",
    )
    ap.add_argument(
        "--heavy-copies",
        type=int,
        default=99,
        help="--console: copies of the 30-day device for the page of heavy devices (0: none)",
    )
    ap.add_argument(
        "--console-skip-rows",
        action="store_true",
        help="--console: do not time the pages before `fieldgate maintain`",
    )
    args = ap.parse_args()
    if args.runs < 0 or args.days < 1:
        ap.error("--runs must be at least 0 (0: load only) and --days at least 1")
    if args.console:
        if args.db != "postgres":
            ap.error("--console runs on PostgreSQL: pass --db postgres")
        print(f"{os.cpu_count()} CPUs; {args.runs} runs after {args.warmup} warm-up", flush=True)
        run_console(args)
        return
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"{os.cpu_count()} CPUs; {args.runs} runs after {args.warmup} warm-up;"
        f" data ends {format_ts(END_US)}",
        flush=True,
    )
    all_results = {kind: run_database(kind, args) for kind in kinds}
    for kind, results in all_results.items():
        print(f"\n{kind} (medians of {args.runs})\n{HEADER}")
        for r in results:
            print(_row(r))


if __name__ == "__main__":
    main()
