"""The benchmarks' rig: a real `fieldgate serve` on a free port, throwaway PostgreSQL databases,
and a minimal keep-alive HTTP client, shared by bench/ingest_http.py and bench/storage.py.

Bench scripts run as `python bench/<name>.py`, so `bench/` is on `sys.path` and they
`import rig`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
FIELDGATE = Path(sys.executable).parent / "fieldgate"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PG_ADMIN_DSN = os.environ.get("FIELDGATE_BENCH_PG", f"postgres://postgres@{HOST}:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Gateway:
    """`fieldgate serve` on a free port, with its own admin token, in a scratch directory."""

    def __init__(self, database_url: str, workdir: Path, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.admin_token = secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "FIELDGATE_DATABASE_URL": database_url,
            "FIELDGATE_ADMIN_TOKEN": self.admin_token,
            "FIELDGATE_MQTT_URL": "",
            **extra_env,
        }
        self.log = (workdir / "gateway.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(FIELDGATE),
                "serve",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=workdir,  # no stray .env file is read
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"fieldgate serve exited with {self.proc.returncode}")
                try:
                    if (await client.get("/readyz", timeout=2.0)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"fieldgate serve was not ready within {timeout_s} s")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on one asyncio stream (`--client raw`): a fraction of
    httpx's CPU per request, to tell the gateway's limits from the client's."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(
        self, path: str, token: str | None, body: bytes, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """POST `body` (with a bearer token if given); the status and the answer's body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{auth}"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


class Postgres:
    """Throwaway databases on the local server, made and dropped through the admin database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn  # postgres://user@127.0.0.1:5432/db: the admin connection
        self.base = dsn.rsplit("/", 1)[0]

    async def _admin(self, sql: str) -> None:
        con = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await con.execute(sql)
        finally:
            await con.close()

    async def create(self) -> tuple[str, str]:
        name = f"fg_bench_{os.getpid()}_{secrets.token_hex(3)}"
        await self._admin(f'CREATE DATABASE "{name}"')
        return name, f"{self.base}/{name}"

    async def drop(self, name: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @staticmethod
    async def count(url: str) -> int:
        con = await asyncpg.connect(url)
        try:
            return int(await con.fetchval("SELECT count(*) FROM reading"))
        finally:
            await con.close()
