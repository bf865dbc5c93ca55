"""Disk bytes per reading, HTTP ingest rate and 7-day queries of fieldgate, next to InfluxDB and
VictoriaMetrics on the same data: the yardstick of issue 10's targets.

**The data set** (seeded, `--seed`): `--devices` devices (20) x 2 metrics (`temperature`,
`humidity`), one reading every `--step-s` seconds (10) for `--days` days (7), ending at the last
whole hour an hour ago: 2,419,200 readings by default. Each series is a random walk in whole
hundredths (each step uniform in -2..+2 hundredths) from its own start, so every value has at most
2 decimals; it is sent as the double `k / 100`, written by its shortest repr in JSON and in line
protocol alike, so every database is given the same doubles. Timestamps sit 5 s past each 10 s
step, so no reading falls on an hour boundary (see the queries).

**Each database, each run** (`--databases`, `--runs`):

1. it is started on free 127.0.0.1 ports with its data in a temporary directory, and stopped at
   the end (never a system service): `fieldgate serve` on a SQLite file, and on a throwaway
   PostgreSQL database on the local server (dropped afterwards); `influxd run` (InfluxDB 1.6) and
   `victoria-metrics` (1.79), Debian's packages; a peer whose binary is missing is skipped, with a
   message;
2. the data is loaded over HTTP, 1,000 readings a request (500 timestamps x 2 metrics), 8
   requests in flight (`--in-flight`), one keep-alive connection each, from one client process
   (bodies made before the clock starts), devices in turn, each in time order; ingest rate =
   readings / (last answer - first send), with the client's CPU share beside it (near 1 core, the
   rate would be the client's):
   - fieldgate: `POST /api/v1/devices/{id}/telemetry` with the device's token, an array of 500
     native messages `{"ts": epoch ms, "values": {"temperature": t, "humidity": h}}`; every answer
     must count all its readings as accepted;
   - InfluxDB: `POST /write?db=bench&precision=s`, 500 lines
     `sensor,device=d00 temperature=20.37,humidity=51.2 <epoch s>`; it answers once the WAL is
     written (and fsynced: `wal-fsync-delay` 0, the default);
   - VictoriaMetrics: the same bodies to its InfluxDB endpoint (`/write`), which makes the series
     `sensor_temperature{device="d00"}` and `sensor_humidity{...}`; it answers once the rows are
     buffered in memory (flushed within about a second);
   the stored count is checked afterwards in every database;
3. `fieldgate maintain` runs once (fieldgate only), when the command exists: the step that will
   pack readings into chunks and build rollups (until then: "not available yet");
4. disk bytes per reading (apparent file sizes):
   - SQLite: the database file plus its WAL after `PRAGMA wal_checkpoint(TRUNCATE)`;
   - PostgreSQL: after `VACUUM ANALYZE` (what autovacuum does after a bulk load), the sum of
     `pg_total_relation_size` over `STORAGE_TABLES` (reading, series) and any table whose name
     starts with one of `STORAGE_TABLE_PREFIXES` (partitions, chunks and rollups as they come);
   - InfluxDB: the `.tsm` files of database `bench` after a full compaction: the instance runs
     with `cache-snapshot-write-cold-duration` and `compact-full-write-cold-duration` at 1 s, and
     the bench waits (`--settle-s` deadline) until the WAL is empty, each shard holds one TSM
     generation, no `.tmp` file is left and the listing stops changing;
   - VictoriaMetrics: the whole `-storageDataPath` after `/internal/force_flush` and
     `/internal/force_merge`, once `/metrics` shows no pending rows and no active merge;
5. two queries, `--warmup` untimed rounds then `--query-runs` timed ones, median (httpx, one
   keep-alive connection, the full answer read), over [start, end) = the whole data set (7 days,
   168 one-hour buckets), mean of `temperature` per hour:
   - "one device" (d00) and "whole fleet" (every device, one series each);
   - fieldgate: `GET /api/v1/devices/d00/telemetry/aggregate` and `GET /api/v1/telemetry/aggregate`
     with `metric=temperature&window=1h&agg=avg` (fill none: only non-empty buckets), UTC;
   - InfluxQL: `SELECT mean(temperature) FROM sensor WHERE [device='d00' AND] time >= <start>s AND
     time < <end>s GROUP BY time(1h)[, device] fill(none)`: buckets [t, t+1h) like fieldgate's;
   - MetricsQL: `avg_over_time(sensor_temperature[{device="d00"}][1h])` by `query_range` with
     `step=1h`, from start+1h to end: the point at t averages (t-1h, t], the same readings as
     fieldgate's bucket starting at t-1h because no reading sits on an hour boundary; the server
     runs with `-search.disableCache`, so a repeated query is computed again as in the others;
   - the answers are checked against each other: the same (device, hour) buckets, means within
     1e-6.

It prints each database's figures per run, then medians over the runs and the ratios of fieldgate
to each peer as issue 10's target lines, marking which hold. Everything talks only to 127.0.0.1
and every wait has a deadline.

    .venv/bin/python bench/storage.py --runs 3                       # bench/README.md's figures
    .venv/bin/python bench/storage.py --days 1 --devices 4 --runs 1  # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import uvloop
from rig import FIELDGATE, HOST, PG_ADMIN_DSN, Gateway, Postgres, RawConnection, free_port

METRICS = ("temperature", "humidity")
QUERY_METRIC = "temperature"
HOUR_S = 3600
# PostgreSQL: what "the store" is. reading + series today; tables named with these prefixes
# (partitions, chunks, rollups) are counted too, once a migration makes them.
STORAGE_TABLES = ("reading", "series")
# The maintenance interval of the "+maint" databases (seconds).
MAINTAIN_EVERY_S = 2
STORAGE_TABLE_PREFIXES = ("reading_", "chunk", "rollup")
INFLUX_DB = "bench"
# A peer's binary, and the Debian package that has it.
PEER_BINARIES = {
    "influxdb": ("influxd", "influxdb"),
    "victoriametrics": ("victoria-metrics", "victoria-metrics"),
}

# Answers of the queries: (device, bucket start in epoch s) -> mean.
Answer = dict[tuple[str, int], float]


# ---------------------------------------------------------------------------------------------
# The data set and its request bodies.


@dataclass(frozen=True)
class DataSet:
    days: float
    devices: int
    step_s: int
    seed: int
    per_request: int  # readings a request
    end_s: int = field(default_factory=lambda: (int(time.time()) // HOUR_S - 1) * HOUR_S)

    @property
    def start_s(self) -> int:
        return self.end_s - int(self.days * 86_400) // HOUR_S * HOUR_S

    @property
    def steps(self) -> int:
        return (self.end_s - self.start_s) // self.step_s

    @property
    def readings(self) -> int:
        return self.devices * len(METRICS) * self.steps

    def device_ids(self) -> list[str]:
        return [f"d{i:02d}" for i in range(self.devices)]

    def walk(self, device: int, metric: int) -> list[float]:
        """One series: a random walk in hundredths, as doubles k / 100."""
        rng = random.Random(self.seed * 1_000_003 + device * len(METRICS) + metric)
        start = (2_000 if metric == 0 else 5_000) + rng.randint(-500, 500)
        steps = rng.choices(range(-2, 3), k=self.steps)
        return [k / 100 for k in itertools.accumulate(steps, initial=start)][1:]

    def timestamps(self) -> range:
        first = self.start_s + self.step_s // 2
        return range(first, first + self.steps * self.step_s, self.step_s)

    def chunks(self) -> Iterator[tuple[int, list[tuple[int, float, float]]]]:
        """(device, rows of (ts s, temperature, humidity)) a request each, devices in turn."""
        rows_per = self.per_request // len(METRICS)
        series = [
            list(zip(self.timestamps(), *self._walks(d), strict=True)) for d in range(self.devices)
        ]
        for first in range(0, self.steps, rows_per):
            for d in range(self.devices):
                yield d, series[d][first : first + rows_per]

    def _walks(self, device: int) -> list[list[float]]:
        return [self.walk(device, m) for m in range(len(METRICS))]


@dataclass(frozen=True)
class Post:
    device: str  # the device the readings belong to
    path: str
    body: bytes
    readings: int


def fieldgate_posts(data: DataSet) -> list[Post]:
    ids = data.device_ids()
    posts = []
    for d, rows in data.chunks():
        messages = [
            {"ts": ts * 1000, "values": dict(zip(METRICS, v, strict=True))} for ts, *v in rows
        ]
        path = f"/api/v1/devices/{ids[d]}/telemetry"
        posts.append(Post(ids[d], path, orjson.dumps(messages), len(rows) * len(METRICS)))
    return posts


def line_posts(data: DataSet) -> list[Post]:
    ids = data.device_ids()
    posts = []
    for d, rows in data.chunks():
        lines = "".join(
            f"sensor,device={ids[d]} temperature={t!r},humidity={h!r} {ts}\n" for ts, t, h in rows
        )
        path = f"/write?db={INFLUX_DB}&precision=s"
        posts.append(Post(ids[d], path, lines.encode(), len(rows) * len(METRICS)))
    return posts


# ---------------------------------------------------------------------------------------------
# The load: `in_flight` keep-alive connections taking the next request in turn.


@dataclass
class Load:
    seconds: float
    accepted: int  # readings the answers counted (fieldgate) or sent with a 204 (peers)
    duplicates: int
    statuses: Counter[int]
    client_cpu: float  # the client's CPU seconds per wall second (1.0: it was the bottleneck)


async def _post_all(
    port: int, posts: Sequence[Post], tokens: dict[str, str], in_flight: int, content_type: str
) -> Load:
    queue = iter(posts)
    statuses: Counter[int] = Counter()
    counts = Counter[str]()

    async def connection() -> None:
        raw = RawConnection(HOST, port)
        try:
            for post in queue:
                while True:
                    status, content = await raw.post(
                        post.path, tokens.get(post.device), post.body, content_type
                    )
                    statuses[status] += 1
                    if status != 503:  # fieldgate's queue full: back off, send again
                        break
                    await asyncio.sleep(0.05)
                if status == 204:
                    counts["accepted"] += post.readings
                elif status == 200:
                    answer = orjson.loads(content)
                    counts["accepted"] += answer["accepted"]
                    counts["duplicates"] += answer["duplicates"]
                else:
                    raise RuntimeError(f"{post.path}: HTTP {status}: {content[:300]!r}")
        finally:
            await raw.close()

    started, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(in_flight):
            tasks.create_task(connection())
    wall = time.perf_counter() - started
    cpu = (time.process_time() - cpu) / wall
    return Load(wall, counts["accepted"], counts["duplicates"], statuses, cpu)


def post_all(
    port: int,
    posts: Sequence[Post],
    in_flight: int,
    tokens: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> Load:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_post_all(port, posts, tokens or {}, in_flight, content_type))


# ---------------------------------------------------------------------------------------------
# The databases: one class each, the same steps.


def rfc3339(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def tree_bytes(path: Path, suffix: str = "") -> int:
    return sum(f.stat().st_size for f in path.rglob(f"*{suffix}") if f.is_file())


def wait_http(
    url: str, ok: Callable[[httpx.Response], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within 60 s")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Store:
    """One database under test: start it, load it, settle it, size it, query it, stop it."""

    name = ""
    port = 0
    proc: subprocess.Popen[bytes] | None = None  # a peer's server, once started

    def start(self, workdir: Path) -> None:
        raise NotImplementedError

    def load(self, data: DataSet, bodies: dict[str, list[Post]], in_flight: int) -> Load:
        raise NotImplementedError

    def settle(self, timeout_s: float) -> str:
        """What runs between the load and the measurement (maintenance, flushes, compaction)."""
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError

    def disk(self) -> tuple[int, str]:
        raise NotImplementedError

    def request(self, data: DataSet, fleet: bool) -> tuple[str, dict[str, str]]:
        raise NotImplementedError

    def parse(self, body: Any) -> Answer:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {}


class Fieldgate(Store):
    def __init__(self, kind: str, pg: Postgres, *, maintaining: bool = False) -> None:
        """`maintaining`: serve runs its maintenance job every MAINTAIN_EVERY_S during the load,
        packing what was loaded more than an hour back (all of the data set but its last hour)
        while the load goes on: what ingest costs with the job running."""
        self.name = f"fieldgate {kind}" + (" +maint" if maintaining else "")
        self.kind, self.pg = kind, pg
        self.maintaining = maintaining
        self.pg_name = ""
        self.gateway: Gateway | None = None

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        if self.kind == "sqlite":
            self.db_path = workdir / "fieldgate.db"
            self.database_url = f"sqlite://{self.db_path}"
        else:
            self.pg_name, self.database_url = asyncio.run(self.pg.create())
        interval = str(MAINTAIN_EVERY_S) if self.maintaining else "0"
        self.gateway = Gateway(
            self.database_url, workdir, {"FIELDGATE_MAINTENANCE_INTERVAL_S": interval}
        )
        asyncio.run(self.gateway.wait_ready())
        self.port = self.gateway.port

    def headers(self) -> dict[str, str]:
        assert self.gateway is not None
        return {"Authorization": f"Bearer {self.gateway.admin_token}"}

    def load(self, data: DataSet, bodies: dict[str, list[Post]], in_flight: int) -> Load:
        tokens = {}
        with httpx.Client(base_url=self.url, headers=self.headers(), timeout=30) as client:
            for device in data.device_ids():
                r = client.post("/api/v1/devices", json={"id": device})
                r.raise_for_status()
                tokens[device] = r.json()["token"]
        return post_all(self.port, bodies["fieldgate"], in_flight, tokens)

    def settle(self, timeout_s: float) -> str:
        """`fieldgate maintain`, once (not for a +maint gateway: its own job is packing, at the
        pace serve keeps, and would hold the maintenance lock for minutes; its disk and query
        figures are of what is packed by then)."""
        assert self.gateway is not None
        if self.maintaining:
            return "serve's own maintenance job (no fieldgate maintain)"
        if subprocess.run([str(FIELDGATE), "maintain", "--help"], capture_output=True).returncode:
            return "fieldgate maintain: not available yet"
        env = {
            **os.environ,
            "FIELDGATE_DATABASE_URL": self.database_url,
            "FIELDGATE_ADMIN_TOKEN": self.gateway.admin_token,
            "FIELDGATE_MQTT_URL": "",
        }
        started = time.monotonic()
        done = subprocess.run(
            [str(FIELDGATE), "maintain"],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode:
            raise RuntimeError(f"fieldgate maintain exited {done.returncode}:\n{done.stderr}")
        said = " | ".join(done.stdout.strip().splitlines()[-5:])
        return f"fieldgate maintain: {time.monotonic() - started:.1f} s: {said}"

    def stored(self) -> int:
        """Unpacked rows plus the readings packed chunks hold."""
        rows = self._sql("SELECT (SELECT count(*) FROM reading), (SELECT sum(n) FROM chunk)")
        return int(rows[0][0]) + int(rows[0][1] or 0)

    def disk(self) -> tuple[int, str]:
        if self.kind == "sqlite":
            busy = self._sql("PRAGMA wal_checkpoint(TRUNCATE)")[0][0]
            wal = self.db_path.with_name(self.db_path.name + "-wal")
            size = self.db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
            return size, "file + WAL after a checkpoint" + (
                " (busy: WAL not truncated)" if busy else ""
            )
        self._sql("VACUUM ANALYZE")
        prefixes = " OR ".join(f"tablename LIKE '{p}%'" for p in STORAGE_TABLE_PREFIXES)
        rows = self._sql(
            "SELECT tablename, pg_total_relation_size(quote_ident(tablename)) FROM pg_tables"
            f" WHERE schemaname = 'public' AND (tablename = ANY($1) OR {prefixes})",
            [list(STORAGE_TABLES)],
        )
        return sum(int(n) for _, n in rows), "+".join(sorted(str(t) for t, _ in rows))

    def _sql(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        if self.kind == "sqlite":
            con = sqlite3.connect(self.db_path, timeout=30)
            try:
                return con.execute(sql.replace("$1", "?"), list(args)).fetchall()
            finally:
                con.close()

        async def run() -> list[Any]:
            con = await asyncpg.connect(self.database_url)
            try:
                return list(await con.fetch(sql, *args))
            finally:
                await con.close()

        return asyncio.run(run())

    def request(self, data: DataSet, fleet: bool) -> tuple[str, dict[str, str]]:
        params = {
            "metric": QUERY_METRIC,
            "start": rfc3339(data.start_s),
            "end": rfc3339(data.end_s),
            "window": "1h",
            "agg": "avg",
        }
        if fleet:
            return "/api/v1/telemetry/aggregate", params
        return f"/api/v1/devices/{data.device_ids()[0]}/telemetry/aggregate", params

    def parse(self, body: Any) -> Answer:
        series = body.get("series") or [{"device": body["device"], "buckets": body["buckets"]}]
        return {
            (s["device"], int(datetime.fromisoformat(b["start"]).timestamp())): b["avg"]
            for s in series
            for b in s["buckets"]
        }

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.pg_name:
            asyncio.run(self.pg.drop(self.pg_name))


INFLUX_CONF = """\
reporting-disabled = true
bind-address = "{host}:{rpc}"
[meta]
  dir = "{dir}/meta"
