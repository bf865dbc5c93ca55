"""Single-reading requests from many connections, by a C load generator (issue 11's yardstick).

`wrk` (`apt-get install wrk`; the bench stops with that message when it is missing: a Python
client would measure itself, not the server) posts `{"values": {"t": 21.5}}` with a device token
from `--connections` keep-alive connections on `--threads` threads for `--duration` seconds,
against, in one run and one after another:

- `fieldgate serve` on a fresh SQLite file and on a throwaway PostgreSQL database
  (`--databases`), one device, its token (`--devices N`: N devices, each wrk thread posting
  for each in turn, from requests formatted once; the bare app gets the same paths); every
  request must answer 200; once for each
  count of worker processes in `--workers` (`fieldgate serve --workers N`: a row per N);
- a bare FastAPI app on the same FastAPI and uvicorn: it reads the body, `orjson.loads` it and
  answers a fixed JSON, the least any endpoint does (the "framework's own speed");
- InfluxDB 1.6 (`influxd`, when installed), one line protocol line a request on `/write`.

It prints requests/s, p50 and p99 latency (wrk's `--latency` distribution), the server's CPU
time per request answered (all its processes: steadier than requests/s on a shared machine), the
count of non-2xx answers, and the ratios of fieldgate to the bare app and to InfluxDB measured in
the same run (`--peers` leaves either out); `--runs` repeats everything (medians). Only 127.0.0.1
is contacted; every wait has a deadline.

`--pace MS` makes each connection wait MS milliseconds between requests: a load below the
server's capacity (64 connections at 25 ms offer at most 2,560 requests/s), whose p99 is the
latency a fleet sees at a rate the gateway keeps up with; unpaced, every server is saturated and
the p99 measures how fairly it queues.

`--source DIR` runs fieldgate from another checkout's source tree (on `PYTHONPATH`, under this
checkout's entry point and virtualenv), so that what a change bought is measured by one script:
`git worktree add --detach /tmp/at-X X`, then `--source /tmp/at-X`.

    .venv/bin/python bench/requests.py                                    # both databases
    .venv/bin/python bench/requests.py --databases sqlite --duration 5 --runs 1
    .venv/bin/python bench/requests.py --workers 1,2 --runs 3          # scaling with workers
    .venv/bin/python bench/requests.py --source /tmp/at-45c799c --peers bare   # an earlier commit
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import rig
import storage

BODY = '{"values": {"t": 21.5}}'
BARE_APP = """
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()
ANSWER = b'{"accepted":1,"duplicates":0,"rejected":[]}'


@app.post("/api/v1/devices/{device_id}/telemetry")
async def telemetry(device_id: str, request: Request) -> Response:
    orjson.loads(await request.body())
    return Response(ANSWER, media_type="application/json")
"""
LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "{content_type}"
{auth}
"""
# Several devices: each wrk thread takes them in turn, from requests formatted once.
LUA_MANY = """
local targets = {{{targets}}}
local prepared = {{}}
local n = 0
init = function(args)
  for i, t in ipairs(targets) do
    prepared[i] = wrk.format("POST", t[1],
      {{["Content-Type"] = "{content_type}", ["Authorization"] = t[2]}}, '{body}')
  end
end
request = function()
  n = n % #prepared + 1
  return prepared[n]
end
"""


@dataclass(frozen=True)
class Result:
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    cpu_us: float  # the server's CPU (all its processes) per request answered


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its descendants (the workers of `serve --workers N`)."""
    total = rig.cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_cpu_seconds(int(child))
    return total


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    name: str,
    url: str,
    args: argparse.Namespace,
    *,
    auth: str,
    content_type: str,
    body: str,
    targets: list[tuple[str, str]] | None = None,
    pid: int,
) -> Result:
    """wrk against `url`; with `targets` ((path, Authorization) pairs), against each in turn;
    the CPU the server `pid` spent on it."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        if targets:
            listed = ", ".join(f'{{"{path}", "{auth}"}}' for path, auth in targets)
            f.write(LUA_MANY.format(targets=listed, body=body, content_type=content_type))
        else:
            header = f'wrk.headers["Authorization"] = "{auth}"' if auth else ""
            f.write(LUA.format(body=body, content_type=content_type, auth=header))
        if args.pace:  # each connection waits this long before its next request
            f.write(f"\ndelay = function() return {args.pace} end\n")
        script = f.name
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s"]
    cmd += ["--latency", "-s", script, url]
    cpu = tree_cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60).stdout
    cpu = tree_cpu_seconds(pid) - cpu
    Path(script).unlink()
    answered = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Result(name, rps, p50, p99, int(bad.group(1)) if bad else 0, cpu / answered * 1e6)


def fieldgate(kind: str, workers: int, workdir: Path, args: argparse.Namespace) -> Result:
    pg = rig.Postgres(rig.PG_ADMIN_DSN)
    name = ""
    if kind == "sqlite":
        url = f"sqlite://{workdir / 'fieldgate.db'}"
    else:
        name, url = asyncio.run(pg.create())
    # SQLite: `serve` refuses workers unless told (HTTP measured no faster: this bench).
    env = {"FIELDGATE_WORKERS": str(workers), "FIELDGATE_WORKERS_ON_SQLITE": "true"}
    if args.source:  # another checkout's gateway, under this checkout's entry point
        env["PYTHONPATH"] = str(args.source)
    gateway = rig.Gateway(url, workdir, env)
    try:
        asyncio.run(gateway.wait_ready())
        tokens = []
        for i in range(args.devices):
            r = httpx.post(
                gateway.base_url + "/api/v1/devices",
                json={"id": f"d{i:02}"},
                headers={"Authorization": f"Bearer {gateway.admin_token}"},
            )
            r.raise_for_status()
            tokens.append(r.json()["token"])
            # Its first post makes the device's series: the run measures the steady state.
            r = httpx.post(
                f"{gateway.base_url}/api/v1/devices/d{i:02}/telemetry",
                content=BODY,
                headers={"Authorization": f"Bearer {tokens[-1]}"},
            )
            r.raise_for_status()
        token = tokens[0]
        return run_wrk(
            f"fieldgate {kind}" + (f" w{workers}" if len(args.workers) > 1 else ""),
            gateway.base_url + "/api/v1/devices/d00/telemetry",
            args,
            auth=f"Bearer {token}",
            content_type="application/json",
            body=BODY,
            targets=many(args, tokens),
            pid=gateway.proc.pid,
        )
    finally:
        gateway.stop()
        if name:
            asyncio.run(pg.drop(name))


