"""Overload: 10x the sustainable rate over HTTP and MQTT against a real `fieldgate serve`.

One run (repeated `--runs` times; medians at the end):

1. starts a private Mosquitto (unbounded queues) and `fieldgate serve` as subprocesses on free
   127.0.0.1 ports, on a fresh SQLite file or a throwaway PostgreSQL database (dropped after);
   creates `--http-devices` HTTP devices and `--mqtt-publishers` MQTT devices through the API;
2. calibration (`--calibrate-s`): HTTP clients in a closed loop at `--calibrate-concurrency`
   (small requests: `--request-messages` messages of 2 metrics each), and `mosquitto_pub -l`
   publishers at QoS 1 kept at most `--mqtt-window` messages ahead of what the gateway has
   received. The rates achieved are the sustainable rates;
3. overload (`--seconds`): `--factor` (10) times both rates offered open-loop: HTTP requests
   on a fixed schedule over up to `--max-connections` keep-alive connections per client process
   (a request due while all are busy is counted as `skipped`), MQTT lines fed to the publishers
   on a schedule (capped at `--mqtt-max-messages`);
   `--hostile` adds unauthenticated big bodies, wrong tokens, slow half-sent requests and
   poison MQTT payloads;
4. drain (`--drain-s`): waits for the gateway to store the MQTT backlog, or for the bound;
   with `--hostile`, then until the gateway has closed the half-sent requests, at most
   `--hostile-slow-wait-s` after they were opened;
5. SIGTERM (SIGKILL after `--stop-timeout-s`), then reads what the gateway never acknowledged
   back from its MQTT session on the broker (`mosquitto_sub` with its client id, up to a marker
   published last), and every stored reading from the database.

It reports the peak RSS of the gateway (VmHWM; sampled VmRSS too), HTTP answers by class and
p50/p99 latency, MQTT messages published / acknowledged by the gateway / stored, and checks that
every acknowledged reading is stored: every 2xx answer's readings, and every published MQTT
message that is no longer in the gateway's session (acknowledged = published - still queued).
Exit status 1 if an acknowledged reading is missing, an HTTP 5xx other than 503 was answered,
the peak RSS passed `--rss-target-mb`, MQTT ingestion stalled, or (with `--hostile`) the gateway
did not hold a hostile client off. Only 127.0.0.1 is contacted; every phase has a time bound.

    .venv/bin/python bench/overload.py --database sqlite --seconds 20 --runs 3
    .venv/bin/python bench/overload.py --database postgres --seconds 20 --runs 3 --hostile
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import getpass
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvloop
from rig import FIELDGATE, HOST, Postgres

# Readings 2 days old, one millisecond apart: far from the future-skew limit.
BASE_MS = (int(time.time()) - 2 * 86_400) * 1000
HTTP_METRICS = ("a", "b")
# The hostile clients connect from another loopback address than the load, so a gateway that
# throttles failed authentication per client address can tell them apart.
HOSTILE_FROM = ("127.0.0.2", 0)
OVERLOAD_SEQ = 10_000_000  # HTTP request numbers of the overload phase start here (calibration: 0)
POISON = (  # (device, payload): each can never be stored
    ("ovl-nosuch", b'{"ts":1e308,"values":{"a":1}}'),
    ("om-0", b'{"ts":' + b"9" * 400 + b',"values":{"a":1}}'),
    ("om-0", b'{"ts":-1e308,"values":{"a":1}}'),
    ("om-1", b"\x00x"),
    ("om-1", b'{"values":{"a\\u0000":1}}'),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_ts_ms(seq: int, messages: int, j: int) -> int:
    """ts of message j of request `seq` of an HTTP device (every device has its own series)."""
    return BASE_MS + seq * messages + j


def mqtt_line(n: int) -> bytes:
    """Message n of an MQTT publisher (its own device): one reading of metric `a`."""
    return b'{"ts":%d,"values":{"a":%d}}\n' % (BASE_MS + n, n % 1000)


# ---------------------------------------------------------------------------------------------
# The services under test.


class Broker:
    """A private Mosquitto on a free port with unbounded queues: it drops nothing, so what the
    gateway never acknowledged is still in its session at the end."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\nallow_anonymous true\nuser {getpass.getuser()}\n"
            "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"
            f"log_dest file {workdir}/mosquitto.log\n"
        )
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("mosquitto did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Gateway:
    """`fieldgate serve` on a free port with its own admin token and MQTT client id."""

    def __init__(
        self, database_url: str, workdir: Path, broker_port: int, prefix: str, env: dict[str, str]
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.admin_token = secrets.token_urlsafe(24)
        self.client_id = f"overload-gw-{secrets.token_hex(4)}"
        self.prefix = prefix
        self.log_path = workdir / "gateway.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *(str(FIELDGATE), "serve", "--host", HOST, "--port", str(self.port)),
                *("--log-level", "warning"),
            ],
            cwd=workdir,  # no stray .env file is read
            env={
                **os.environ,
                "FIELDGATE_DATABASE_URL": database_url,
                "FIELDGATE_ADMIN_TOKEN": self.admin_token,
                "FIELDGATE_MQTT_URL": f"mqtt://{HOST}:{broker_port}",
                "FIELDGATE_MQTT_TOPIC_PREFIX": prefix,
                "FIELDGATE_MQTT_CLIENT_ID": self.client_id,
                **env,
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.stop_s: float | None = None
        self.stop_started = float("inf")  # time.monotonic() of the SIGTERM
        self.killed = False

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.log.flush()
                    tail = self.log_path.read_bytes()[-4000:].decode(errors="replace")
                    raise RuntimeError(
                        f"fieldgate serve exited with {self.proc.returncode}; its log ends:\n{tail}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz", timeout=2.0)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"fieldgate serve was not ready within {timeout_s} s")

    def stop(self, timeout_s: float) -> None:
        """SIGTERM (the graceful stop); SIGKILL if it is not gone within `timeout_s`."""
        if self.proc.poll() is None:
            started = self.stop_started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait()
            self.stop_s = time.monotonic() - started
        if not self.log.closed:
            self.log.close()


class RssSampler(threading.Thread):
    """Polls VmRSS of a process every 50 ms (the kernel's VmHWM is read at the end as well)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self.hwm_kb = 0
        self.stopped = threading.Event()

    def _field(self, name: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(name):
                    return int(line.split()[1])
        return 0

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak_kb = max(self.peak_kb, self._field("VmRSS:"))
            self.hwm_kb = max(self.hwm_kb, self._field("VmHWM:"))

    def finish(self) -> None:
        self.hwm_kb = max(self.hwm_kb, self._field("VmHWM:"))
        self.stopped.set()
        self.join()

    @property
    def peak_mb(self) -> float:
        return max(self.peak_kb, self.hwm_kb) / 1024


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The gateway's /metrics as {'name{labels}': value}; {} if it did not answer in time."""
    try:
        text = (await client.get("/metrics", timeout=10.0)).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fieldgate_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def mqtt_stored(m: dict[str, float]) -> float:
    return m.get('fieldgate_readings_accepted_total{transport="mqtt"}', 0.0) + m.get(
        'fieldgate_readings_duplicate_total{transport="mqtt"}', 0.0
    )


# ---------------------------------------------------------------------------------------------
# HTTP load: client processes, closed loop (calibration) or on a schedule (overload).


@dataclass
class HttpResult:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    acked: list[tuple[int, int]] = field(default_factory=list)  # (device, seq) of 2xx answers
    due: int = 0  # requests the schedule asked for
    cpu_s: float = 0.0

    def merge(self, other: HttpResult) -> None:
        self.statuses.update(other.statuses)
        self.latencies.extend(other.latencies)
        self.acked.extend(other.acked)
        self.due += other.due
        self.cpu_s += other.cpu_s

    def count(self, *keys: str) -> int:
        return sum(self.statuses[k] for k in keys)

    @property
    def ok(self) -> int:
        return sum(n for k, n in self.statuses.items() if k.startswith("2"))

    @property
    def server_errors(self) -> int:
        return sum(n for k, n in self.statuses.items() if k.startswith("5") and k != "503")


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on one asyncio stream (as in bench/ingest_http.py:
    httpx costs more CPU per request than the gateway spends on a small one)."""

    def __init__(self, port: int, local_addr: tuple[str, int] | None = None) -> None:
        self.port = port
        self.local_addr = local_addr
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes, bool]:
        """(status, body, server keeps the connection open)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                HOST, self.port, local_addr=self.local_addr
            )
        assert self.reader is not None
        self.writer.write(head + body)
        answer = await self.reader.readuntil(b"\r\n\r\n")
        self.used = True
        length = 0
        keep = True
        for line in answer.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        return int(answer[9:12]), await self.reader.readexactly(length), keep

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = self.reader = None