[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "1s"
  compact-full-write-cold-duration = "1s"
[http]
  bind-address = "{host}:{http}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""


class Influx(Store):
    name = "InfluxDB"

    def start(self, workdir: Path) -> None:
        self.dir = workdir / "influxdb"
        self.dir.mkdir()
        self.port = free_port()
        conf = self.dir / "influxdb.conf"
        conf.write_text(
            INFLUX_CONF.format(host=HOST, rpc=free_port(), dir=self.dir, http=self.port)
        )
        self.log = self.dir / "influxd.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["influxd", "run", "-config", str(conf)], stdout=out, stderr=out, cwd=self.dir
            )
        wait_http(self.url + "/ping", lambda r: r.status_code == 204, self.proc, self.log)
        self._query(f"CREATE DATABASE {INFLUX_DB}", post=True)

    def _query(self, q: str, post: bool = False) -> Any:
        params = {"q": q, "db": INFLUX_DB, "epoch": "s"}
        r = httpx.request(
            "POST" if post else "GET", self.url + "/query", params=params, timeout=300
        )
        r.raise_for_status()
        return r.json()

    def load(self, data: DataSet, bodies: dict[str, list[Post]], in_flight: int) -> Load:
        return post_all(self.port, bodies["line"], in_flight, content_type="text/plain")

    def _files(self) -> list[tuple[str, int]]:
        return sorted(
            (str(f.relative_to(self.dir)), f.stat().st_size)
            for f in self.dir.rglob("*")
            if f.is_file()
        )

    def _compacted(self, files: list[tuple[str, int]]) -> bool:
        if any(size for name, size in files if name.endswith(".wal")):
            return False
        if any(name.endswith((".tmp", ".tsm.tmp")) for name, _ in files):
            return False
        generations: dict[str, set[str]] = {}
        for name, _ in files:
            if name.endswith(".tsm"):
                shard, file = name.rsplit("/", 1)
                generations.setdefault(shard, set()).add(file.split("-", 1)[0])
        return bool(generations) and all(len(g) == 1 for g in generations.values())

    def settle(self, timeout_s: float) -> str:
        """Wait for the cache snapshot and the full compaction of every shard (1 s cold)."""
        started = time.monotonic()
        before: list[tuple[str, int]] = []
        while time.monotonic() - started < timeout_s:
            files = self._files()
            if files == before and self._compacted(files):
                return f"fully compacted after {time.monotonic() - started:.1f} s"
            before = files
            time.sleep(1)
        return f"NOT fully compacted within {timeout_s:.0f} s (measured as it was)"

    def stored(self) -> int:
        found = self._query("SELECT count(temperature), count(humidity) FROM sensor")
        return sum(int(v) for v in found["results"][0]["series"][0]["values"][0][1:])

    def disk(self) -> tuple[int, str]:
        everything = tree_bytes(self.dir / "data") + tree_bytes(self.dir / "wal")
        return tree_bytes(self.dir / "data" / INFLUX_DB, ".tsm"), (
            f"TSM files; data+wal dirs {everything:,} (series index files preallocated)"
        )

    def request(self, data: DataSet, fleet: bool) -> tuple[str, dict[str, str]]:
        where = "" if fleet else f"device='{data.device_ids()[0]}' AND "
        by = ", device" if fleet else ""
        q = (
            f"SELECT mean({QUERY_METRIC}) FROM sensor WHERE {where}time >= {data.start_s}s"
            f" AND time < {data.end_s}s GROUP BY time(1h){by} fill(none)"
        )
        return "/query", {"db": INFLUX_DB, "q": q, "epoch": "s"}

    def parse(self, body: Any) -> Answer:
        answer: Answer = {}
        for s in body["results"][0].get("series", []):
            device = s.get("tags", {}).get("device", "d00")
            answer.update({(device, int(t)): v for t, v in s["values"]})
        return answer

    def stop(self) -> None:
        stop_process(self.proc)


