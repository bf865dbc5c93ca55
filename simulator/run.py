"""One simulation run: provision, backfill, live load, re-sends, verify, report.

Each device is one asyncio task that sleeps until its next batch is due, builds the batch's
body in one go and sends it; at most `concurrency` HTTP requests are in flight (the rest wait
for a slot), and MQTT devices share a few broker connections. A device's measurement times sit
on a regular grid (`1 / rate` apart, starting at a random phase and spread over `--ramp-up`);
the send of each batch is jittered on top, so devices never fire together.

With `--processes N` the sending is done by N child processes, each running this same code for
its share of the devices (simulator/senders.py); provisioning, verification and the report stay
here.

Ctrl-C sets a stop flag: no new batch starts, requests in flight finish (no retries), and the
report covers what was sent; a second Ctrl-C abandons the run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import orjson
from rich.console import Console
from rich.live import Live

from simulator.faults import ALL_KINDS, FaultKind
from simulator.fleet import Faults, Ledger, Payload, SimDevice
from simulator.gateway_api import GatewayApi, GatewayError
from simulator.profile import Profile
from simulator.report import LiveView, Stats, Verification, build_report, print_summary
from simulator.schedule import ProcessSchedule, verdict
from simulator.senders import SenderFailed, Senders
from simulator.verify import verify

Protocol = Literal["http", "mqtt", "mixed"]
MAX_RATE: Final = 1000.0  # messages per second per device: timestamps are whole milliseconds
GENERATE_AHEAD: Final = 64  # grid times whose readings a device generates in one go
PROBE_EVERY_S: Final = 0.1
PROBES_IN_FLIGHT: Final = 4
PROBE_TIMEOUT_S: Final = 30.0


@dataclass(slots=True)
class SimulationConfig:
    gateway: str = "http://127.0.0.1:8000"
    admin_token: str = ""
    devices: int = 10
    device_prefix: str = "sim-"
    rate: float = 1.0  # messages per second per device
    duration_s: float = 60.0
    protocol: Protocol = "http"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_ca: Path | None = None  # mqtts://: trust this CA file instead of the system's
    mqtt_prefix: str = ""
    mqtt_connections: int = 4
    mqtt_as_devices: bool = False  # a connection per device, as itself (its id and token)
    qos: int = 1
    batch: int = 1  # messages per HTTP request / MQTT payload
    concurrency: int = 64  # HTTP requests in flight at most
    ramp_up_s: float = 0.0
    jitter: float = 0.2  # send-time jitter, as a fraction of a batch's interval (at most 1 s)
    backfill_s: float = 0.0
    backfill_batch: int = 0  # messages per body while backfilling (0: about 10,000 readings)
    bad_ratio: float = 0.0
    duplicate_ratio: float = 0.0
    fault_kinds: tuple[FaultKind, ...] = ALL_KINDS
    dropout: float = 0.0
    profile: Profile = field(default_factory=Profile)
    seed: int = 0
    verify: bool = False
    verify_mode: Literal["exact", "aggregate"] = "exact"
    settle_s: float | None = None  # how long verify waits for storage to catch up (MQTT)
    report_json: Path | None = None
    progress: bool = True
    dry_run: bool = False  # build every payload, send none: the simulator's own ceiling
    max_messages: int = 10_000  # the gateway's per-request limits
    max_bytes: int = 4 * 1024 * 1024
    processes: int = 1  # sender processes the fleet is split across (simulator/senders.py)

    def check(self) -> None:
        """Refuse settings that cannot work, with the reason."""
        if self.protocol not in ("http", "mqtt", "mixed"):
            raise ValueError("--protocol must be http, mqtt or mixed")
        if self.verify_mode not in ("exact", "aggregate"):
            raise ValueError("--verify-mode must be exact or aggregate")
        if self.devices < 1:
            raise ValueError("--devices must be at least 1")
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"--rate must be above 0 and at most {MAX_RATE:.0f} per device")
        if self.max_messages < 1 or self.max_bytes < 1024:
            raise ValueError("--max-messages must be at least 1, --max-body-bytes at least 1024")
        if self.batch < 1 or self.batch > self.max_messages:
            raise ValueError(f"--batch must be from 1 to {self.max_messages}")
        for name in ("bad_ratio", "duplicate_ratio", "dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be from 0 to 1")
        if self.qos not in (0, 1):
            raise ValueError("--qos must be 0 or 1")
        if self.duration_s < 0 or self.backfill_s < 0 or self.ramp_up_s < 0:
            raise ValueError("--duration, --backfill and --ramp-up cannot be negative")
        if self.concurrency < 1 or self.mqtt_connections < 1:
            raise ValueError("--concurrency and --mqtt-connections must be at least 1")
        if not 1 <= self.processes <= self.devices:
            raise ValueError("--processes must be from 1 to the number of devices")
        if self.mqtt_ca is not None and not self.mqtt_url.startswith("mqtts://"):
            raise ValueError("--mqtt-ca is for TLS: --mqtt must start with mqtts://")
        if self.mqtt_ca is not None and not self.mqtt_ca.is_file():
            raise ValueError(f"--mqtt-ca: {self.mqtt_ca} is not a file")


_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")


def parse_seconds(text: str) -> float:
    """Seconds in `90`, `90s`, `15m`, `24h`, `7d` or sums like `1h30m`."""
    text = text.strip()
    parts = list(_DURATION.finditer(text))
    if (
        not text
        or "".join(p.group(0) for p in parts) != text
        or (len(parts) > 1 and any(p.group(2) is None for p in parts))
    ):
        raise ValueError(f"{text!r} is not a duration (use e.g. 60, 90s, 15m, 24h, 1h30m)")
    return sum(float(p.group(1)) * _UNIT_S[p.group(2) or "s"] for p in parts)


def parse_processes(text: str, devices: int) -> int:
    """`--processes`: a count, or `auto` for one per core (at most one per device)."""
    if text.strip() == "auto":
        return max(1, min(os.cpu_count() or 1, devices))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--processes must be a number or auto, not {text!r}") from None


def device_ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


class Simulation:
    """One run; or, in a sender process (`indices`), its share of the fleet's sending."""

    def __init__(
        self,
        config: SimulationConfig,
        console: Console | None = None,
        *,
        indices: list[int] | None = None,
    ) -> None:
        config.check()
        self.config = config
        self.console = console or Console(stderr=True)
        self.indices = list(range(config.devices)) if indices is None else indices
        ids = device_ids(config.device_prefix, config.devices)
        profile = config.profile.with_dropout(config.dropout)
        faults = Faults(config.bad_ratio, config.duplicate_ratio, config.fault_kinds)
        self.devices = [
            SimDevice(
                d,
                profile,
                config.seed,
                faults,
                max_messages=config.max_messages,
                max_bytes=config.max_bytes,
            )
            for d in (ids[i] for i in self.indices)
        ]
        self.protocols = [self._protocol_of(i) for i in self.indices]
        self.stats = Stats(config.protocol, config.devices)
        if config.protocol != "http":
            self.stats.latency_kind = (
                "publish-to-queryable"
                if config.protocol == "mqtt"
                else "http: request-to-response; mqtt: publish-to-queryable"
            )
        self.mqtt_latencies_ms: array[float] = array("d")
        self.ledger = Ledger()
        self.schedule = ProcessSchedule()
        self.schedules: list[ProcessSchedule] = [self.schedule]  # one per sender process
        self.senders: Senders | None = None
        self.fresh: set[str] = set()
        self.error_notices: Counter[str] = Counter()  # the gateway's MQTT error notices
        self.interrupted = False
        self.api: GatewayApi | None = None
        self.mqtt: Any = None
        self._stop: asyncio.Future[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._last_probe = 0.0
        self._started_us = 0

    def _protocol_of(self, index: int) -> str:
        if self.config.protocol == "mixed":
            return "mqtt" if index % 2 else "http"
        return self.config.protocol

    # -- control -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.done()

    def stop(self) -> None:
        """Stop starting batches (Ctrl-C); what is in flight finishes."""
        self.interrupted = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        if self.senders is not None:
            self.senders.stop()

    async def _pause(self, delay: float) -> bool:
        """Sleep `delay` seconds unless stopped first; False when stopped."""
        assert self._stop is not None
        if delay > 0 and not self._stop.done():
            await asyncio.wait([self._stop], timeout=delay)
        elif self.config.dry_run:  # behind, and nothing else yields in a dry run: let others run
            await asyncio.sleep(0)
        return not self._stop.done()

    # -- sending -------------------------------------------------------------------------

    async def _send(self, index: int, dev: SimDevice, payload: Payload) -> None:
        stats = self.stats
        stats.payload_sent(payload)
        if self.config.dry_run:
            stats.accepted += payload.valid
            if payload.bad:
                stats.rejected_by_code.update(payload.expected_codes)
            dev.acknowledged(payload)
            return
        if self.protocols[index] == "http":
            await self._send_http(dev, payload)
        else:
            await self._send_mqtt(index, dev, payload)

    async def _send_http(self, dev: SimDevice, payload: Payload) -> None:
        assert self.api is not None
        stats = self.stats
        outcome = await self.api.post_telemetry(
            dev.id, dev.token, payload.body, stopping=lambda: self.stopping
        )
        stats.retries += outcome.retries
        if not outcome.ok:
            stats.errors += 1
            stats.error_kinds[outcome.error or "unknown"] += 1
            return
        stats.accepted += outcome.accepted + outcome.duplicates
        stats.stored_new += outcome.accepted
        stats.duplicates_reported += outcome.duplicates
        stats.rejected_by_code.update(outcome.rejected)
        stats.latencies_ms.append(outcome.latency_s * 1000.0)
        dev.acknowledged(payload)

    async def _send_mqtt(self, index: int, dev: SimDevice, payload: Payload) -> None:
        import aiomqtt

        stats = self.stats
        started = time.perf_counter()
        try:
            await self.mqtt.publish(index, dev.id, payload.body)
        except aiomqtt.MqttError as exc:
            stats.errors += 1
            stats.error_kinds[f"mqtt: {type(exc).__name__}"] += 1
            return
        stats.accepted += payload.valid
        dev.acknowledged(payload)
        if payload.probe is not None:
            now = time.monotonic()
            if len(self._probes) < PROBES_IN_FLIGHT and now - self._last_probe >= PROBE_EVERY_S:
                self._last_probe = now
                task = asyncio.create_task(self._probe(dev.id, *payload.probe, started))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, device_id: str, metric: str, ts_us: int, started: float) -> None:
        """Publish-to-queryable: poll the read API until the reading is there."""
        assert self.api is not None
        deadline = started + PROBE_TIMEOUT_S
        while (now := time.perf_counter()) < deadline:
            with contextlib.suppress(httpx.HTTPError, orjson.JSONDecodeError, KeyError):
                if await self.api.has_reading(device_id, metric, ts_us):
                    ms = (time.perf_counter() - started) * 1000.0
                    self.stats.latencies_ms.append(ms)
                    self.mqtt_latencies_ms.append(ms)
                    return
            # every 20 ms at first, then every tenth of the time waited so far: the latency is
            # known to within ~10% without polling a lagging gateway hundreds of times
            await asyncio.sleep(min(max(0.02, (now - started) / 10), 1.0))
        self.stats.probes_lost += 1

    # -- phases --------------------------------------------------------------------------

    async def _provision(self) -> None:
        assert self.api is not None
        api = self.api
        await api.check()
        slots = asyncio.Semaphore(min(self.config.concurrency, 32))

        async def one(dev: SimDevice) -> None:
            async with slots:
                dev.token, created = await api.ensure_device(dev.id)
            if created:
                self.fresh.add(dev.id)

        await asyncio.gather(*(one(d) for d in self.devices))

    async def _backfill_device(self, index: int, dev: SimDevice, end_ms: int) -> None:
        cfg = self.config
        interval = 1000.0 / cfg.rate
        n = int(cfg.backfill_s * cfg.rate)
        per_body = cfg.backfill_batch or max(1, min(cfg.max_messages, 10_000 // len(dev.names)))
        first = end_ms - n * interval
        for lo in range(0, n, per_body):
            if self.stopping:
                return
            times = [int(first + k * interval) for k in range(lo, min(lo + per_body, n))]
            for p in dev.payloads(times):
                await self._send(index, dev, p)

    async def _live_device(self, index: int, dev: SimDevice, start_s: float, end_s: float) -> None:
        """Send on the device's grid of times until `end_s`; readings are generated a block of
        grid times ahead (per-block work even with --batch 1)."""
        cfg = self.config
        rng = dev.schedule_rng
        interval_ms = 1000.0 / cfg.rate
        jitter_s = min(cfg.jitter * cfg.batch / cfg.rate, 1.0)
        ramp_s = cfg.ramp_up_s * self.indices[index] / max(cfg.devices, 1)
        first_ms = (start_s + ramp_s) * 1000.0 + rng.uniform(0.0, interval_ms)
        n = max(0, math.ceil((end_s * 1000.0 - first_ms) / interval_ms))
        block = max(cfg.batch, GENERATE_AHEAD)
        # Up to a random grid point a batch at a time, then in blocks: devices generate their
        # blocks at different times, not all at the start and then within one interval each 64
        # (those bursts made 1-2% of the sends late by a few hundred ms at 10,000 a second).
        stagger = rng.randint(cfg.batch, block)
        probe = self.protocols[index] == "mqtt"
        ready: list[dict[str, Any]] = []  # generated, not sent yet (in time order)
        generated = sent = 0  # grid points
        schedule = self.schedule
        schedule.planned += math.ceil(n / cfg.batch)
        lags = schedule.lag_ms
        while sent < n and not self.stopping:
            upto = min(sent + cfg.batch, n)
            if generated < upto:
                top = upto if generated < stagger else min(generated + block, n)
                ready += dev.messages(
                    [int(first_ms + j * interval_ms) for j in range(generated, top)]
                )
                generated = top
            last_ms = int(first_ms + (upto - 1) * interval_ms)
            due_s = last_ms / 1000.0 + rng.uniform(0.0, jitter_s)
            if not await self._pause(due_s - time.time()):
                break
            lags.append(max(0.0, (time.time() - due_s) * 1000.0))
            schedule.sent += 1
            sent = upto
            cut = 0
            while cut < len(ready) and ready[cut]["ts"] <= last_ms:
                cut += 1
            if not cut:
                continue  # the device was in an outage
            batch, ready = ready[:cut], ready[cut:]
            for p in dev.package(batch, probe=probe):
                await self._send(index, dev, p)

    async def _flush_resends(self) -> None:
        async def one(index: int, dev: SimDevice) -> None:
            for p in dev.flush_resends():
                await self._send(index, dev, p)

        await asyncio.gather(*(one(i, d) for i, d in enumerate(self.devices)))

    async def _mqtt_rejections(self) -> bool:
        """Count the gateway's MQTT rejections from its dead-letter list, waiting up to
        `settle_s` for the expected number to arrive; False when the gateway has no such list."""
        assert self.api is not None
        mqtt_ids = {d.id for i, d in enumerate(self.devices) if self.protocols[i] == "mqtt"}
        expected = sum(n for d, n in self.stats.bad_by_device.items() if d in mqtt_ids)
        settle = self.config.settle_s if self.config.settle_s is not None else 15.0
        deadline = time.monotonic() + settle
        while True:
            letters = await self.api.rejected_since(self._started_us)
            if letters is None:
                return False
            codes = _rejection_codes([x for x in letters if x.get("device") in mqtt_ids])
            if sum(codes.values()) >= expected or time.monotonic() > deadline:
                break
            if not await self._pause(0.2):
                break
        self.stats.rejected_by_code.update(codes)
        return True

    # -- the run -------------------------------------------------------------------------

    def begin(self) -> None:
        """Ready to run on this event loop (stoppable from now on)."""
        self._stop = asyncio.get_running_loop().create_future()
        self._started_us = time.time_ns() // 1000

    async def run(self) -> dict[str, Any]:
        """Run to the end (or until stopped); the report."""
        self.begin()
        verification: Verification | None = None
        rejections_known = True
        live = self._start_progress()
        cfg = self.config
        try:
            if not cfg.dry_run:
                self.api = GatewayApi(cfg.gateway, cfg.admin_token, concurrency=cfg.concurrency)
                self.stats.phase = "provisioning"
                await self._provision()
            if cfg.processes > 1:
                self.senders = Senders(self)
                await self.senders.run()
            else:
                await self.send_all()
                self.ledger = Ledger.of(self.devices)
            verification = await self._verify()
            if "mqtt" in self.protocols and not cfg.dry_run:
                # after verify: by then storage (and dead letters) settled
                self.stats.phase = "counting MQTT rejections"
                rejections_known = await self._mqtt_rejections()
        finally:
            if self.stats.finished is None:
                self.stats.finished = time.monotonic()
            if live is not None:
                live.stop()
            if self.api is not None:
                await self.api.aclose()
        return self._report(verification, rejections_known)

    def _start_progress(self) -> Live | None:
        if not self.config.progress:
            return None
        live = Live(
            LiveView(self.stats), console=self.console, refresh_per_second=4, transient=True
        )
        live.start()
        return live

    async def send_all(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Send every phase (after `ready`, once the connections are up) and wait for the
        publish-to-queryable probes (the MQTT connections close at the end)."""
        cfg = self.config
        async with contextlib.AsyncExitStack() as stack:
            if not cfg.dry_run and "mqtt" in self.protocols:
                from simulator.mqtt import MqttPool

                self.mqtt = await stack.enter_async_context(
                    MqttPool(
                        cfg.mqtt_url,
                        size=min(cfg.mqtt_connections, len(self.devices)),
                        prefix=cfg.mqtt_prefix,
                        qos=cfg.qos,
                        as_devices={
                            d.id: d.token
                            for i, d in enumerate(self.devices)
                            if self.protocols[i] == "mqtt"
                        }
                        if cfg.mqtt_as_devices
                        else None,
                        ca_file=cfg.mqtt_ca,
                    )
                )
            if ready is not None:
                await ready()
            self.stats.started = time.monotonic()
            await self._send_phases()
            self.stats.finished = time.monotonic()
            if self.mqtt is not None:
                self.stats.phase = "waiting for the gateway"
                await self._finish_probes()
                self.error_notices.update(self.mqtt.error_notices)

    async def _send_phases(self) -> None:
        """Backfill, the live phase, then the re-sends held back (each skipped once stopped)."""
        cfg = self.config
        if cfg.backfill_s and not self.stopping:
            self.stats.phase = "backfill"
            end_ms = time.time_ns() // 1_000_000
            await asyncio.gather(
                *(self._backfill_device(i, d, end_ms) for i, d in enumerate(self.devices))
            )
        if cfg.duration_s and not self.stopping:
            self.stats.phase = "live"
            start = time.time()
            end = start + cfg.duration_s
            self.schedule.window_s = cfg.duration_s
            async with self.schedule.watching():
                await asyncio.gather(
                    *(self._live_device(i, d, start, end) for i, d in enumerate(self.devices))
                )
        if not self.stopping:
            await self._flush_resends()

    async def _finish_probes(self) -> None:
        if self._probes:
            if self.stopping:  # Ctrl-C: do not wait for readings to show up
                for task in self._probes:
                    task.cancel()
            await asyncio.gather(*self._probes, return_exceptions=True)

    async def _verify(self) -> Verification | None:
        """Read back what the gateway stored (with --verify, unless a dry run)."""
        cfg = self.config
        if not cfg.verify or cfg.dry_run:
            return None
        self.stats.phase = "verifying"
        assert self.api is not None
        settle = cfg.settle_s
        if settle is None:
            settle = 10.0 if "mqtt" in self.protocols else 0.0
        return await verify(
            self.api,
            self.ledger,
            mode=cfg.verify_mode,
            concurrency=min(cfg.concurrency, 16),
            settle_s=settle,
            fresh_devices=sorted(self.fresh),
        )

    def _report(self, verification: Verification | None, rejections_known: bool) -> dict[str, Any]:
        report = build_report(
            self.stats,
            verification,
            interrupted=self.interrupted,
            seed=self.config.seed,
            rejections_known=rejections_known,
        )
        if self.mqtt_latencies_ms:
            report["latency_ms_mqtt"] = _summary(self.mqtt_latencies_ms)
        if "mqtt" in self.protocols and not self.config.dry_run:
            mine = {d.id for d in self.devices}  # each sender hears every device's notices
            report["mqtt_error_notices"] = sum(
                n for d, n in self.error_notices.items() if d in mine
            )
        report["dry_run"] = self.config.dry_run
        report["processes"] = self.config.processes
        report["schedule"] = verdict(
            self.schedules,
            latency_p99_ms=report["latency_ms"]["p99"],
            retries=self.stats.retries,
            errors=self.stats.errors,
            interrupted=self.interrupted,
        )
        return report


def _summary(values: array[float]) -> dict[str, float]:
    s = Stats("", 0)
    s.latencies_ms = values
    return s.latency_summary()


def _rejection_codes(letters: list[dict[str, Any]]) -> Counter[str]:
    """Rejection codes in dead letters: one per refused reading (the letter's details), or the
    letter's reason when the whole payload was refused."""
    out: Counter[str] = Counter()
    for letter in letters:
        details = letter.get("details") or []
        codes = [str(d["code"]) for d in details if isinstance(d, dict) and d.get("code")]
        if codes:
            out.update(codes)
        else:
            out[str(letter.get("reason") or "unknown")] += 1
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def exit_code(report: dict[str, Any]) -> int:
    """1 when verification found anything missing or extra; 130 after Ctrl-C; else 0."""
    if report["verified"] is False:
        return 1
    if report["interrupted"]:
        return 130
    return 0


async def _run_with_signals(sim: Simulation) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    presses = 0

    def on_sigint() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            sim.console.print(
                "[yellow]stopping: finishing what is in flight (Ctrl-C again to abandon)[/]"
            )
            sim.stop()
        elif main is not None:
            main.cancel()

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigint)
    try:
        return await sim.run()
    except asyncio.CancelledError:
        sim.stats.finished = sim.stats.finished or time.monotonic()
        return build_report(sim.stats, None, interrupted=True, seed=sim.config.seed)


def simulate(config: SimulationConfig, console: Console | None = None) -> int:
    """Run a simulation from the command line: summary table, report file, exit code."""
    console = console or Console(stderr=True)
    sim = Simulation(config, console)
    runner_kwargs: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import uvloop

        runner_kwargs["loop_factory"] = uvloop.new_event_loop
    try:
        with asyncio.Runner(**runner_kwargs) as runner:
            report = runner.run(_run_with_signals(sim))
    except (GatewayError, SenderFailed) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    print_summary(console, report)
    if config.report_json is not None:
        write_report(config.report_json, report)
        console.print(f"report written to {config.report_json}")
    return exit_code(report)
