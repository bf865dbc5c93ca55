"""HTTP ingest throughput of a real `fieldgate serve`, next to the raw insert rate of its database.

For each database (SQLite, PostgreSQL) and request size (readings per POST), one measurement:

1. start `fieldgate serve` as a subprocess on a free 127.0.0.1 port, on a fresh SQLite file or a
   fresh throwaway PostgreSQL database (dropped afterwards);
2. create one device per in-flight request slot, send one warm-up post per device (creates its
   series), then post `--readings` readings as batches of `--size` readings, with `--concurrency`
   requests in flight over keep-alive connections (httpx.AsyncClient) from `--clients` processes;
3. readings/s = readings accepted / (last answer - first send); the stored row count is checked
   in the database afterwards;
4. the raw rate: the same rows (same series ids, timestamps, order) into a fresh copy of the same
   schema with the fastest plain driver call that ignores duplicates, one commit per request-size
   chunk: sqlite3 `executemany(INSERT OR IGNORE ...)` with the pragmas Tortoise sets
   (journal_mode=WAL, default synchronous); asyncpg `INSERT ... SELECT unnest(...) ON CONFLICT DO
   NOTHING` and `COPY` into a temp table + `INSERT ... ON CONFLICT DO NOTHING` (the faster counts).

`--runs N` repeats everything N times and reports medians. Only 127.0.0.1 is contacted.
"writer busy" adds up the writer's commits in flight (2 on PostgreSQL: up to 200%).

    .venv/bin/python bench/ingest_http.py --db both --sizes 100,1000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import uvloop
from rig import PG_ADMIN_DSN, ROOT, Gateway, Postgres, RawConnection

# Timestamps start 30 days ago, one millisecond apart per message: far from the future-skew limit.
TS_START_MS = int(time.time() * 1000) - 30 * 86_400_000


# ---------------------------------------------------------------------------------------------
# The workload: which device posts which readings, shared by the HTTP load and the raw insert.


@dataclass(frozen=True)
class Workload:
    size: int  # readings per request
    metrics: int  # metrics per message
    devices: int
    requests: int  # timed requests (warm-up excluded)
    # json: the native telemetry POST; lp: line protocol to /api/v2/write; senml: the native
    # endpoint with the same readings as SenML packs (application/senml+json)
    fmt: str = "json"

    def path(self, device: int) -> str:
        if self.fmt == "lp":
            return "/api/v2/write?org=bench&bucket=bench&precision=ms"
        return f"/api/v1/devices/bench-{device}/telemetry"

    @property
    def content_type(self) -> str:
        return {
            "lp": "text/plain; charset=utf-8",
            "senml": "application/senml+json",
        }.get(self.fmt, "application/json")

    @property
    def messages_per_request(self) -> int:
        return self.size // self.metrics

    def metric_names(self) -> list[str]:
        return [f"m{i}" for i in range(self.metrics)]

    def first_ms(self, device: int, seq: int) -> int:
        """ts (epoch ms) of the first message of the `seq`-th request (0 = warm-up) of `device`."""
        return TS_START_MS + seq * self.messages_per_request

    def body(self, device: int, seq: int) -> bytes:
        first = self.first_ms(device, seq)
        names = self.metric_names()
        if self.fmt == "senml":  # the same readings as a pack: bt, then t relative to it
            records: list[dict[str, Any]] = [
                {"n": name, "t": (t - first) / 1000, "v": (t % 10_000) / 10 + i}
                for t in range(first, first + self.messages_per_request)
                for i, name in enumerate(names)
            ]
            records[0]["bt"] = first / 1000
            return orjson.dumps(records)
        messages = [
            {"ts": t, "values": {name: (t % 10_000) / 10 + i for i, name in enumerate(names)}}
            for t in range(first, first + self.messages_per_request)
        ]
        if self.fmt == "lp":  # the same readings; metric names are the field keys (gateway env)
            return "\n".join(
                f"bench,device=bench-{device} "
                + ",".join(f"{name}={(t % 10_000) / 10 + i!r}" for i, name in enumerate(names))
                + f" {t}"
                for t in range(first, first + self.messages_per_request)
            ).encode()
        return orjson.dumps(messages)

    def requests_of(self, device: int) -> int:
        """Timed requests of `device`: spread evenly, the first devices take the rest."""
        base, extra = divmod(self.requests, self.devices)
        return base + (device < extra)


# ---------------------------------------------------------------------------------------------
# The gateway under test.


def start_profiler(out_dir: str | None, pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """py-spy (not a dependency: `.venv/bin/pip install py-spy`) sampling the gateway, as a
    collapsed-stack file per measurement (`--py-spy DIR`)."""
    if out_dir is None:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / f"{name}-{int(time.time())}.txt"
    spy = subprocess.Popen(
        [
            *(str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)),
            *("--rate", "250", "--format", "raw", "--threads", "--gil", "-o", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return spy


async def writer_stats(gw: Gateway) -> dict[str, float]:
    """Sums and counts of the writer's histograms, from the gateway's /metrics."""
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30.0) as client:
        text = (await client.get("/metrics")).text
    stats: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("fieldgate_writer_") and name.endswith(("_sum", "_count")):
            stats[name.removeprefix("fieldgate_writer_")] = float(value)
    return stats


async def provision(gw: Gateway, workload: Workload) -> list[str]:
    """Create the devices (tokens in device order) and post each device's warm-up request."""
    admin = {"Authorization": f"Bearer {gw.admin_token}"}
    tokens: list[str] = []
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30.0) as client:
        for d in range(workload.devices):
            r = await client.post("/api/v1/devices", json={"id": f"bench-{d}"}, headers=admin)
            r.raise_for_status()
            tokens.append(r.json()["token"])
        for d, token in enumerate(tokens):
            r = await client.post(
                workload.path(d),
                content=workload.body(d, 0),
                headers={"Authorization": f"Bearer {token}", "Content-Type": workload.content_type},
            )
            r.raise_for_status()
            assert r.status_code == 204 or r.json()["accepted"] == workload.size, r.text
    return tokens