class Victoria(Store):
    name = "VictoriaMetrics"

    def start(self, workdir: Path) -> None:
        self.dir = workdir / "victoria-metrics"
        self.port = free_port()
        self.log = workdir / "victoria-metrics.log"
        cmd = [
            "victoria-metrics",
            f"-storageDataPath={self.dir}",
            f"-httpListenAddr={HOST}:{self.port}",
            "-retentionPeriod=100y",
            "-search.disableCache",
            "-loggerLevel=WARN",
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=workdir)
        wait_http(self.url + "/health", lambda r: r.text.strip() == "OK", self.proc, self.log)

    def load(self, data: DataSet, bodies: dict[str, list[Post]], in_flight: int) -> Load:
        return post_all(self.port, bodies["line"], in_flight, content_type="text/plain")

    def _metrics(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith(("vm_active_merges", "vm_pending_rows", "vm_rows{")):
                found[name] = float(value)
        return found

    def settle(self, timeout_s: float) -> str:
        """/internal/force_flush, /internal/force_merge, then no pending rows and no merge."""
        started = time.monotonic()
        httpx.get(self.url + "/internal/force_flush", timeout=60).raise_for_status()
        httpx.get(self.url + "/internal/force_merge", timeout=60).raise_for_status()
        quiet = 0
        while time.monotonic() - started < timeout_s:
            busy = sum(v for k, v in self._metrics().items() if not k.startswith("vm_rows"))
            quiet = quiet + 1 if busy == 0 else 0
            if quiet == 3:
                return f"flushed and merged after {time.monotonic() - started:.1f} s"
            time.sleep(0.5)
        return f"merges still running after {timeout_s:.0f} s (measured as it was)"

    def stored(self) -> int:
        rows = self._metrics()
        return int(sum(v for k, v in rows.items() if k.startswith('vm_rows{type="storage/')))

    def disk(self) -> tuple[int, str]:
        return tree_bytes(self.dir), "data directory"

    def request(self, data: DataSet, fleet: bool) -> tuple[str, dict[str, str]]:
        selector = "" if fleet else f'{{device="{data.device_ids()[0]}"}}'
        return "/api/v1/query_range", {
            "query": f"avg_over_time(sensor_{QUERY_METRIC}{selector}[1h])",
            "start": str(data.start_s + HOUR_S),
            "end": str(data.end_s),
            "step": "3600",
        }

    def parse(self, body: Any) -> Answer:
        return {
            (s["metric"]["device"], int(t) - HOUR_S): float(v)
            for s in body["data"]["result"]
            for t, v in s["values"]
        }

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------------------------------
# One database, one run.


@dataclass
class Measurement:
    db: str
    readings: int
    disk_bytes: int
    disk_how: str
    ingest_s: float
    client_cpu: float
    one_ms: float
    fleet_ms: float
    settle: str
    answers: dict[str, Answer] = field(default_factory=dict, repr=False)

    @property
    def bytes_per_reading(self) -> float:
        return self.disk_bytes / self.readings

    @property
    def ingest_rate(self) -> float:
        return self.readings / self.ingest_s


def time_query(
    store: Store, data: DataSet, fleet: bool, args: argparse.Namespace
) -> tuple[float, Answer]:
    path, params = store.request(data, fleet)
    times = []
    with httpx.Client(base_url=store.url, headers=store.headers(), timeout=300) as client:
        for i in range(args.warmup + args.query_runs):
            t0 = time.perf_counter()
            r = client.get(path, params=params)
            elapsed = time.perf_counter() - t0
            r.raise_for_status()
            if i >= args.warmup:
                times.append(elapsed * 1000)
    return statistics.median(times), store.parse(r.json())


def measure(
    store: Store, data: DataSet, bodies: dict[str, list[Post]], args: argparse.Namespace
) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-storage-") as tmp:
        try:
            store.start(Path(tmp))
            load = store.load(data, bodies, args.in_flight)
            if load.accepted != data.readings or load.duplicates:
                raise AssertionError(f"{store.name}: {load} for {data.readings} readings sent")
            settled = store.settle(args.settle_s)
            stored = store.stored()
            if stored != data.readings:
                raise AssertionError(f"{store.name}: {stored} readings stored of {data.readings}")
            size, how = store.disk()
            one_ms, one = time_query(store, data, False, args)
            fleet_ms, fleet = time_query(store, data, True, args)
        finally:
            store.stop()
    return Measurement(
        store.name,
        data.readings,
        size,
        how,
        load.seconds,
        load.client_cpu,
        one_ms,
        fleet_ms,
        settled,
        {"one": one, "fleet": fleet},
    )


def compare_answers(results: Sequence[Measurement], data: DataSet) -> list[str]:
    """Each database's answers against the first one's: same buckets, means within 1e-6."""
    problems = []
    first = results[0]
    hours = (data.end_s - data.start_s) // HOUR_S
    for m in results:
        for q, answer in m.answers.items():
            ref = first.answers[q]
            buckets = hours * (data.devices if q == "fleet" else 1)
            if len(answer) != buckets:
                problems.append(f"{m.db} {q}: {len(answer)} buckets, expected {buckets}")
            if answer.keys() != ref.keys():
                problems.append(f"{m.db} {q}: other buckets than {first.db}'s")
                continue
            worst = max(abs(answer[k] - ref[k]) for k in ref)
            if worst > 1e-6:
                problems.append(f"{m.db} {q}: means differ from {first.db}'s by up to {worst:.3g}")
    return problems


# ---------------------------------------------------------------------------------------------
# Runs, medians and the targets.


@dataclass(frozen=True)
class Target:
    fieldgate: str  # which fieldgate database
    peer: str
    what: str  # a Measurement property
    text: str
    bound: float  # the ratio fieldgate / peer must be at most this (or at least, with `floor`)
    floor: bool = False


FIGURES = {
    "bytes_per_reading": "disk bytes per reading",
    "one_ms": "7d at 1h, one device",
    "fleet_ms": "7d at 1h, whole fleet",
    "ingest_rate": "HTTP ingest",
}


def targets() -> list[Target]:
    """Issue 10's targets, as ratios of fieldgate to a peer measured in the same run."""
    influx, vm, moon = "InfluxDB", "VictoriaMetrics", "moonshot: "
    found = []
    for fg in ("fieldgate sqlite", "fieldgate postgres"):
        ingest = 0.7 if fg.endswith("sqlite") else 0.5
        specs = [
            (influx, "bytes_per_reading", "disk bytes per (packed) reading <= InfluxDB's", 1.0),
            (influx, "one_ms", "7d at 1h, one device <= 0.5x InfluxDB", 0.5),
            (influx, "fleet_ms", "7d at 1h, whole fleet <= 0.5x InfluxDB", 0.5),
            (influx, "ingest_rate", f"HTTP ingest >= {ingest}x InfluxDB line protocol", ingest),
            (vm, "bytes_per_reading", moon + "disk bytes per reading <= 2x VictoriaMetrics", 2.0),
            (vm, "one_ms", moon + "7d at 1h, one device <= 2x VictoriaMetrics", 2.0),
            (vm, "fleet_ms", moon + "7d at 1h, whole fleet <= 2x VictoriaMetrics", 2.0),
        ]
        found += [
            Target(fg, peer, what, text, bound, floor=what == "ingest_rate")
            for peer, what, text, bound in specs
        ]
        found.append(
            Target(
                f"{fg} +maint",
                fg,
                "ingest_rate",
                "HTTP ingest with the maintenance job running >= 0.9x without",
                0.9,
                floor=True,
            )
        )
    return found


def figure(m: Measurement, what: str) -> float:
    return float(getattr(m, what))


def median_of(runs: list[dict[str, Measurement]], db: str, what: str) -> float:
    return statistics.median(figure(run[db], what) for run in runs if db in run)


def target_lines(runs: list[dict[str, Measurement]]) -> list[dict[str, Any]]:
    """Each target whose databases ran: the median over runs of the same-run ratio."""
    lines = []
    for t in targets():
        ratios = [
            figure(run[t.fieldgate], t.what) / figure(run[t.peer], t.what)
            for run in runs
            if t.fieldgate in run and t.peer in run
        ]
        if not ratios:
            continue
        ratio = statistics.median(ratios)
        holds = ratio >= t.bound if t.floor else ratio <= t.bound
        lines.append({**asdict(t), "ratio": ratio, "ratios": ratios, "holds": holds})
    return lines


def row(m: Measurement) -> str:
    return (
        f"{m.db:<19}{m.readings:>11,}{m.disk_bytes:>14,}{m.bytes_per_reading:>9.2f}"
        f"{m.ingest_rate:>11,.0f}{m.one_ms:>9.1f}{m.fleet_ms:>10.1f}"
    )


HEADER = (
    f"{'database':<19}{'readings':>11}{'disk bytes':>14}{'B/rdg':>9}"
    f"{'ingest/s':>11}{'one ms':>9}{'fleet ms':>10}"
)


def print_summary(runs: list[dict[str, Measurement]], lines: list[dict[str, Any]]) -> None:
    dbs = list(dict.fromkeys(db for run in runs for db in run))
    print(f"\nmedians of {len(runs)} run(s)\n{HEADER}\n{'-' * len(HEADER)}")
    for db in dbs:
        print(
            f"{db:<19}{runs[0][db].readings:>11,}{'':>14}"
            f"{median_of(runs, db, 'bytes_per_reading'):>9.2f}"
            f"{median_of(runs, db, 'ingest_rate'):>11,.0f}"
            f"{median_of(runs, db, 'one_ms'):>9.1f}{median_of(runs, db, 'fleet_ms'):>10.1f}"
        )
    print("\nissue 10's targets (fieldgate / peer, same run; median over runs):")
    for line in lines:
        mark = "holds" if line["holds"] else "FAILS"
        per_run = ", ".join(f"{r:.2f}" for r in line["ratios"])
        print(f"  [{mark}] {line['fieldgate']}: {line['text']}: {line['ratio']:.2f}x ({per_run})")


def selected_stores(args: argparse.Namespace) -> list[Callable[[], Store]]:
    pg = Postgres(args.pg_dsn)
    makers: dict[str, Callable[[], Store]] = {
        "sqlite": lambda: Fieldgate("sqlite", pg),
        "postgres": lambda: Fieldgate("postgres", pg),
        "sqlite+maint": lambda: Fieldgate("sqlite", pg, maintaining=True),
        "postgres+maint": lambda: Fieldgate("postgres", pg, maintaining=True),
        "influxdb": Influx,
        "victoriametrics": Victoria,
    }
    chosen = []
    for name in args.databases:
        if name in PEER_BINARIES:
            binary, package = PEER_BINARIES[name]
            if shutil.which(binary) is None:
                print(f"skipped {name}: `{binary}` is not installed (apt-get install {package})")
                continue
        chosen.append(makers[name])
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--databases",
        type=lambda text: text.split(","),
        default=["sqlite", "postgres", "influxdb", "victoriametrics"],
        help="comma list of sqlite, postgres, influxdb, victoriametrics, and sqlite+maint,"
        " postgres+maint (fieldgate with its maintenance job running during the load;"
        " default: the first four)",
    )
    ap.add_argument("--days", type=float, default=7, help="history (whole hours), default 7")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--step-s", type=int, default=10, help="seconds between readings")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--per-request", type=int, default=1000, help="readings a request (even)")
    ap.add_argument("--in-flight", type=int, default=8, help="requests in flight")
    ap.add_argument("--runs", type=int, default=1, help="repeat everything; medians")
    ap.add_argument("--query-runs", type=int, default=9, help="timed rounds a query (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds a query first")
    ap.add_argument("--settle-s", type=float, default=600, help="deadline of maintain/compaction")
    ap.add_argument("--pg-dsn", default=PG_ADMIN_DSN, help="admin connection (throwaway databases)")
    ap.add_argument("--report-json", type=Path, help="write the figures and targets here")
    args = ap.parse_args()
    known = {"sqlite", "postgres", "influxdb", "victoriametrics", "sqlite+maint", "postgres+maint"}
    unknown = set(args.databases) - known
    if unknown or args.per_request % len(METRICS) or args.days * 24 < 1 or args.query_runs < 1:
        ap.error("check --databases, --per-request (even), --days (>= 1 h), --query-runs (>= 1)")
    stores = selected_stores(args)
    data = DataSet(args.days, args.devices, args.step_s, args.seed, args.per_request)
    print(
        f"{data.devices} devices x {len(METRICS)} metrics, every {data.step_s} s,"
        f" {rfc3339(data.start_s)} to {rfc3339(data.end_s)}: {data.readings:,} readings;"
        f" {args.per_request} a request, {args.in_flight} in flight; {os.cpu_count()} CPUs",
        flush=True,
    )
    made = time.monotonic()
    bodies = {"fieldgate": fieldgate_posts(data), "line": line_posts(data)}
    print(f"request bodies made in {time.monotonic() - made:.1f} s", flush=True)
    runs: list[dict[str, Measurement]] = []
    problems: list[str] = []
    for n in range(1, args.runs + 1):
        run: dict[str, Measurement] = {}
        for make in stores:
            m = measure(make(), data, bodies, args)
            run[m.db] = m
            print(
                f"run {n}/{args.runs} {row(m)}  [client {m.client_cpu:.2f} cores;"
                f" {m.disk_how}; {m.settle}]",
                flush=True,
            )
        problems += [f"run {n}: {p}" for p in compare_answers(list(run.values()), data)]
        runs.append(run)
    lines = target_lines(runs)
    print_summary(runs, lines)
    for p in problems:
        print(f"!! answers differ: {p}")
    if not problems and runs and runs[0]:
        print(f"answers agree: the same buckets and means (1e-6) in all {len(runs[0])} databases")
    if args.report_json:
        report = {
            "readings": data.readings,
            "runs": [
                [
                    {
                        **{k: v for k, v in asdict(m).items() if k != "answers"},
                        **{k: figure(m, k) for k in FIGURES},
                    }
                    for m in run.values()
                ]
                for run in runs
            ],
            "targets": lines,
            "answer_problems": problems,
        }
        args.report_json.write_text(json.dumps(report, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
