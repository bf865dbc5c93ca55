"""MQTT ingestion throughput: N publisher connections -> broker -> gateway -> database.

Three figures from one run, on the same machine, broker and messages:

1. raw broker rate: a plain aiomqtt subscriber (MQTT 5 like the bridge, QoS 1, acknowledges on
   receipt, only counts)
   receiving the stream from the same N publishers;
2. the gateway: `fieldgate serve` (a subprocess) with its bridge at QoS 1, acknowledging after
   commit; stored readings/s, from the first publish to the last reading committed;
3. raw insert rate: the same readings inserted straight into the database with plain SQL in
   batches of the writer's size (the ceiling for any ingest path).

With `--workers 1,2` the gateway runs once for each count of worker processes (`fieldgate serve
--workers N`, each with its own MQTT connection on the shared subscription `$share/fieldgate/...`,
so each message goes to one of them), on the same load, and the scaling is printed.

Publishers are Mosquitto's own C client (`mosquitto_pub -l`, one connection each), so they cost
little CPU next to what is measured. By default the bench starts a private Mosquitto with
unbounded queues on a free port, and the gateway uses a fresh SQLite file.

    .venv/bin/python bench/ingest_mqtt.py --messages 40000 --publishers 4 --runs 3
    .venv/bin/python bench/ingest_mqtt.py --database-url postgres://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/ingest_mqtt.py --workers 1,2 --database-url postgres://...
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import httpx
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

BASE_MS = (int(time.time()) - 86_400) * 1000
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
        "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"
        f"log_dest file {workdir}/mosquitto.log\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)])
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if time.monotonic() > deadline:
            raise SystemExit("mosquitto did not start")
        time.sleep(0.05)


def message_lines(publisher: int, count: int, readings: int) -> bytes:
    """`count` native messages of `readings` metrics each, one per line, unique timestamps."""
    metrics = [f"m{j}" for j in range(readings)]
    lines = []
    for i in range(count):
        values = ", ".join(f'"{m}": {i % 1000 + j / 10}' for j, m in enumerate(metrics))
        lines.append(f'{{"ts": {BASE_MS + i}, "values": {{{values}}}}}')
    return ("\n".join(lines) + "\n").encode()


async def publish(port: int, prefix: str, files: list[Path], qos: int) -> None:
    """One mosquitto_pub connection per file (device `bench-<i>`), all at once."""
    procs = []
    for i, path in enumerate(files):
        with path.open("rb") as stdin:
            procs.append(
                await asyncio.create_subprocess_exec(
                    "mosquitto_pub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-q",
                    str(qos),
                    "-t",
                    f"{prefix}/devices/bench-{i}/telemetry",
                    "-l",
                    stdin=stdin,
                )
            )
    for proc in procs:
        if await proc.wait() != 0:
            raise SystemExit("mosquitto_pub failed")


async def plain_subscriber(
    port: int,
    prefix: str,
    files: list[Path],
    total: int,
    protocol: aiomqtt.ProtocolVersion,
    backlog: bool,
) -> float:
    """Messages/s of a subscriber that only counts (QoS 1, acknowledged on receipt)."""
    if backlog:
        return await plain_backlog(port, prefix, files, total, protocol)
    count = 0
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"bench-plain-{secrets.token_hex(3)}", protocol=protocol
    ) as client:
        await client.subscribe(f"{prefix}/devices/+/telemetry", qos=1)
        started = time.perf_counter()
        publishing = asyncio.create_task(publish(port, prefix, files, 1))
        async for _ in client.messages:
            count += 1
            if count == total:
                break
        elapsed = time.perf_counter() - started
        await publishing
    return total / elapsed


async def plain_backlog(
    port: int, prefix: str, files: list[Path], total: int, protocol: aiomqtt.ProtocolVersion
) -> float:
    """The same, draining a backlog the broker queued for its persistent session."""
    options: dict[str, Any] = {"identifier": f"bench-plain-{prefix}", "protocol": protocol}
    if protocol is aiomqtt.ProtocolVersion.V5:
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = 3600
        options.update(clean_start=False, properties=connect)
    else:
        options.update(clean_session=False)
    async with aiomqtt.Client("127.0.0.1", port, **options) as client:
        await client.subscribe(f"{prefix}/devices/+/telemetry", qos=1)
    await publish(port, prefix, files, 1)
    count = 0
    started = time.perf_counter()
    async with aiomqtt.Client("127.0.0.1", port, **options) as client:
        async for _ in client.messages:
            count += 1
            if count == total:
                break
    return total / (time.perf_counter() - started)


async def accepted(http: httpx.AsyncClient) -> float:
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for s in family.samples:
            if s.name == "fieldgate_readings_accepted_total" and s.labels["transport"] == "mqtt":
                return float(s.value)
    return 0.0


async def through_gateway(
    port: int,
    prefix: str,
    files: list[Path],
    total_readings: int,
    database_url: str,
    workdir: Path,
    extra_env: dict[str, str],
    backlog: bool,
    workers: int = 1,
) -> tuple[float, dict[str, float]]:
    """Stored readings/s with the gateway's bridge in the path (QoS 1, ack after commit)."""
    http_port = free_port()
    env = {
        **os.environ,
        "FIELDGATE_DATABASE_URL": database_url,
        "FIELDGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FIELDGATE_MQTT_URL": f"mqtt://127.0.0.1:{port}",
        "FIELDGATE_MQTT_TOPIC_PREFIX": prefix,
        "FIELDGATE_MQTT_CLIENT_ID": f"bench-gw-{secrets.token_hex(3)}",
        "FIELDGATE_WORKERS": str(workers),
        "FIELDGATE_WORKERS_ON_SQLITE": "true",  # refused by `serve` unless told: measured here
        **extra_env,
    }
    gateway = await spawn_gateway(env, http_port, workdir / f"{prefix}-0.log")
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        ) as http:
            await wait_ready(http, gateway, workdir, workdir / f"{prefix}-0.log", workers)
            for i in range(len(files)):
                r = await http.post("/api/v1/devices", json={"id": f"bench-{i}"})
                r.raise_for_status()
            if backlog:  # stop it, let the broker queue everything, start it again
                gateway.terminate()
                await asyncio.wait_for(gateway.wait(), 30)
                await publish(port, prefix, files, 1)
                log_path = workdir / f"{prefix}-1.log"
                gateway = await spawn_gateway(env, http_port, log_path)
                await wait_ready(http, gateway, workdir, log_path, workers)
                while await accepted(http) < total_readings:
                    if time.time() - connected_at(log_path) > 600:
                        raise SystemExit("the gateway did not store everything in 10 minutes")
                    await asyncio.sleep(0.1)
                ended = time.time()
                started = connected_at(log_path)
            else:
                started = time.time()
                publishing = asyncio.create_task(publish(port, prefix, files, 1))
                while await accepted(http) < total_readings:
                    if time.time() - started > 600:
                        raise SystemExit("the gateway did not store everything in 10 minutes")
                    await asyncio.sleep(0.2)  # /metrics costs the gateway CPU: not too often
                ended = time.time()
                await publishing
            stats = await writer_stats(http)
    finally:
        gateway.terminate()
        await asyncio.wait_for(gateway.wait(), 30)
    return total_readings / (ended - started), stats