# ---------------------------------------------------------------------------------------------
# The load: client processes, each with its share of the devices and of the in-flight requests.


@dataclass
class LoadResult:
    started: float = float("inf")  # wall clock (time.time) of the first send
    finished: float = 0.0  # wall clock of the last answer
    accepted: int = 0
    duplicates: int = 0
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    cpu_s: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.started = min(self.started, other.started)
        self.finished = max(self.finished, other.finished)
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.latencies.extend(other.latencies)
        self.cpu_s += other.cpu_s


async def _load(
    base_url: str,
    client_kind: str,
    workload: Workload,
    devices: list[tuple[int, str]],
    start_at: float,
    limit_s: float,
) -> LoadResult:
    """Each device is one in-flight slot with its own keep-alive connection: it posts its
    requests one after the other."""
    result = LoadResult()
    deadline = start_at + limit_s
    limits = httpx.Limits(max_connections=len(devices), max_keepalive_connections=len(devices))
    host, port = base_url.removeprefix("http://").split(":")

    async def device_loop(client: httpx.AsyncClient, device: int, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": workload.content_type}
        path = workload.path(device)
        raw = RawConnection(host, int(port))
        seq = 1
        n = workload.requests_of(device)
        try:
            while seq <= n and time.time() < deadline:
                body = bodies[device][seq - 1]
                sent = time.perf_counter()
                if client_kind == "raw":
                    status, content = await raw.post(path, token, body, workload.content_type)
                else:
                    r = await client.post(path, content=body, headers=headers)
                    status, content = r.status_code, r.content
                result.statuses[status] += 1
                if status == 503:  # queue full: back off as Retry-After asks, then resend
                    await asyncio.sleep(0.05)
                    continue
                if status == 204:  # line protocol: every line stored (new or duplicate)
                    answer = {"accepted": workload.size, "duplicates": 0}
                elif status == 200:
                    answer = orjson.loads(content)
                else:
                    raise RuntimeError(f"HTTP {status}: {content[:300]!r}")
                result.latencies.append(time.perf_counter() - sent)
                result.accepted += answer["accepted"]
                result.duplicates += answer["duplicates"]
                result.requests += 1
                seq += 1
        finally:
            await raw.close()

    # The bodies are made before the clock starts: the client's CPU goes to HTTP only.
    bodies = {
        device: [workload.body(device, seq) for seq in range(1, workload.requests_of(device) + 1)]
        for device, _ in devices
    }
    cpu0 = time.process_time()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        result.started = time.time()
        async with asyncio.TaskGroup() as tasks:
            for device, token in devices:
                tasks.create_task(device_loop(client, device, token))
        result.finished = time.time()
    result.cpu_s = time.process_time() - cpu0
    return result


def _client_process(
    base_url: str,
    client_kind: str,
    workload: Workload,
    devices: list[tuple[int, str]],
    start_at: float,
    limit_s: float,
) -> LoadResult:
    uvloop.install()  # as uvicorn does on the server side: less client CPU per request
    return asyncio.run(_load(base_url, client_kind, workload, devices, start_at, limit_s))


def run_load(
    pool: concurrent.futures.ProcessPoolExecutor,
    clients: int,
    client_kind: str,
    base_url: str,
    workload: Workload,
    tokens: list[str],
    limit_s: float,
) -> LoadResult:
    start_at = time.time() + 1.0  # every client process is up and waiting by then
    shares = [list(enumerate(tokens))[c::clients] for c in range(clients)]
    futures = [
        pool.submit(_client_process, base_url, client_kind, workload, share, start_at, limit_s)
        for share in shares
    ]
    total = LoadResult()
    for f in futures:
        total.merge(f.result(timeout=limit_s + 120))
    return total


# ---------------------------------------------------------------------------------------------
# The databases: fresh ones, the stored count, and the raw insert rate.


_MIGRATE = """
import asyncio, sys
from gateway.store.database import migrate
asyncio.run(migrate(sys.argv[1]))
"""


def migrate(database_url: str, workdir: Path) -> None:
    """The gateway's own migrations on a fresh database (the schema the raw insert uses)."""
    # Not `fieldgate migrate`: on SQLite it does not exit (its aiosqlite thread is left open).
    subprocess.run(
        [sys.executable, "-c", _MIGRATE, database_url],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
        timeout=120,
    )


def raw_chunks(workload: Workload, series_ids: dict[tuple[int, str], int]) -> list[Any]:
    """The timed readings as (series_ids, ts_us, values) per request, in round-robin device order
    (the order concurrent devices reach the gateway)."""
    names = workload.metric_names()
    chunks = []
    most = max(workload.requests_of(d) for d in range(workload.devices))
    for seq in range(1, most + 1):
        for d in range(workload.devices):
            if seq > workload.requests_of(d):
                continue
            ids: list[int] = []
            tss: list[int] = []
            vals: list[float] = []
            first = workload.first_ms(d, seq)
            for t in range(first, first + workload.messages_per_request):
                for i, name in enumerate(names):
                    ids.append(series_ids[d, name])
                    tss.append(t * 1000)
                    vals.append((t % 10_000) / 10 + i)
            chunks.append((ids, tss, vals))
    return chunks


def fake_series_ids(workload: Workload) -> dict[tuple[int, str], int]:
    names = workload.metric_names()
    return {
        (d, name): 1 + d * workload.metrics + i
        for d in range(workload.devices)
        for i, name in enumerate(names)
    }


def sqlite_count(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT count(*) FROM reading").fetchone()[0])
    finally:
        con.close()


def raw_sqlite(path: Path, chunks: list[Any]) -> tuple[float, str]:
    """rows/s of executemany INSERT OR IGNORE, one commit per chunk; and the pragmas used."""
    rows = [list(zip(*chunk, strict=True)) for chunk in chunks]
    # Tortoise's SqliteClient: isolation_level=None, journal_mode=WAL, journal_size_limit=16384,
    # foreign_keys=ON, synchronous left at the library default.
    con = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "journal_size_limit=16384", "foreign_keys=ON"):
        con.execute(f"PRAGMA {pragma}")
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[
        con.execute("PRAGMA synchronous").fetchone()[0]
    ]
    sql = "INSERT OR IGNORE INTO reading (series_id, ts, value) VALUES (?, ?, ?)"
    total = 0
    started = time.perf_counter()
    for part in rows:
        con.execute("BEGIN")
        total += con.executemany(sql, part).rowcount
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    assert total == sum(len(p) for p in rows), (total, "rows inserted")
    return total / elapsed, f"journal_mode={mode} synchronous={sync}"


PG_UNNEST = (
    "INSERT INTO reading (series_id, ts, value)"
    " SELECT * FROM unnest($1::integer[], $2::bigint[], $3::double precision[])"
    " ON CONFLICT DO NOTHING"
)


async def raw_postgres(dsn: str, chunks: list[Any]) -> tuple[float, str]:
    """rows/s of the faster of unnest and COPY + INSERT ON CONFLICT, one commit per chunk."""
    n = sum(len(c[0]) for c in chunks)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(
            "CREATE TEMP TABLE reading_in (series_id integer, ts bigint, value double precision)"
            " ON COMMIT DELETE ROWS"
        )
        rates: dict[str, float] = {}

        await con.execute("TRUNCATE reading")
        started = time.perf_counter()
        total = 0
        for ids, tss, vals in chunks:
            status = await con.execute(PG_UNNEST, ids, tss, vals)
            total += int(status.rsplit(" ", 1)[1])
        rates["unnest"] = n / (time.perf_counter() - started)
        assert total == n, (total, n)

        records = [list(zip(*chunk, strict=True)) for chunk in chunks]
        await con.execute("TRUNCATE reading")
        started = time.perf_counter()
        total = 0
        for part in records:
            async with con.transaction():
                await con.copy_records_to_table("reading_in", records=part)
                status = await con.execute(
                    "INSERT INTO reading SELECT * FROM reading_in ON CONFLICT DO NOTHING"
                )
            total += int(status.rsplit(" ", 1)[1])
        rates["copy"] = n / (time.perf_counter() - started)
        assert total == n, (total, n)
    finally:
        await con.close()
    best = max(rates, key=rates.__getitem__)
    other = ", ".join(f"{k} {v / 1000:.0f}k" for k, v in rates.items())
    return rates[best], f"{best} ({other})"


# ---------------------------------------------------------------------------------------------
# One measurement, repeated runs, the table.


@dataclass
class Measurement:
    db: str
    size: int
    gateway_rate: float
    raw_rate: float
    raw_how: str
    raw_batch_rate: float  # the raw rate in commits of --raw-batch readings
    p50_ms: float
    p99_ms: float
    server_cpu: float  # CPU seconds per wall second (1.0 = one core busy)
    client_cpu: float
    retries: int
    commits_per_s: float
    readings_per_commit: float
    commit_busy: float  # share of the wall time the writer spent inserting and committing
    commit_us_per_reading: float  # writer time per committed reading

    @property
    def server_us_per_reading(self) -> float:
        """Gateway CPU per stored reading: steadier than the rate on a shared machine."""
        return 1e6 * self.server_cpu / self.gateway_rate

    @property
    def ratio(self) -> float:
        return self.gateway_rate / self.raw_rate

    @property
    def batch_ratio(self) -> float:
        return self.gateway_rate / self.raw_batch_rate


async def measure(
    db: str,
    workload: Workload,
    args: argparse.Namespace,
    pool: concurrent.futures.ProcessPoolExecutor,
) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-") as tmp:
        workdir = Path(tmp)
        pg = Postgres(args.pg_dsn)
        names: list[str] = []
        try:
            if db == "sqlite":
                url = f"sqlite://{workdir}/gateway.db"
                raw_url = ""
            else:
                name, url = await pg.create()
                names.append(name)
                raw_name, raw_url = await pg.create()
                names.append(raw_name)
            env = {
                # line protocol's metric names as the native body's: the field keys
                "FIELDGATE_LINE_PROTOCOL_METRIC": "{field}",
                **{k.upper(): v for k, v in (s.split("=", 1) for s in args.gateway_env)},
            }  # e.g. FIELDGATE_BATCH_SIZE=10000
            gw = Gateway(url, workdir, env)
            try:
                await gw.wait_ready()
                tokens = await provision(gw, workload)
                spy = start_profiler(args.py_spy, gw.proc.pid, f"{db}-{workload.size}")
                cpu0 = gw.cpu_seconds()
                before = await writer_stats(gw)
                load = run_load(
                    pool, args.clients, args.client, gw.base_url, workload, tokens, args.limit_s
                )
                server_cpu = gw.cpu_seconds() - cpu0
                after = await writer_stats(gw)
                commits = after["commit_seconds_count"] - before["commit_seconds_count"]
                commit_s = after["commit_seconds_sum"] - before["commit_seconds_sum"]
                batch = after["batch_readings_sum"] - before["batch_readings_sum"]
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
            finally:
                gw.stop()
            wall = load.finished - load.started
            expected = workload.size * (workload.devices + workload.requests)
            stored = sqlite_count(workdir / "gateway.db") if db == "sqlite" else await pg.count(url)
            if load.requests != workload.requests:
                print(f"  note: {load.requests}/{workload.requests} requests within --limit-s")
                expected = workload.size * (workload.devices + load.requests)
            if stored != expected or load.accepted != workload.size * load.requests:
                raise AssertionError(
                    f"{db}: stored {stored} rows, accepted {load.accepted}, expected {expected}"
                )

            # The raw rate in commits of one request, and in commits of the writer's batch size.
            chunks = raw_chunks(workload, fake_series_ids(workload))
            per = max(1, args.raw_batch // workload.size)
            big = [
                tuple(
                    list(chain.from_iterable(c[k] for c in chunks[i : i + per])) for k in range(3)
                )
                for i in range(0, len(chunks), per)
            ]
            raws = []
            for n, part in enumerate((chunks, big)):
                if db == "sqlite":
                    path = workdir / f"raw{n}.db"
                    migrate(f"sqlite://{path}", workdir)
                    raws.append(raw_sqlite(path, part))
                else:
                    if n == 0:
                        migrate(raw_url, workdir)
                    raws.append(await raw_postgres(raw_url, part))
        finally:
            for name in names:
                await pg.drop(name)
    lat = sorted(load.latencies)
    return Measurement(
        db=db if workload.fmt == "json" else f"{db}/{workload.fmt}",
        size=workload.size,
        gateway_rate=load.accepted / wall,
        raw_rate=raws[0][0],
        raw_how=raws[0][1],
        raw_batch_rate=raws[1][0],
        p50_ms=1000 * lat[len(lat) // 2],
        p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        server_cpu=server_cpu / wall,
        client_cpu=load.cpu_s / wall,
        retries=load.statuses.get(503, 0),
        commits_per_s=commits / wall,
        readings_per_commit=batch / max(commits, 1),
        commit_busy=commit_s / wall,
        commit_us_per_reading=1e6 * commit_s / max(batch, 1),
    )


def raw_methods(group: list[Measurement]) -> str:
    """SQLite: the pragmas; PostgreSQL: which way was faster, in how many runs."""
    if group[0].db == "sqlite":
        return group[0].raw_how
    wins = Counter(m.raw_how.split(" ", 1)[0] for m in group)
    return "fastest: " + ", ".join(f"{k} {n}/{len(group)}" for k, n in wins.most_common())


def print_table(rows: list[list[Measurement]], args: argparse.Namespace) -> None:
    med = statistics.median
    print()
    print(
        f"medians of {args.runs} run(s), {args.client} client x{args.clients} processes, "
        f"{args.concurrency} requests in flight; readings/s; CPU in cores (1.0 = one core)"
    )
    print(
        f"raw: the same rows by the plain driver, one commit per request ('raw'), "
        f"or per {args.raw_batch} readings ('raw/batch')"
    )
    header = (
        f"{'db':<12}{'size':>6}{'gateway':>10}{'raw':>10}{'ratio':>7}{'raw/batch':>11}{'ratio':>7}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'srv cpu':>8}{'us/rdg':>7}{'cli cpu':>8}{'503s':>5}"
        "  raw method"
    )
    print(header)
    print("-" * len(header))
    for group in rows:
        m = group[0]
        print(
            f"{m.db:<12}{m.size:>6}"
            f"{med(x.gateway_rate for x in group):>10,.0f}"
            f"{med(x.raw_rate for x in group):>10,.0f}"
            f"{med(x.ratio for x in group):>7.2f}"
            f"{med(x.raw_batch_rate for x in group):>11,.0f}"
            f"{med(x.batch_ratio for x in group):>7.2f}"
            f"{med(x.p50_ms for x in group):>8.1f}"
            f"{med(x.p99_ms for x in group):>8.1f}"
            f"{med(x.server_cpu for x in group):>8.2f}"
            f"{med(x.server_us_per_reading for x in group):>7.1f}"
            f"{med(x.client_cpu for x in group):>8.2f}"
            f"{sum(x.retries for x in group):>5}  {raw_methods(group)}"
        )
    for group in rows:
        ratios = " ".join(f"{x.ratio:.2f}" for x in group)
        batch = " ".join(f"{x.batch_ratio:.2f}" for x in group)
        print(f"  {group[0].db} {group[0].size}: ratio per run {ratios}; vs raw/batch {batch}")


async def main_async(args: argparse.Namespace) -> int:
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        if size % args.metrics:
            raise SystemExit(f"--sizes: {size} is not a multiple of --metrics {args.metrics}")
    results: dict[tuple[str, int, str], list[Measurement]] = {}
    formats = args.formats.split(",")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=ctx) as pool:
        for run in range(1, args.runs + 1):
            for db in dbs:
                for size, fmt in ((size, fmt) for size in sizes for fmt in formats):
                    workload = Workload(
                        size=size,
                        metrics=args.metrics,
                        devices=args.concurrency,
                        requests=max(1, args.readings // size),
                        fmt=fmt,
                    )
                    m = await measure(db, workload, args, pool)
                    results.setdefault((db, size, fmt), []).append(m)
                    print(
                        f"run {run}/{args.runs} {m.db:<8} size {size:>5}: gateway "
                        f"{m.gateway_rate:>9,.0f}/s  raw {m.raw_rate:>9,.0f}/s  "
                        f"ratio {m.ratio:.2f} (vs raw/batch {m.batch_ratio:.2f})  "
                        f"server cpu {m.server_cpu:.2f} "
                        f"({m.server_us_per_reading:.1f} us/reading)  "
                        f"client cpu {m.client_cpu:.2f}  p50 {m.p50_ms:.1f} ms  "
                        f"commits {m.commits_per_s:.0f}/s of {m.readings_per_commit:.0f}  "
                        f"writer busy {m.commit_busy:.0%} "
                        f"({m.commit_us_per_reading:.1f} us/reading)",
                        flush=True,
                    )
    print_table(list(results.values()), args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--sizes", default="100,1000", help="readings per request, comma list")
    parser.add_argument(
        "--formats",
        default="json",
        help="json (native telemetry POST), lp (line protocol, /api/v2/write), senml (the same "
        "readings as SenML packs): comma list; each size is measured in each format in the same "
        "run",
    )
    parser.add_argument("--readings", type=int, default=200_000, help="timed readings per run")
    parser.add_argument("--metrics", type=int, default=4, help="metrics (readings) per message")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument(
        "--client",
        choices=["httpx", "raw"],
        default="raw",
        help="httpx.AsyncClient, or a minimal keep-alive HTTP/1.1 client on asyncio streams",
    )
    parser.add_argument(
        "--raw-batch",
        type=int,
        default=5_000,
        help="commit size of the second raw rate (the gateway's default FIELDGATE_BATCH_SIZE)",
    )
    parser.add_argument("--runs", type=int, default=3, help="repeat and report medians")
    parser.add_argument("--limit-s", type=float, default=120.0, help="time bound of one load")
    parser.add_argument(
        "--pg-dsn",
        default=PG_ADMIN_DSN,
        help="admin connection to the local PostgreSQL (throwaway databases are made there)",
    )
    parser.add_argument("--py-spy", metavar="DIR", help="profile the gateway with py-spy into DIR")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway, e.g. FIELDGATE_BATCH_SIZE=10000",
    )
    args = parser.parse_args()
    if args.concurrency < args.clients:
        parser.error("--concurrency must be at least --clients")
    if "127.0.0.1" not in args.pg_dsn and "localhost" not in args.pg_dsn:
        parser.error("--pg-dsn must point at 127.0.0.1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