def many(args: argparse.Namespace, tokens: list[str]) -> list[tuple[str, str]] | None:
    """With `--devices` > 1, each device's (path, Authorization), for wrk to take in turn."""
    if args.devices == 1:
        return None
    return [
        (f"/api/v1/devices/d{i:02}/telemetry", f"Bearer {token}") for i, token in enumerate(tokens)
    ]


def bare(workdir: Path, args: argparse.Namespace) -> Result:
    (workdir / "bare_app.py").write_text(BARE_APP)
    port = rig.free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port)]
    cmd += ["--host", rig.HOST, "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=workdir)
    try:
        base = f"http://{rig.HOST}:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(base + "/api/v1/devices/d00/telemetry", content=BODY, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        return run_wrk(
            "bare FastAPI",
            base + "/api/v1/devices/d00/telemetry",
            args,
            auth="Bearer x",
            content_type="application/json",
            body=BODY,
            targets=many(args, ["x"] * args.devices),
            pid=proc.pid,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def influx(workdir: Path, args: argparse.Namespace) -> Result:
    store = storage.Influx()
    store.start(workdir)
    assert store.proc is not None
    try:
        return run_wrk(
            "InfluxDB",
            f"{store.url}/write?db={storage.INFLUX_DB}&precision=s",
            args,
            auth="",
            content_type="text/plain",
            body="sensor,device=d00 t=21.5",
            pid=store.proc.pid,
        )
    finally:
        store.stop()


def one_run(args: argparse.Namespace) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-requests-") as tmp:
        for i, kind in enumerate(args.databases):
            for workers in args.workers:
                workdir = Path(tmp) / f"fg{i}-w{workers}"
                workdir.mkdir()
                results.append(fieldgate(kind, workers, workdir, args))
        if "bare" in args.peers:
            bare_dir = Path(tmp) / "bare"
            bare_dir.mkdir()
            results.append(bare(bare_dir, args))
        if "influxdb" in args.peers and shutil.which("influxd"):
            influx_dir = Path(tmp) / "influx"
            influx_dir.mkdir()
            results.append(influx(influx_dir, args))
    for r in results:
        print(f"  {r.target:<22} {r.rps:>10,.0f} req/s  p50 {r.p50_ms:>7.2f} ms"
              f"  p99 {r.p99_ms:>7.2f} ms  {r.cpu_us:>5.0f} us CPU a request"
              f"  non-2xx {r.non_2xx}", flush=True)  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--databases", type=lambda t: t.split(","), default=["sqlite", "postgres"])
    ap.add_argument(
        "--workers",
        type=lambda t: [int(n) for n in t.split(",")],
        default=[1],
        help="worker processes of fieldgate serve, a list: 1,2 measures each",
    )
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices posting, taken in turn by each wrk thread (the bare app gets the same paths)",
    )
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=int, default=15, help="seconds a target")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument(
        "--pace",
        type=int,
        default=0,
        help="milliseconds each connection waits between requests (0: none, the saturating "
        "load); paced, 64 connections offer at most 64 / (pace + latency) requests a second: "
        "the latency of a load the server keeps up with",
    )
    ap.add_argument(
        "--peers",
        type=lambda t: [p for p in t.split(",") if p],
        default=["bare", "influxdb"],
        help="the reference servers measured in each run: bare,influxdb (or fewer)",
    )
    ap.add_argument(
        "--source",
        type=Path,
        help="run fieldgate from another checkout's source tree (a git worktree of an earlier "
        "commit): what a change bought, measured by one script",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/requests.py needs wrk, a C load generator: apt-get install wrk")
    if "influxdb" in args.peers and not shutil.which("influxd"):
        print("InfluxDB is not installed (apt-get install influxdb): its row is left out")
    runs = []
    for n in range(args.runs):
        print(f"run {n + 1}/{args.runs}", flush=True)
        runs.append({r.target: r for r in one_run(args)})
    print(f"\nmedians of {len(runs)} run(s); ratios from each run's own figures")
    for target in runs[0]:
        rps = statistics.median(run[target].rps for run in runs)
        p99 = statistics.median(run[target].p99_ms for run in runs)
        cpu = statistics.median(run[target].cpu_us for run in runs)
        line = f"  {target:<22} {rps:>10,.0f} req/s  p99 {p99:>7.2f} ms  {cpu:>5.0f} us CPU"
        if target.startswith("fieldgate"):
            one = re.sub(r" w\d+$", " w1", target)
            if one != target and one in runs[0]:
                ratio = statistics.median(run[target].rps / run[one].rps for run in runs)
                line += f"  {ratio:.2f}x w1"
            for peer in ("bare FastAPI", "InfluxDB"):
                if peer in runs[0]:
                    ratio = statistics.median(run[target].rps / run[peer].rps for run in runs)
                    line += f"  {ratio:.2f}x {peer}"
        print(line)


if __name__ == "__main__":
    main()