async def spawn_gateway(
    env: dict[str, str], http_port: int, log_path: Path
) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from gateway.cli import main; main()",
            "serve",
            "--port",
            str(http_port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_ready(
    http: httpx.AsyncClient,
    gateway: asyncio.subprocess.Process,
    workdir: Path,
    log_path: Path,
    workers: int,
) -> None:
    """Until /readyz answers 200 and every worker's bridge has subscribed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await http.get("/readyz")).status_code == 200 and subscribed(log_path) >= workers:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or gateway.returncode is not None:
            raise SystemExit(f"the gateway did not get ready; see the logs in {workdir}")
        await asyncio.sleep(0.05)


def subscribed(log_path: Path) -> int:
    """Subscriptions the gateway's bridges (one a worker) have logged."""
    return log_path.read_text().count("subscribed to")


def connected_at(log_path: Path) -> float:
    """Wall-clock time of the bridge's "connected to" log line (local time, ms)."""
    for line in log_path.read_text().splitlines():
        if "fieldgate.mqtt connected to" in line:
            stamp, ms = line[:23].split(",")
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
    raise SystemExit(f"no connection in {log_path}")


async def writer_stats(http: httpx.AsyncClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for s in family.samples:
            if s.name in (
                "fieldgate_writer_batch_readings_sum",
                "fieldgate_writer_batch_readings_count",
                "fieldgate_writer_batch_requests_sum",
            ):
                out[s.name.removeprefix("fieldgate_writer_")] = s.value
    return out


async def raw_insert_rate(database_url: str, total: int, batch: int) -> float:
    """Rows/s of plain batched inserts into a table shaped like `reading`."""
    rows = [(1 + i % 10, BASE_MS * 1000 + i, float(i)) for i in range(total)]
    if database_url.startswith("sqlite://"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite://"))
        conn.execute("PRAGMA journal_mode=WAL")  # as Tortoise opens it (synchronous stays FULL)
        conn.execute(
            "CREATE TABLE r (series_id INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL,"
            " PRIMARY KEY (series_id, ts)) WITHOUT ROWID"
        )
        started = time.perf_counter()
        for i in range(0, total, batch):
            with conn:
                conn.executemany("INSERT OR IGNORE INTO r VALUES (?, ?, ?)", rows[i : i + batch])
        elapsed = time.perf_counter() - started
        conn.close()
        return total / elapsed
    pg = await asyncpg.connect(database_url)
    table = f"bench_raw_{secrets.token_hex(3)}"
    try:
        await pg.execute(
            f"CREATE TABLE {table} (series_id INTEGER NOT NULL, ts BIGINT NOT NULL,"
            " value DOUBLE PRECISION NOT NULL, PRIMARY KEY (series_id, ts))"
        )
        started = time.perf_counter()
        for i in range(0, total, batch):
            part = rows[i : i + batch]
            async with pg.transaction():
                await pg.execute(
                    f"INSERT INTO {table} SELECT * FROM unnest($1::integer[], $2::bigint[],"
                    " $3::double precision[]) ON CONFLICT DO NOTHING",
                    [r[0] for r in part],
                    [r[1] for r in part],
                    [r[2] for r in part],
                )
        elapsed = time.perf_counter() - started
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await pg.close()
    return total / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=40_000, help="messages in all, per run")
    parser.add_argument("--publishers", type=int, default=4, help="publisher connections")
    parser.add_argument("--readings", type=int, default=1, help="readings per message")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--receive-maximum", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported")
    parser.add_argument(
        "--workers",
        type=lambda t: [int(n) for n in t.split(",")],
        default=[1],
        help="worker processes of fieldgate serve, a list: 1,2 measures each on the same load",
    )
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="publish first, then time each consumer draining the broker's queue for it",
    )
    args = parser.parse_args()
    for binary in ("mosquitto", "mosquitto_pub"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is needed (apt-get install mosquitto mosquitto-clients)")

    plain311s: list[float] = []
    plain5s: list[float] = []
    storeds: dict[int, list[float]] = {n: [] for n in args.workers}
    ratios: list[float] = []
    raws: list[float] = []
    stats: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-") as tmp:
        workdir = Path(tmp)
        per = args.messages // args.publishers
        total = per * args.publishers
        files = []
        for i in range(args.publishers):
            path = workdir / f"pub-{i}.txt"
            path.write_bytes(message_lines(i, per, args.readings))
            files.append(path)
        broker, port = start_broker(workdir)
        try:
            for run in range(args.runs):
                plain311 = await plain_subscriber(
                    port, f"p3-{run}", files, total, aiomqtt.ProtocolVersion.V311, args.backlog
                )
                plain5 = await plain_subscriber(
                    port, f"p5-{run}", files, total, aiomqtt.ProtocolVersion.V5, args.backlog
                )
                line = ""
                for workers in args.workers:
                    database_url = args.database_url or f"sqlite://{workdir}/fg-{run}-{workers}.db"
                    if database_url.startswith("postgres"):
                        database_url = await fresh_pg_database(database_url)
                    try:
                        stored, stats = await through_gateway(
                            port,
                            f"gw-{run}-{workers}",
                            files,
                            total * args.readings,
                            database_url,
                            workdir,
                            {"FIELDGATE_MQTT_RECEIVE_MAXIMUM": str(args.receive_maximum)},
                            args.backlog,
                            workers,
                        )
                    finally:
                        if args.database_url.startswith("postgres"):
                            await drop_pg_database(args.database_url, database_url)
                    storeds[workers].append(stored)
                    line += f", {workers} worker(s) {stored / args.readings:,.0f} msg/s"
                raw = await raw_insert_rate(
                    args.database_url or f"sqlite://{workdir}/raw-{run}.db",
                    total * args.readings,
                    5_000,
                )
                plain311s.append(plain311)
                plain5s.append(plain5)
                raws.append(raw)
                first = storeds[args.workers[0]][-1]
                ratios.append(first / (max(plain311, plain5) * args.readings))
                print(
                    f"run {run + 1}: plain 3.1.1 {plain311:,.0f} msg/s, plain 5 {plain5:,.0f}"
                    f" msg/s; gateway{line}; ratio {ratios[-1]:.2f}x"
                    f" (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        finally:
            broker.terminate()
            broker.wait(timeout=15)

    plain311, plain5 = statistics.median(plain311s), statistics.median(plain5s)
    stored = statistics.median(storeds[args.workers[0]])
    raw = statistics.median(raws)
    kind = "PostgreSQL" if args.database_url.startswith("postgres") else "SQLite"
    print(
        f"{total:,} messages x {args.readings} reading(s), {args.publishers} mosquitto_pub "
        f"connections, QoS 1, {kind}; {'draining a backlog' if args.backlog else 'streaming'};"
        f" medians of {args.runs} runs"
    )
    print(
        f"  plain aiomqtt subscriber, MQTT 3.1.1 (counts only): {plain311:>8,.0f} msg/s\n"
        f"  plain aiomqtt subscriber, MQTT 5 (counts only):     {plain5:>8,.0f} msg/s\n"
        f"  gateway, MQTT 5 (stored, ack after commit, {args.workers[0]} worker(s)):"
        f" {stored / args.readings:>8,.0f}"
        f" msg/s = {stored:,.0f} readings/s\n"
        f"  raw batched insert ({kind}, 5,000 a commit): {raw:,.0f} readings/s\n"
        f"  gateway / faster plain subscriber (per run): "
        f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x\n"
        f"  gateway / raw insert: {stored / raw:.3f}x"
    )
    if len(args.workers) > 1:
        one = storeds[args.workers[0]]
        for workers in args.workers[1:]:
            scaling = [n / o for n, o in zip(storeds[workers], one, strict=True)]
            print(
                f"  gateway, {workers} workers (shared subscription): "
                f"{statistics.median(storeds[workers]) / args.readings:>8,.0f} msg/s;"
                f" {', '.join(f'{x:.2f}x' for x in scaling)} the {args.workers[0]}-worker rate"
                f" (per run); median {statistics.median(scaling):.2f}x"
            )
    commits = stats.get("batch_readings_count", 0)
    if commits:
        print(
            f"  writer (last run): {commits:,.0f} commits, "
            f"{stats['batch_readings_sum'] / commits:,.0f} readings and "
            f"{stats['batch_requests_sum'] / commits:.1f} writes per commit"
        )


async def fresh_pg_database(url: str) -> str:
    name = f"fg_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.rsplit("/", 1)[0] + f"/{name}"


async def drop_pg_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