def _request_head(device: str, token: str, length: int) -> bytes:
    return (
        f"POST /api/v1/devices/{device}/telemetry HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _body(seq: int, messages: int) -> bytes:
    parts = []
    for j in range(messages):
        t = http_ts_ms(seq, messages, j)
        parts.append(b'{"ts":%d,"values":{"a":%d,"b":%d.5}}' % (t, t % 1000, j))
    return b"[" + b",".join(parts) + b"]"


async def _http_load(
    port: int,
    devices: list[tuple[int, str]],
    mode: str,
    rate: float,
    concurrency: int,
    max_connections: int,
    messages: int,
    seq_start: int,
    start_at: float,
    seconds: float,
    timeout_s: float,
) -> HttpResult:
    result = HttpResult()
    idle: list[RawConnection] = []
    open_count = 0
    next_seq = dict.fromkeys((d for d, _ in devices), seq_start)
    turn = 0

    def next_request() -> tuple[int, int, bytes]:
        nonlocal turn
        device, token = devices[turn % len(devices)]
        turn += 1
        seq = next_seq[device]
        next_seq[device] = seq + 1
        body = _body(seq, messages)
        return device, seq, _request_head(f"oh-{device}", token, len(body)) + body

    async def one(conn: RawConnection) -> tuple[bool, str]:
        """Send the next request on `conn`: (the connection is still usable, the outcome)."""
        device, seq, data = next_request()
        for attempt in (0, 1):
            reused = conn.used
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    status, _, keep = await conn.request(data, b"")
            except TimeoutError:
                result.statuses["timeout"] += 1
                conn.close()
                return False, "timeout"
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                conn.close()
                partial = getattr(exc, "partial", b"")
                if reused and attempt == 0 and not partial:
                    conn.used = False  # the server closed an idle keep-alive connection: retry
                    continue
                result.statuses["connection error"] += 1
                return False, "connection error"
            result.latencies.append(time.perf_counter() - sent)
            result.statuses[str(status)] += 1
            if 200 <= status < 300:
                result.acked.append((device, seq))
            if not keep:
                conn.close()
            return keep, str(status)
        return False, "connection error"

    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    deadline = time.monotonic() + seconds
    if mode == "closed":

        async def worker() -> None:
            conn = RawConnection(port)
            while time.monotonic() < deadline:
                keep, outcome = await one(conn)
                if not keep:
                    conn = RawConnection(port)
                if outcome in ("503", "429"):  # the gateway asks to wait: a short pause
                    await asyncio.sleep(0.01)
            conn.close()

        async with asyncio.TaskGroup() as tasks:
            for _ in range(concurrency):
                tasks.create_task(worker())
    else:
        started = time.monotonic()
        pending: set[asyncio.Task[None]] = set()

        async def send(conn: RawConnection) -> None:
            nonlocal open_count
            if (await one(conn))[0]:
                idle.append(conn)
            else:
                open_count -= 1

        while (now := time.monotonic()) < deadline:
            due = int((now - started) * rate) - result.due
            for _ in range(due):
                result.due += 1
                if idle:
                    conn = idle.pop()
                elif open_count < max_connections:
                    open_count += 1
                    conn = RawConnection(port)
                else:
                    result.statuses["skipped"] += 1  # every connection busy: not sent
                    continue
                task = asyncio.create_task(send(conn))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(0.002)
        if pending:
            await asyncio.wait(pending, timeout=timeout_s + 5)
        for conn in idle:
            conn.close()
    if mode == "closed":
        result.due = sum(result.statuses.values())
    result.cpu_s = time.process_time() - cpu0
    return result


def _http_process(base_ms: int, *args: Any) -> HttpResult:
    global BASE_MS  # a spawned process imported this module at another time
    BASE_MS = base_ms
    uvloop.install()
    return asyncio.run(_http_load(*args))


async def run_http(
    pool: concurrent.futures.ProcessPoolExecutor,
    clients: int,
    port: int,
    tokens: list[str],
    mode: str,
    rate: float,
    concurrency: int,
    args: argparse.Namespace,
    seq_start: int,
    seconds: float,
) -> HttpResult:
    start_at = time.time() + 1.0  # every client process is up and waiting by then
    devices = list(enumerate(tokens))
    futures = [
        pool.submit(
            _http_process,
            BASE_MS,
            port,
            devices[c::clients],
            mode,
            rate / clients,
            max(1, concurrency // clients),
            args.max_connections,
            args.request_messages,
            seq_start,
            start_at,
            seconds,
            args.request_timeout_s,
        )
        for c in range(clients)
    ]
    total = HttpResult()
    for f in futures:
        total.merge(await asyncio.wrap_future(f))
    return total


# ---------------------------------------------------------------------------------------------
# MQTT load: `mosquitto_pub -l` publishers (Mosquitto's C client: cheap next to the gateway).


class Publishers:
    """One `mosquitto_pub -l` connection per MQTT device `om-<i>`, fed lines on a schedule."""

    def __init__(self, port: int, prefix: str, count: int) -> None:
        self.port, self.prefix, self.count = port, prefix, count
        self.procs: list[asyncio.subprocess.Process] = []
        self.sent = [0] * count  # lines written to publisher i (its messages 0..sent-1)
        self.failed: list[int] = []

    async def start(self) -> None:
        for i in range(self.count):
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    *("mosquitto_pub", "-h", HOST, "-p", str(self.port), "-q", "1"),
                    *("-i", f"overload-pub-{secrets.token_hex(4)}"),
                    *("-t", f"{self.prefix}/devices/om-{i}/telemetry", "-l"),
                    stdin=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )

    @property
    def total(self) -> int:
        return sum(self.sent)

    async def feed(self, i: int, n: int) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        first = self.sent[i]
        stdin.write(b"".join(mqtt_line(k) for k in range(first, first + n)))
        self.sent[i] += n
        await stdin.drain()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()

    async def close(self, timeout_s: float) -> None:
        """End of input: each publisher sends what it has and exits after the last PUBACK."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for i, proc in enumerate(self.procs):
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                rc = -1
            if rc != 0:
                self.failed.append(i)


async def calibrate_mqtt(
    pubs: Publishers, client: httpx.AsyncClient, window: int, seconds: float, start_at: float
) -> tuple[float, int]:
    """Keep the publishers at most `window` messages ahead of what the gateway has stored;
    messages/s stored during `seconds`, and the stored count at the start."""
    base = mqtt_stored(await metrics(client))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    began = time.monotonic()
    at_start = pubs.total
    stored = 0.0
    while time.monotonic() - began < seconds:
        stored = mqtt_stored(await metrics(client)) - base
        room = int(at_start + stored + window - pubs.total)
        if room > 0:
            share = -(-room // pubs.count)
            await asyncio.gather(*(pubs.feed(i, share) for i in range(pubs.count)))
        await asyncio.sleep(0.1)
    stored = mqtt_stored(await metrics(client)) - base
    return stored / (time.monotonic() - began), int(base)


async def overload_mqtt(
    pubs: Publishers, rate: float, seconds: float, cap: int, start_at: float
) -> None:
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.monotonic()
    first = pubs.total
    while (elapsed := time.monotonic() - started) < seconds:
        due = min(int(elapsed * rate), cap) - (pubs.total - first)
        if due > 0:
            share = -(-due // pubs.count)
            await asyncio.gather(*(pubs.feed(i, share) for i in range(pubs.count)))
        await asyncio.sleep(0.01)


async def session_left(
    broker_port: int, gw: Gateway, timeout_s: float
) -> tuple[dict[str, list[bytes]], bool]:
    """What the (stopped) gateway's MQTT session still holds: messages it never acknowledged,
    by device. A marker published first is queued behind all of them (the session keeps the
    gateway's subscription), so everything has been read when it arrives. (payloads by device,
    marker seen)"""
    marker = f"{gw.prefix}/devices/zz-marker-{secrets.token_hex(3)}/telemetry".encode()
    pub = await asyncio.create_subprocess_exec(
        *("mosquitto_pub", "-h", HOST, "-p", str(broker_port), "-q", "1"),
        *("-t", marker.decode(), "-m", "x"),
    )
    await asyncio.wait_for(pub.wait(), 30)
    sub = await asyncio.create_subprocess_exec(
        *("mosquitto_sub", "-h", HOST, "-p", str(broker_port), "-V", "mqttv5"),
        *("-c", "-x", "60", "-q", "1", "-i", gw.client_id),
        *("-t", f"{gw.prefix}/devices/+/telemetry", "-F", "%t %x\\n"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        limit=64 * 1024 * 1024,
    )
    assert sub.stdout is not None
    left: dict[str, list[bytes]] = {}
    seen = False
    try:
        async with asyncio.timeout(timeout_s):
            while not seen:
                line = await sub.stdout.readline()
                if not line:
                    break
                topic, _, payload = line.strip().partition(b" ")
                if topic == marker:
                    seen = True
                elif topic:
                    device = topic.decode().split("/")[-2]
                    left.setdefault(device, []).append(bytes.fromhex(payload.decode()))
    except TimeoutError:
        pass
    finally:
        sub.terminate()
        await sub.wait()
    return left, seen


# ---------------------------------------------------------------------------------------------
# The hostile mix (--hostile).


@dataclass
class Hostile:
    big_statuses: Counter[str] = field(default_factory=Counter)
    bad_token_statuses: Counter[str] = field(default_factory=Counter)
    slow_opened: int = 0
    slow_started: float = 0.0  # time.monotonic() when the half-sent requests were opened
    slow_closed: list[tuple[float, float]] = field(default_factory=list)  # (opened, closed)
    poison_sent: int = 0
    poison_left: int = 0
    rejected_listed: int | None = None
    slow_writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def close_slow(self) -> None:
        for w in self.slow_writers:
            w.close()


async def _big_body(port: int, mb: int, result: Hostile) -> None:
    """POST /api/v1/devices without a token with an `mb` MB JSON body, streamed in 1 MB chunks."""
    size = mb * 1024 * 1024
    head = b'{"id":"big","metadata":{"blob":"'
    tail = b'"}}'
    chunk = b"x" * (1024 * 1024)
    try:
        async with asyncio.timeout(60):
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=HOSTILE_FROM)
            writer.write(
                f"POST /api/v1/devices HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {size}\r\n\r\n".encode()
                + head
            )
            answer = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
            left = size - len(head) - len(tail)
            with contextlib.suppress(OSError):
                while left > 0 and not answer.done():
                    part = chunk[: min(left, len(chunk))]
                    writer.write(part)
                    left -= len(part)
                    await writer.drain()
                if not answer.done():
                    writer.write(tail)
                    await writer.drain()
            try:
                status = (await answer)[9:12].decode()
            except (asyncio.IncompleteReadError, OSError):
                status = "connection closed"
            result.big_statuses[status] += 1
            writer.close()
    except TimeoutError:
        result.big_statuses["timeout"] += 1
    except OSError:
        result.big_statuses["connection error"] += 1


async def _bad_tokens(port: int, count: int, result: Hostile) -> None:
    conn = RawConnection(port, HOSTILE_FROM)
    body = b'{"values":{"a":1}}'
    for _ in range(count):
        head = _request_head("oh-0", "wrong-" + secrets.token_urlsafe(16), len(body))
        try:
            async with asyncio.timeout(10):
                status, _, keep = await conn.request(head, body)
            result.bad_token_statuses[str(status)] += 1
            if not keep:
                conn.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            result.bad_token_statuses["connection error"] += 1
            conn.close()
    conn.close()


async def _slow_client(port: int, kind: int, token: str, result: Hostile) -> None:
    """A client that sends part of a request and nothing more: partial headers, or a device's
    valid headers and a tenth of the body. Records when (if) the server closes the connection."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=HOSTILE_FROM)
    except OSError:
        return
    result.slow_opened += 1
    result.slow_writers.append(writer)
    opened = time.monotonic()
    if kind % 2:
        writer.write(f"POST /api/v1/devices/oh-0/telemetry HTTP/1.1\r\nHost: {HOST}\r\n".encode())
    else:
        writer.write(_request_head("oh-0", token, 1000) + b'[{"values":')
    with contextlib.suppress(OSError):
        await writer.drain()
        await reader.read()  # b"" when the server closes it (or an answer, then b"")
        result.slow_closed.append((opened, time.monotonic()))


async def poison_mqtt(broker_port: int, prefix: str, result: Hostile) -> None:
    for device, payload in POISON:
        proc = await asyncio.create_subprocess_exec(
            *("mosquitto_pub", "-h", HOST, "-p", str(broker_port), "-q", "1", "-s"),
            *("-t", f"{prefix}/devices/{device}/telemetry"),
            stdin=asyncio.subprocess.PIPE,
        )
        await proc.communicate(payload)
        result.poison_sent += proc.returncode == 0


async def hostile_mix(
    port: int,
    broker_port: int,
    prefix: str,
    token: str,
    args: argparse.Namespace,
    result: Hostile,
) -> list[asyncio.Task[None]]:
    """Start the hostile clients; the slow ones stay open until the gateway closes them."""
    await asyncio.sleep(1.0)  # with the overload
    await poison_mqtt(broker_port, prefix, result)
    result.slow_started = time.monotonic()
    tasks = [
        asyncio.create_task(_slow_client(port, k, token, result)) for k in range(args.hostile_slow)
    ]
    await asyncio.gather(
        *(_big_body(port, args.hostile_big_mb, result) for _ in range(args.hostile_big)),
        *(_bad_tokens(port, args.hostile_bad_tokens // 4, result) for _ in range(4)),
    )
    return tasks


# ---------------------------------------------------------------------------------------------
# The stored readings.


async def stored_readings(database_url: str) -> dict[tuple[str, str], set[int]]:
    """{(device, metric): {ts_us}} of every reading of this bench's devices."""
    sql = (
        "SELECT s.device_id, s.metric, r.ts FROM reading r JOIN series s ON s.id = r.series_id"
        " WHERE s.device_id LIKE 'o%'"
    )
    out: dict[tuple[str, str], set[int]] = {}
    if database_url.startswith("sqlite://"):
        con = sqlite3.connect(database_url.removeprefix("sqlite://"))
        try:
            rows: Any = con.execute(sql)
            for device, metric, ts in rows:
                out.setdefault((device, metric), set()).add(ts)
        finally:
            con.close()
        return out
    pg = await asyncpg.connect(database_url)
    try:
        for device, metric, ts in await pg.fetch(sql):
            out.setdefault((device, metric), set()).add(ts)
    finally:
        await pg.close()
    return out


# ---------------------------------------------------------------------------------------------
# One run.


@dataclass
class Run:
    database: str
    load_average: float
    sustainable_http_rps: float
    sustainable_mqtt_mps: float
    calibration_p99_ms: float
    calibration_503: int
    target_http_rps: float
    offered_http_rps: float  # requests the clients managed to schedule (sent + skipped) per s
    sent_http_rps: float
    http_2xx: int
    http_503: int
    http_429: int
    http_500: int
    http_other: int
    http_statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    client_cpu: float
    target_mqtt_mps: float
    mqtt_published: int
    mqtt_acked: int
    mqtt_stored: int
    mqtt_left_in_session: int
    mqtt_drained: bool
    mqtt_stalled: bool
    readyz_after_drain: int  # its status code after the drain; 0: no answer
    http_acked_readings: int
    http_missing: int
    mqtt_missing: int
    peak_rss_mb: float
    stop_s: float
    stop_killed: bool
    log_bytes: int
    log_tracebacks: int
    log_errors: dict[str, int]  # the most frequent exception lines of the gateway's log
    hostile: dict[str, Any] | None
    failures: list[str]


def exception_lines(log: bytes, top: int = 5) -> dict[str, int]:
    """The last line of each traceback (the exception), counted; the `top` most frequent."""
    counts: Counter[str] = Counter()
    lines = log.decode(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            if j < len(lines):
                counts[lines[j][:160]] += 1
    return dict(counts.most_common(top))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def provision(gw: Gateway, args: argparse.Namespace) -> list[str]:
    tokens = []
    async with httpx.AsyncClient(base_url=gw.base_url, headers=gw.admin, timeout=30) as client:
        for i in range(args.http_devices):
            r = await client.post("/api/v1/devices", json={"id": f"oh-{i}"})
            r.raise_for_status()
            tokens.append(r.json()["token"])
        for i in range(args.mqtt_publishers):
            (await client.post("/api/v1/devices", json={"id": f"om-{i}"})).raise_for_status()
    return tokens


async def drain(
    client: httpx.AsyncClient, pubs: Publishers, base: int, args: argparse.Namespace
) -> tuple[bool, bool]:
    """Wait until the gateway has stored every valid MQTT message, up to --drain-s; a stall is
    no progress for --stall-s while some remain. (drained, stalled)"""
    deadline = time.monotonic() + args.drain_s
    last, last_change = -1.0, time.monotonic()
    while True:
        stored = mqtt_stored(await metrics(client)) - base
        if stored >= pubs.total:
            return True, False
        now = time.monotonic()
        if stored != last:
            last, last_change = stored, now
        elif now - last_change > args.stall_s:
            return False, True
        if now > deadline:
            return False, False
        await asyncio.sleep(0.25)


async def one_run(
    database: str, args: argparse.Namespace, pool: concurrent.futures.ProcessPoolExecutor
) -> Run:
    failures: list[str] = []
    pg = Postgres(args.pg_dsn)
    with tempfile.TemporaryDirectory(prefix="fieldgate-overload-") as tmp:
        async with contextlib.AsyncExitStack() as cleanup:
            workdir = Path(tmp)
            if database == "sqlite":
                url = f"sqlite://{workdir}/gateway.db"
            else:
                pg_name, url = await pg.create()
                cleanup.push_async_callback(pg.drop, pg_name)
            broker = Broker(workdir)
            cleanup.callback(broker.stop)
            prefix = f"overload-{secrets.token_hex(4)}"
            env = dict(kv.split("=", 1) for kv in args.env)
            gw = Gateway(url, workdir, broker.port, prefix, env)
            cleanup.callback(gw.stop, args.stop_timeout_s)
            rss = RssSampler(gw.proc.pid)
            rss.start()
            pubs = Publishers(broker.port, prefix, args.mqtt_publishers)
            cleanup.callback(pubs.kill)
            hostile = Hostile() if args.hostile else None
            slow_tasks: list[asyncio.Task[None]] = []
            try:
                await gw.wait_ready()
                tokens = await provision(gw, args)
                await pubs.start()
                client = httpx.AsyncClient(base_url=gw.base_url, headers=gw.admin, timeout=30)
                async with client:
                    # 1. Calibration.
                    start_at = time.time() + 1.0
                    calib_http, (mqtt_rate, base) = await asyncio.gather(
                        run_http(
                            pool,
                            args.clients,
                            gw.port,
                            tokens,
                            "closed",
                            0.0,
                            args.calibrate_concurrency,
                            args,
                            0,
                            args.calibrate_s,
                        ),
                        calibrate_mqtt(pubs, client, args.mqtt_window, args.calibrate_s, start_at),
                    )
                    http_rate = calib_http.ok / args.calibrate_s
                    print(
                        f"  calibration: HTTP {http_rate:,.0f} req/s "
                        f"({http_rate * 2 * args.request_messages:,.0f} readings/s), p99 "
                        f"{1000 * percentile(calib_http.latencies, 0.99):.0f} ms, "
                        f"{calib_http.statuses['503']} x 503; MQTT {mqtt_rate:,.0f} msg/s stored",
                        flush=True,
                    )
                    # 2. Overload.
                    target_http = args.factor * max(http_rate, 1.0)
                    target_mqtt = args.factor * max(mqtt_rate, 1.0)
                    cap = args.mqtt_max_messages
                    jobs: list[Any] = [
                        run_http(
                            pool,
                            args.clients,
                            gw.port,
                            tokens,
                            "open",
                            target_http,
                            0,
                            args,
                            OVERLOAD_SEQ,
                            args.seconds,
                        ),
                        overload_mqtt(pubs, target_mqtt, args.seconds, cap, time.time() + 1.0),
                    ]
                    if hostile is not None:
                        jobs.append(
                            hostile_mix(gw.port, broker.port, prefix, tokens[0], args, hostile)
                        )
                    done = await asyncio.gather(*jobs)
                    over: HttpResult = done[0]
                    if hostile is not None:
                        slow_tasks = done[2]
                    await pubs.close(args.stop_timeout_s + 30)
                    if pubs.failed:
                        failures.append(f"mosquitto_pub {pubs.failed} did not finish publishing")
                    # 3. Drain.
                    drained, stalled = await drain(client, pubs, base, args)
                    try:
                        readyz = (await client.get("/readyz", timeout=10)).status_code
                    except httpx.HTTPError:
                        readyz = 0
                    if stalled:
                        failures.append(
                            f"MQTT ingestion stalled: nothing stored for {args.stall_s} s"
                            f" with messages waiting (/readyz answered {readyz})"
                        )
                    if hostile is not None:
                        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                            r = await client.get("/api/v1/rejected", params={"limit": 1000})
                            hostile.rejected_listed = len(r.json()["rejected"])
                        # The half-sent requests get until --hostile-slow-wait-s after their
                        # opening to be timed out (the gateway's body timeout is 30 s by
                        # default; the drain may end before it).
                        wait_s = hostile.slow_started + args.hostile_slow_wait_s - time.monotonic()
                        if slow_tasks and wait_s > 0:
                            await asyncio.wait(slow_tasks, timeout=wait_s)
                rss.finish()
            finally:
                rss.stopped.set()
                gw.stop(args.stop_timeout_s)
                for t in slow_tasks:
                    t.cancel()
                if hostile is not None:
                    hostile.close_slow()
            left, marker_seen = await session_left(broker.port, gw, 60.0)
            if not marker_seen:
                failures.append("the gateway's MQTT session could not be read back to the end")
            stored = await stored_readings(url)
            log_text = gw.log_path.read_bytes()
            if args.keep_logs:
                kept = Path(args.keep_logs) / f"gateway-{database}-{prefix}.log"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(gw.log_path, kept)

    # Every 2xx answer's readings are stored.
    missing_http = 0
    for index, seq in calib_http.acked + over.acked:
        for j in range(args.request_messages):
            ts_us = http_ts_ms(seq, args.request_messages, j) * 1000
            for metric in HTTP_METRICS:
                if ts_us not in stored.get((f"oh-{index}", metric), ()):
                    missing_http += 1
    # Every published MQTT message no longer in the gateway's session was acknowledged by the
    # gateway, and is stored.
    acked = missing_mqtt = in_session = stored_mqtt = 0
    for i in range(pubs.count):
        device = f"om-{i}"
        have = stored.get((device, "a"), set())
        stored_mqtt += len(have)
        waiting: set[int] = set()
        for payload in left.get(device, []):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                ts = json.loads(payload)["ts"]
                if isinstance(ts, int) and 0 <= ts - BASE_MS < pubs.sent[i]:
                    waiting.add(ts - BASE_MS)
        in_session += len(waiting)
        if i in pubs.failed:
            continue  # which of its lines reached the broker is unknown
        for n in range(pubs.sent[i]):
            if n not in waiting:
                acked += 1
                if (BASE_MS + n) * 1000 not in have:
                    missing_mqtt += 1
    if missing_http or missing_mqtt:
        failures.append(
            f"ACKNOWLEDGED READINGS MISSING: {missing_http} HTTP readings, {missing_mqtt} MQTT"
            " messages"
        )
    if over.server_errors or calib_http.server_errors:
        failures.append(
            f"HTTP 5xx other than 503 answered: {over.server_errors + calib_http.server_errors}"
        )
    if rss.peak_mb > args.rss_target_mb:
        failures.append(f"peak RSS {rss.peak_mb:.0f} MB > target {args.rss_target_mb} MB")
    hostile_report = None
    if hostile is not None:
        poison = {payload for _, payload in POISON}
        hostile.poison_left = sum(p in poison for v in left.values() for p in v)
        # Closed by the gateway while it ran (not by its shutdown), seconds after opening.
        closed = [c - o for o, c in hostile.slow_closed if c < gw.stop_started]
        hostile_report = {
            "big_bodies": dict(hostile.big_statuses),
            "bad_tokens": dict(hostile.bad_token_statuses),
            "slow_opened": hostile.slow_opened,
            "slow_closed_by_server": len(closed),
            "slow_closed_after_s_median": statistics.median(closed) if closed else None,
            "slow_closed_after_s_max": max(closed) if closed else None,
            "poison_sent": hostile.poison_sent,
            "poison_not_acknowledged": hostile.poison_left,
            "rejected_listed": hostile.rejected_listed,
        }
        if any(k.startswith(("2", "5")) for k in hostile.big_statuses):
            failures.append(
                f"hostile: unauthenticated big bodies got {hostile_report['big_bodies']}"
            )
        if over.statuses["429"] or calib_http.statuses["429"]:
            failures.append(
                "hostile: valid clients (another address than the hostile ones) were answered"
                f" 429 {over.statuses['429'] + calib_http.statuses['429']} times"
            )
        if not hostile.bad_token_statuses.get("429"):
            failures.append("hostile: wrong tokens were never throttled (no 429)")
        if len(closed) < hostile.slow_opened:
            failures.append(
                f"hostile: {hostile.slow_opened - len(closed)} of {hostile.slow_opened} half-sent"
                " requests were never timed out by the gateway"
            )
        if hostile.poison_left:
            failures.append(
                f"hostile: {hostile.poison_left} poison MQTT message(s) never acknowledged"
                " (not dead-lettered)"
            )
    if gw.killed:
        failures.append(f"the gateway did not exit within {args.stop_timeout_s} s of SIGTERM")

    lat = over.latencies
    return Run(
        database=database,
        load_average=os.getloadavg()[0],
        sustainable_http_rps=http_rate,
        sustainable_mqtt_mps=mqtt_rate,
        calibration_p99_ms=1000 * percentile(calib_http.latencies, 0.99),
        calibration_503=calib_http.statuses["503"],
        target_http_rps=target_http,
        offered_http_rps=over.due / args.seconds,
        sent_http_rps=(over.due - over.statuses["skipped"]) / args.seconds,
        http_2xx=over.ok,
        http_503=over.statuses["503"],
        http_429=over.statuses["429"],
        http_500=over.server_errors,
        http_other=sum(over.statuses.values())
        - over.ok
        - over.count("503", "429", "skipped")
        - over.server_errors,
        http_statuses=dict(over.statuses),
        p50_ms=1000 * percentile(lat, 0.50),
        p99_ms=1000 * percentile(lat, 0.99),
        client_cpu=over.cpu_s / args.seconds,
        target_mqtt_mps=target_mqtt,
        mqtt_published=pubs.total,
        mqtt_acked=acked,
        mqtt_stored=stored_mqtt,
        mqtt_left_in_session=in_session,
        mqtt_drained=drained,
        mqtt_stalled=stalled,
        readyz_after_drain=readyz,
        http_acked_readings=(len(calib_http.acked) + len(over.acked))
        * args.request_messages
        * len(HTTP_METRICS),
        http_missing=missing_http,
        mqtt_missing=missing_mqtt,
        peak_rss_mb=rss.peak_mb,
        stop_s=gw.stop_s or 0.0,
        stop_killed=gw.killed,
        log_bytes=len(log_text),
        log_tracebacks=log_text.count(b"Traceback"),
        log_errors=exception_lines(log_text),
        hostile=hostile_report,
        failures=failures,
    )


def print_run(run: Run, args: argparse.Namespace) -> None:
    print(
        f"  overload {args.seconds:.0f} s: HTTP target {run.target_http_rps:,.0f} req/s, "
        f"scheduled {run.offered_http_rps:,.0f}/s, sent {run.sent_http_rps:,.0f}/s "
        f"(client CPU {run.client_cpu:.2f} cores); answers: 2xx {run.http_2xx:,}, "
        f"503 {run.http_503:,}, 429 {run.http_429:,}, 500 {run.http_500:,}, "
        f"other {run.http_other:,} {run.http_statuses}; p50 {run.p50_ms:.0f} ms, "
        f"p99 {run.p99_ms:.0f} ms"
    )
    print(
        f"  MQTT: target {run.target_mqtt_mps:,.0f} msg/s; published {run.mqtt_published:,}, "
        f"acknowledged by the gateway {run.mqtt_acked:,}, stored {run.mqtt_stored:,}, "
        f"still in its session {run.mqtt_left_in_session:,} "
        f"({'drained' if run.mqtt_drained else 'stalled' if run.mqtt_stalled else 'not drained'}"
        f" within --drain-s; /readyz then {run.readyz_after_drain})"
    )
    print(
        f"  acknowledged and missing: HTTP {run.http_missing} of {run.http_acked_readings:,}"
        f" readings, MQTT {run.mqtt_missing} of {run.mqtt_acked:,} messages; peak RSS "
        f"{run.peak_rss_mb:.0f} MB (target {args.rss_target_mb}); stop after SIGTERM "
        f"{run.stop_s:.1f} s{' (KILLED)' if run.stop_killed else ''}; gateway log "
        f"{run.log_bytes:,} bytes, {run.log_tracebacks} tracebacks {run.log_errors}; load average "
        f"{run.load_average:.1f}"
    )
    if run.hostile is not None:
        print(f"  hostile: {run.hostile}")
    for failure in run.failures:
        print(f"  FAIL: {failure}")


async def main_async(args: argparse.Namespace) -> int:
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    runs: list[Run] = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=ctx) as pool:
        for n in range(1, args.runs + 1):
            for database in databases:
                print(f"run {n}/{args.runs} {database} (load average {os.getloadavg()[0]:.1f})")
                run = await one_run(database, args, pool)
                print_run(run, args)
                runs.append(run)
    med = statistics.median
    print(f"\nmedians of {args.runs} run(s), {args.seconds:.0f} s at {args.factor}x:")
    for database in databases:
        rs = [r for r in runs if r.database == database]
        print(
            f"  {database:<8} sustainable HTTP {med(r.sustainable_http_rps for r in rs):,.0f}"
            f" req/s, MQTT {med(r.sustainable_mqtt_mps for r in rs):,.0f} msg/s | overload: "
            f"HTTP sent {med(r.sent_http_rps for r in rs):,.0f}/s, 2xx "
            f"{med(r.http_2xx for r in rs):,.0f}, 503 {med(r.http_503 for r in rs):,.0f}, "
            f"429 {med(r.http_429 for r in rs):,.0f}, 500 {sum(r.http_500 for r in rs)}, "
            f"other {med(r.http_other for r in rs):,.0f}, p50 {med(r.p50_ms for r in rs):.0f} "
            f"ms, p99 {med(r.p99_ms for r in rs):.0f} ms | MQTT published "
            f"{med(r.mqtt_published for r in rs):,.0f}, acked {med(r.mqtt_acked for r in rs):,.0f}"
            f", stored {med(r.mqtt_stored for r in rs):,.0f} | peak RSS "
            f"{med(r.peak_rss_mb for r in rs):.0f} MB (max {max(r.peak_rss_mb for r in rs):.0f})"
            f" | missing acknowledged: {sum(r.http_missing + r.mqtt_missing for r in rs)}"
            f" | load average {med(r.load_average for r in rs):.1f}"
        )
    failed = [f for r in runs for f in r.failures]
    if args.report_json:
        report = json.dumps([asdict(r) for r in runs], indent=1)
        await asyncio.to_thread(Path(args.report_json).write_text, report)
    if failed:
        print(f"\nFAILED ({len(failed)}):")
        for f in failed:
            print(f"  {f}")
        return 1
    print("\nOK: every acknowledged reading stored, no 500, peak RSS under the target")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--database", choices=["sqlite", "postgres", "both"], default="sqlite")
    add("--seconds", type=float, default=20.0, help="length of the overload phase")
    add("--calibrate-s", type=float, default=5.0, help="length of the calibration phase")
    add("--factor", type=float, default=10.0, help="overload = factor x the sustainable rate")
    add("--runs", type=int, default=1, help="repeat and report medians")
    add("--clients", type=int, default=2, help="HTTP client processes")
    add("--calibrate-concurrency", type=int, default=8, help="HTTP requests in flight")
    add("--max-connections", type=int, default=256, help="per client process, overload")
    add("--http-devices", type=int, default=32)
    add("--request-messages", type=int, default=5, help="messages (of 2 readings) a request")
    add("--request-timeout-s", type=float, default=10.0)
    add("--mqtt-publishers", type=int, default=4)
    add("--mqtt-window", type=int, default=1000, help="calibration: messages ahead at most")
    add("--mqtt-max-messages", type=int, default=300_000, help="overload: MQTT messages at most")
    add("--drain-s", type=float, default=15.0, help="wait for the MQTT backlog at most")
    add("--stall-s", type=float, default=5.0, help="no MQTT progress this long = a stall")
    add("--stop-timeout-s", type=float, default=20.0, help="SIGTERM to SIGKILL")
    add("--rss-target-mb", type=float, default=200.0)
    add("--hostile", action="store_true", help="add the hostile mix to the overload phase")
    add("--hostile-big", type=int, default=4, help="unauthenticated big bodies, at once")
    add("--hostile-big-mb", type=int, default=50)
    add("--hostile-bad-tokens", type=int, default=2000)
    add("--hostile-slow", type=int, default=50, help="half-sent requests held open")
    add(
        "--hostile-slow-wait-s",
        type=float,
        default=45.0,
        help="before the SIGTERM, wait this long after opening them for the half-sent requests"
        " to be closed by the gateway",
    )
    add("--report-json", metavar="PATH", help="write every run's figures as JSON")
    add("--keep-logs", metavar="DIR", help="copy the gateway's log of each run into DIR")
    add("--env", action="append", default=[], metavar="NAME=VALUE", help="gateway environment")
    add(
        "--pg-dsn",
        default=os.environ.get("FIELDGATE_BENCH_PG", f"postgres://postgres@{HOST}:5432/test"),
        help="admin connection to the local PostgreSQL (throwaway databases are made there)",
    )
    args = parser.parse_args()
    if "127.0.0.1" not in args.pg_dsn and "localhost" not in args.pg_dsn:
        parser.error("--pg-dsn must point at 127.0.0.1")
    for binary in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(binary) is None:
            parser.error(f"{binary} is needed (apt-get install mosquitto mosquitto-clients)")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
