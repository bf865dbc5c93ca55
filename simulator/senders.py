"""`--processes N`: the fleet's sending split across N sender processes.

One Python process builds, sends and accounts for roughly 18,000 single-reading HTTP requests or
10,000 single-message MQTT publishes a second on this repository's 2-core machine (bench/README.md,
"Simulator"): about what one gateway takes, so a run could measure the simulator instead. The
parent provisions every device once, then starts N children (`simulator.senders.main`);
child k sends for the devices `k, k + N, ...` taken in pairs (device i goes to (i // 2) % N), so
with `--protocol mixed` (odd devices on MQTT) each child has devices of both kinds and the ramp-up
is spread evenly. Each child has its own HTTP lanes (`--concurrency` / N, rounded up) and broker
connections (`--mqtt-connections` / N, rounded up), runs the backfill, live and re-send phases
for its devices, and sends back its counts, latencies, the tallies of what was acknowledged and
its schedule record; the parent merges them and verifies and reports as for one process.

The pipes: the parent writes the child's share as one frame (4-byte length, pickle) on its stdin,
then lines: `go` (start sending; every child is connected by then) and `stop` (Ctrl-C: finish
what is in flight). The child answers frames on its stdout: `ready`, `progress` (for the live
table), then `done` with its result or `failed` with the reason. A child ignores SIGINT (Ctrl-C
reaches the whole process group; the parent decides) and abandons its run when its stdin closes,
so it never outlives the parent. A child that fails fails the run (SenderFailed, with its reason);
the others are killed, and every child is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import pickle
import signal
import struct
import sys
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from rich.console import Console

from simulator.fleet import Ledger, Tally
from simulator.report import Stats
from simulator.schedule import ProcessSchedule

if TYPE_CHECKING:
    from simulator.run import Simulation, SimulationConfig

Key = tuple[str, str]
_LENGTH: Final = struct.Struct(">I")
# The child runs this very code: the parent's `simulator` package comes first on its path, not
# whatever a `simulator` in the current directory is.
_CHILD: Final = (
    sys.executable,
    "-c",
    "import sys; sys.path.insert(0, sys.argv[1]); from simulator.senders import main; main()",
    str(Path(__file__).resolve().parent.parent),
)
PROGRESS_EVERY_S: Final = 0.5
ABANDON_AFTER_S: Final = 5.0  # a child whose parent is gone exits by then at the latest


class SenderFailed(Exception):
    """A sender process failed or died; the message says which and why."""


@dataclass(slots=True)
class Share:
    """What a child is told: the settings, its devices (global indices) and their tokens."""

    config: SimulationConfig
    indices: list[int]
    tokens: list[str]
    progress: bool


@dataclass(slots=True)
class ShareResult:
    stats: Stats
    mqtt_latencies_ms: array[float]
    series: dict[Key, Tally]
    error_notices: Counter[str]
    schedule: ProcessSchedule


def partition(devices: int, processes: int) -> list[list[int]]:
    """Device indices per process (see the module docstring)."""
    return [[i for i in range(devices) if (i // 2) % processes == k] for k in range(processes)]


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(n))


# -- the parent ------------------------------------------------------------------------------


class Senders:
    """The parent's side: start the children, relay go/stop, merge their results into `sim`."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.procs: list[asyncio.subprocess.Process] = []
        self._ready = 0
        self._all_ready = asyncio.Event()
        self._progress: dict[int, tuple[int, int, int, int, list[float]]] = {}

    def stop(self) -> None:
        """Ctrl-C: each child stops starting batches and finishes what is in flight."""
        for proc in self.procs:
            if proc.stdin is not None and proc.returncode is None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(b"stop\n")

    async def run(self) -> None:
        sim = self.sim
        cfg = sim.config
        n = cfg.processes
        child_config = dataclasses.replace(
            cfg,
            processes=1,
            progress=False,
            report_json=None,
            verify=False,
            concurrency=math.ceil(cfg.concurrency / n),
            mqtt_connections=math.ceil(cfg.mqtt_connections / n),
        )
        tokens = [d.token for d in sim.devices]
        sim.stats.phase = f"starting {n} sender processes"
        followers: list[asyncio.Task[ShareResult]] = []
        try:
            for k, indices in enumerate(partition(cfg.devices, n)):
                proc = await asyncio.create_subprocess_exec(
                    *_CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
                self.procs.append(proc)
                assert proc.stdin is not None
                share = Share(child_config, indices, [tokens[i] for i in indices], cfg.progress)
                proc.stdin.write(_frame(share))
                followers.append(asyncio.create_task(self._follow(k, proc)))
            ready = asyncio.create_task(self._all_ready.wait())
            await asyncio.wait([ready, *followers], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            for task in followers:
                if task.done():
                    task.result()  # a child failed before it was ready: raises its reason
            sim.stats.phase = "sending"
            for proc in self.procs:
                assert proc.stdin is not None
                with contextlib.suppress(OSError, RuntimeError):  # died: its follower says why
                    proc.stdin.write(b"stop\n" if sim.stopping else b"go\n")
            results = await asyncio.gather(*followers)
        finally:
            for task in followers:
                task.cancel()
            await self._reap()
        self._merge(results)

    async def _follow(self, k: int, proc: asyncio.subprocess.Process) -> ShareResult:
        """The child's frames until its result; SenderFailed when it fails or dies."""
        assert proc.stdout is not None
        while True:
            try:
                kind, payload = await _read_frame(proc.stdout)
            except asyncio.IncompleteReadError:
                code = await proc.wait()
                raise SenderFailed(
                    f"sender process {k} (pid {proc.pid}) exited with status {code}"
                    " before sending its report"
                ) from None
            if kind == "ready":
                self._ready += 1
                if self._ready == self.sim.config.processes:
                    self._all_ready.set()
            elif kind == "progress":
                self._progress[k] = payload
                self._show_progress()
            elif kind == "done":
                await proc.wait()
                assert isinstance(payload, ShareResult)
                return payload
            else:
                await proc.wait()
                raise SenderFailed(f"sender process {k} (pid {proc.pid}) failed: {payload}")

    async def _reap(self) -> None:
        """Every child ends here: killed if still running (a failure elsewhere, a second
        Ctrl-C), and waited for."""
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()

    def _show_progress(self) -> None:
        """The live table's figures: the children's latest counts (the final ones replace them)."""
        stats = self.sim.stats
        snaps = list(self._progress.values())
        stats.sent = sum(s[0] for s in snaps)
        stats.accepted = sum(s[1] for s in snaps)
        stats.rejected_by_code = Counter({"": sum(s[2] for s in snaps)})
        stats.errors = sum(s[3] for s in snaps)
        stats.latencies_ms = array("d", (x for s in snaps for x in s[4]))

    def _merge(self, results: list[ShareResult]) -> None:
        sim = self.sim
        merged = Stats(sim.stats.protocol, sim.stats.devices, sim.stats.latency_kind)
        series: dict[Key, Tally] = {}
        for r in results:
            merged.merge(r.stats)
            sim.mqtt_latencies_ms.extend(r.mqtt_latencies_ms)
            series.update(r.series)
            sim.error_notices.update(r.error_notices)
        merged.started = min(r.stats.started for r in results)  # CLOCK_MONOTONIC: machine-wide
        merged.finished = max(r.stats.finished or r.stats.started for r in results)
        merged.phase = sim.stats.phase
        for f in dataclasses.fields(Stats):
            setattr(sim.stats, f.name, getattr(merged, f.name))
        sim.ledger = Ledger(series)
        sim.schedules = [r.schedule for r in results]


# -- a child ---------------------------------------------------------------------------------


def _send(fd: int, obj: Any) -> None:
    data = memoryview(_frame(obj))
    while data:
        data = data[os.write(fd, data) :]


def _read_share() -> Share:
    """The first frame on stdin, read unbuffered (the command lines after it are the loop's)."""

    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = os.read(0, n - len(out))
            if not chunk:
                raise EOFError("stdin closed before the share was read")
            out += chunk
        return out

    (n,) = _LENGTH.unpack(exactly(_LENGTH.size))
    share = pickle.loads(exactly(n))
    assert isinstance(share, Share)
    return share


async def _run_share(share: Share, out: int) -> ShareResult:
    from simulator.gateway_api import GatewayApi
    from simulator.run import Simulation

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    cfg = share.config
    sim = Simulation(cfg, Console(stderr=True), indices=share.indices)
    for dev, token in zip(sim.devices, share.tokens, strict=True):
        dev.token = token
    sim.begin()
    go = loop.create_future()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)

    async def follow_parent() -> None:
        while line := await commands.readline():
            if not go.done():
                go.set_result(None)
            if line.strip() == b"stop":
                sim.stop()
        main.cancel()  # stdin closed: the parent is gone or gave up; abandon the run
        loop.call_later(ABANDON_AFTER_S, os._exit, 1)

    async def report_progress() -> None:
        s = sim.stats
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            recent = list(s.latencies_ms[-500:])
            _send(out, ("progress", (s.sent, s.accepted, s.rejected, s.errors, recent)))

    async def ready() -> None:
        _send(out, ("ready", None))
        await go

    helpers = [asyncio.create_task(follow_parent())]
    if share.progress:
        helpers.append(asyncio.create_task(report_progress()))
    try:
        if not cfg.dry_run:
            sim.api = GatewayApi(cfg.gateway, cfg.admin_token, concurrency=cfg.concurrency)
        await sim.send_all(ready)
    finally:
        for task in helpers:
            task.cancel()
        if sim.api is not None:
            await sim.api.aclose()
    mine = {d.id for d in sim.devices}
    return ShareResult(
        stats=sim.stats,
        mqtt_latencies_ms=sim.mqtt_latencies_ms,
        series=Ledger.of(sim.devices).series,
        error_notices=Counter({d: n for d, n in sim.error_notices.items() if d in mine}),
        schedule=sim.schedule,
    )


def main() -> None:
    """A sender process (started by the parent, not by hand)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.dup(1)  # frames only: anything else printed goes to stderr
    os.dup2(2, 1)
    runner_kwargs: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import uvloop

        runner_kwargs["loop_factory"] = uvloop.new_event_loop
    try:
        share = _read_share()
        with asyncio.Runner(**runner_kwargs) as runner:
            result = runner.run(_run_share(share, out))
    except BaseException as exc:  # whatever it is, the parent is told why
        reason = "".join(traceback.format_exception_only(exc)).strip()
        if not isinstance(exc, asyncio.CancelledError):
            where = traceback.extract_tb(exc.__traceback__)[-3:]
            reason += " (at " + "; ".join(f"{f.filename}:{f.lineno}" for f in where) + ")"
        with contextlib.suppress(OSError):
            _send(out, ("failed", reason))
        sys.exit(1)
    _send(out, ("done", result))
