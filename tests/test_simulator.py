"""The simulator's parts without a gateway: signals, profiles, and that its payloads are what it
says they are by the gateway's own validator (devices.formats.parse_telemetry)."""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import os
import socket
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest

from devices.formats import Code, PayloadError, Readings, parse_telemetry
from simulator.faults import EXPECTED_CODE, FaultKind
from simulator.fleet import Faults, Ledger, SimDevice, Tally
from simulator.profile import Profile, ProfileError, load_profile
from simulator.run import (
    Simulation,
    SimulationConfig,
    device_ids,
    parse_processes,
    parse_seconds,
)
from simulator.schedule import BEHIND_LAG_MS, ProcessSchedule, verdict
from simulator.senders import SenderFailed, partition
from simulator.signals import DEFAULT_METRICS, MetricSpec, Signal, SignalKind, device_rng
from simulator.sink import SinkProtocol

ROOT = Path(__file__).resolve().parents[1]
MAX_FUTURE_US = 300_000_000


def _series(seed: int, device: str, spec: MetricSpec, times: list[float]) -> list[float]:
    rng = device_rng(seed, device)
    signal = Signal(spec, rng)
    half = len(times) // 2  # in two calls: state carries over between batches
    return signal.values(times[:half], rng) + signal.values(times[half:], rng)


def _parse(body: bytes, now_us: int) -> Readings:
    return parse_telemetry(body, now_us=now_us, max_future_us=MAX_FUTURE_US, max_messages=10_000)


class TestSignals:
    TIMES: ClassVar[list[float]] = [1_700_000_000.0 + 30.0 * i for i in range(400)]

    @pytest.mark.parametrize("spec", DEFAULT_METRICS, ids=lambda s: s.name)
    def test_same_seed_same_values_other_seed_other_values(self, spec: MetricSpec) -> None:
        a = _series(7, "sim-0001", spec, self.TIMES)
        assert a == _series(7, "sim-0001", spec, self.TIMES)
        assert a != _series(8, "sim-0001", spec, self.TIMES)
        assert a != _series(7, "sim-0002", spec, self.TIMES)

    def test_kinds_keep_their_shape(self) -> None:
        times = [1_700_000_000.0 + 10.0 * i for i in range(2000)]
        walk = MetricSpec("p", SignalKind.WALK, min=980.0, max=1040.0, step=2.0)
        values = _series(1, "d", walk, times)
        assert all(980.0 <= v <= 1040.0 for v in values)
        assert len(set(values)) > 100
        counter = _series(1, "d", MetricSpec("e", SignalKind.COUNTER, step=0.5), times)
        assert all(b >= a for a, b in itertools.pairwise(counter))
        assert counter[-1] - counter[0] == pytest.approx(0.5 * (times[-1] - times[0]), rel=0.1)
        step = MetricSpec("s", SignalKind.STEP, levels=(18.0, 20.5, 22.0), change_per_s=0.01)
        steps = _series(1, "d", step, times)
        assert set(steps) == {18.0, 20.5, 22.0}
        changes = sum(a != b for a, b in itertools.pairwise(steps))
        assert 0 < changes < len(steps) / 5  # it holds a level, then jumps
        sine = MetricSpec("t", SignalKind.SINE, min=15.0, max=25.0, noise=0.1, period_s=3600.0)
        wave = _series(1, "d", sine, times)
        assert min(wave) < 15.5
        assert max(wave) > 24.5
        assert all(14.0 < v < 26.0 for v in wave)

    def test_values_are_rounded_and_never_negative_zero(self) -> None:
        spec = MetricSpec("t", SignalKind.SINE, min=-1.0, max=1.0, noise=0.01, decimals=2)
        values = _series(3, "d", spec, self.TIMES)
        assert all(v == round(v, 2) for v in values)
        assert not any(v == 0 and str(v).startswith("-") for v in values)


class TestPayloads:
    def _device(self, bad_ratio: float = 0.0, duplicate_ratio: float = 0.0) -> SimDevice:
        profile = Profile().with_dropout(0.05)
        profile = Profile(profile.metrics, outage=0.01, outage_s=5.0)
        return SimDevice("sim-0042", profile, seed=11, faults=Faults(bad_ratio, duplicate_ratio))

    def test_every_payload_is_what_the_simulator_says_it_is(self) -> None:
        dev = self._device(bad_ratio=0.2, duplicate_ratio=0.2)
        now_ms = time.time_ns() // 1_000_000
        start = now_ms - 3_600_000
        kinds: Counter[str] = Counter()
        dup_readings = valid_readings = 0
        for batch in range(60):
            times = [start + (batch * 10 + i) * 1000 for i in range(10)]
            for p in dev.payloads(times) + (dev.flush_resends() if batch == 59 else []):
                kinds.update(b.kind.value for b in p.bad)
                if p.bad and p.bad[0].kind is FaultKind.BROKEN_JSON:
                    assert p.readings == 1
                    assert len(p.bad) == 1
                    with pytest.raises(PayloadError) as err:
                        _parse(p.body, now_ms * 1000)
                    assert err.value.code == Code.INVALID_JSON
                    continue
                got = _parse(p.body, now_ms * 1000)
                assert len(got) == p.valid
                assert Counter(r.code for r in got.rejected) == p.expected_codes
                assert got.messages == p.messages
                # the tallies are the first-time readings: all of the body's minus re-sends
                first = sum(t.count for t in p.tallies().values())
                assert first == p.valid - p.duplicates
                dup_readings += p.duplicates
                valid_readings += p.valid
        assert set(kinds) == {k.value for k in FaultKind}, kinds
        assert dup_readings > 0
        assert valid_readings > 1000

    def test_tallies_match_the_readings_sent(self) -> None:
        dev = self._device()
        now_ms = time.time_ns() // 1_000_000
        times = [now_ms - 100_000 + i * 100 for i in range(500)]
        (p,) = dev.payloads(times)
        got = _parse(p.body, now_ms * 1000)
        for metric, tally in p.tallies().items():
            pairs = [
                (ts, v)
                for m, ts, v in zip(got.metrics, got.ts, got.values, strict=True)
                if m == metric
            ]
            want = Tally()
            want.add([ts for ts, _ in pairs], [v for _, v in pairs])
            assert (tally.count, tally.checksum) == (want.count, want.checksum)

    def test_ledger_counts_each_reading_once(self) -> None:
        dev = self._device(bad_ratio=0.05, duplicate_ratio=0.1)
        now_ms = time.time_ns() // 1_000_000
        seen: dict[tuple[str, int], float] = {}
        for b in range(1500):  # > FOLD_MESSAGES messages, acknowledged a payload at a time
            times = [now_ms - 20_000_000 + (b * 7 + i) * 1000 for i in range(7)]
            for p in dev.payloads(times) + (dev.flush_resends() if b == 1499 else []):
                dev.acknowledged(p)
                if p.bad and p.bad[0].alone:
                    continue
                got = _parse(p.body, now_ms * 1000)
                for m, ts, v in zip(got.metrics, got.ts, got.values, strict=True):
                    assert seen.setdefault((m, ts), v) == v  # a re-send repeats the same value
        ledger = Ledger.of([dev])
        for metric in {m for m, _ in seen}:
            pairs = sorted((ts, v) for (m, ts), v in seen.items() if m == metric)
            want = Tally.of(pairs)
            got_tally = ledger.series[(dev.id, metric)]
            assert (got_tally.count, got_tally.checksum) == (want.count, want.checksum)
            assert (got_tally.first_us, got_tally.last_us) == (want.first_us, want.last_us)
        assert ledger.readings == len(seen)

    @pytest.mark.parametrize("kind", list(FaultKind))
    def test_each_fault_gets_its_code(self, kind: FaultKind) -> None:
        dev = SimDevice("sim-1", Profile(), seed=1, faults=Faults(bad_ratio=1.0, kinds=(kind,)))
        now_ms = time.time_ns() // 1_000_000
        payloads = dev.payloads([now_ms - 3000, now_ms - 2000, now_ms - 1000])
        assert sum(len(p.bad) for p in payloads) == 3
        for p in payloads:
            if kind is FaultKind.BROKEN_JSON:
                with pytest.raises(PayloadError):
                    _parse(p.body, now_ms * 1000)
                continue
            got = _parse(p.body, now_ms * 1000)
            assert len(got) == 0
            assert [r.code for r in got.rejected] == [EXPECTED_CODE[kind]] * len(p.bad)

    def test_nan_is_the_bare_token(self) -> None:
        dev = SimDevice(
            "sim-1", Profile(), seed=2, faults=Faults(bad_ratio=1.0, kinds=(FaultKind.NAN,))
        )
        (p,) = dev.payloads([1_700_000_000_000])
        assert any(t in p.body for t in (b":NaN", b":Infinity", b":-Infinity")), p.body

    def test_bodies_stay_within_the_gateways_limits(self) -> None:
        dev = SimDevice("sim-1", Profile(), seed=3, faults=Faults(), max_messages=7)
        times = list(range(1_700_000_000_000, 1_700_000_000_000 + 100_000, 1000))
        payloads = dev.payloads(times)
        assert [p.messages for p in payloads] == [7] * 14 + [2]
        dev = SimDevice("sim-1", Profile(), seed=3, faults=Faults(), max_bytes=2048)
        payloads = dev.payloads(times)
        assert all(len(p.body) <= 2048 for p in payloads)
        assert sum(p.messages for p in payloads) == 100
        assert all(isinstance(json.loads(p.body), list | dict) for p in payloads)


class TestProfile:
    def test_toml_and_json(self, tmp_path: Path) -> None:
        toml = tmp_path / "p.toml"
        toml.write_text(
            "[device]\noutage = 0.01\noutage_s = 20\n"
            '[[metrics]]\nname = "flow"\nsignal = "walk"\nmin = 0\nmax = 10\nstep = 0.5\n'
            '[[metrics]]\nname = "valve"\nsignal = "step"\nlevels = [0, 1]\ndropout = 0.1\n'
        )
        p = load_profile(toml)
        assert [m.name for m in p.metrics] == ["flow", "valve"]
        assert p.metrics[0].signal is SignalKind.WALK
        assert p.metrics[1].levels == (0.0, 1.0)
        assert (p.outage, p.outage_s, p.metrics[1].dropout) == (0.01, 20.0, 0.1)
        js = tmp_path / "p.json"
        js.write_text(json.dumps({"metrics": [{"name": "t", "signal": "sine", "noise": 1}]}))
        assert load_profile(js).metrics[0].noise == 1.0

    @pytest.mark.parametrize(
        ("doc", "fragment"),
        [
            ({"metrics": []}, "non-empty"),
            ({"metrics": [{"name": "bad name"}]}, "metrics[0].name"),
            ({"metrics": [{"name": "a", "signal": "square"}]}, "signal must be one of"),
            ({"metrics": [{"name": "a", "colour": 1}]}, "unknown key"),
            ({"metrics": [{"name": "a"}, {"name": "a"}]}, "unique"),
            ({"metrics": [{"name": "a", "dropout": 2}]}, "from 0 to 1"),
        ],
    )
    def test_errors_say_where(self, tmp_path: Path, doc: object, fragment: str) -> None:
        path = tmp_path / "p.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ProfileError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_profile(path)


class TestOptions:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("60", 60.0), ("90s", 90.0), ("15m", 900.0), ("24h", 86400.0), ("1h30m", 5400.0)],
    )
    def test_durations(self, text: str, seconds: float) -> None:
        assert parse_seconds(text) == seconds

    @pytest.mark.parametrize("text", ["", "1x", "h", "1h 30m", "-5s"])
    def test_bad_durations(self, text: str) -> None:
        with pytest.raises(ValueError, match="not a duration"):
            parse_seconds(text)

    def test_device_ids(self) -> None:
        assert device_ids("sim-", 3) == ["sim-0000", "sim-0001", "sim-0002"]
        assert device_ids("x", 12_000)[-1] == "x11999"

    @pytest.mark.parametrize(
        "change", [{"rate": 0}, {"rate": 5000}, {"batch": 0}, {"bad_ratio": 1.5}, {"qos": 2}]
    )
    def test_config_refuses(self, change: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="--"):
            SimulationConfig(**change).check()


def test_simulator_imports_nothing_of_the_gateway() -> None:
    for path in (ROOT / "simulator").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("gateway", "devices"), (path.name, name)


class TestSchedule:
    """The report's verdict on who limited a run (simulator/schedule.py), on dry runs: the
    simulator's own work, no gateway."""

    async def test_a_schedule_the_sender_cannot_keep_is_the_simulators_limit(self) -> None:
        # a million messages a second offered: no machine builds them that fast in one process;
        # stopped after a second (the lag by then is most of that second on any machine)
        config = SimulationConfig(
            dry_run=True, devices=2000, rate=500, duration_s=2, progress=False
        )  # fmt: skip
        sim = Simulation(config)
        asyncio.get_running_loop().call_later(1.0, sim.stop)
        report = await sim.run()
        schedule = report["schedule"]
        assert schedule["behind"] is True, schedule
        assert schedule["limit"] == "simulator", schedule
        assert "simulator was the limit" in schedule["why"]
        assert schedule["sent_batches"] < schedule["planned_batches"]
        assert schedule["send_lag_ms"]["p99"] > BEHIND_LAG_MS

    async def test_a_schedule_it_keeps_names_no_limit(self) -> None:
        config = SimulationConfig(dry_run=True, devices=5, rate=20, duration_s=0.5, progress=False)
        report = await Simulation(config).run()
        schedule = report["schedule"]
        assert schedule["sent_batches"] == schedule["planned_batches"] > 0
        assert schedule["behind"] is False, schedule
        assert schedule["limit"] is None
        assert schedule["why"].startswith("kept its schedule")

    @staticmethod
    def _record(lag_ms: float, loop_ms: float, cpu: float, machine: float) -> ProcessSchedule:
        return ProcessSchedule(
            lag_ms=array("d", [lag_ms] * 100),
            loop_lag_ms=array("d", [loop_ms] * 100),
            planned=100,
            sent=100,
            window_s=10.0,
            wall_s=10.0,
            cpu_s=10.0 * cpu,
            machine_busy=machine,
        )

    @pytest.mark.parametrize(
        ("lag", "loop", "cpu", "machine", "limit"),
        [
            (5.0, 1.0, 0.3, 0.3, None),  # on time
            (900.0, 1.0, 0.3, 0.3, "gateway"),  # late, but the sender was idle and on time
            (900.0, 60.0, 0.6, 0.99, "simulator"),  # its loop ran late
            (900.0, 5.0, 0.95, 0.6, "simulator"),  # it used a core up
            (900.0, 5.0, 0.6, 0.99, "machine"),  # no CPU left on the machine, the sender not full
        ],
    )
    def test_who_was_the_limit(
        self, lag: float, loop: float, cpu: float, machine: float, limit: str | None
    ) -> None:
        fine = self._record(1.0, 1.0, 0.1, machine)
        result = verdict([fine, self._record(lag, loop, cpu, machine)], latency_p99_ms=300.0,
                         retries=7, errors=0)  # fmt: skip
        assert result["limit"] == limit, result
        assert result["behind"] is (limit is not None)
        assert result["processes"] == 2
        if limit == "gateway":
            assert "latency p99 300 ms" in result["why"]
            assert "7 retries" in result["why"]


class TestSenderProcesses:
    def test_processes_option(self) -> None:
        assert parse_processes("3", 10) == 3
        assert 1 <= parse_processes("auto", 10) == min(os.cpu_count() or 1, 10)
        assert parse_processes("auto", 1) == 1
        with pytest.raises(ValueError, match="--processes"):
            parse_processes("many", 10)
        for wrong in (0, 11):
            with pytest.raises(ValueError, match="--processes"):
                SimulationConfig(devices=10, processes=wrong).check()

    def test_partition_is_whole_and_mixes_protocols(self) -> None:
        parts = partition(11, 3)
        assert sorted(i for p in parts for i in p) == list(range(11))
        assert all({i % 2 for i in p} == {0, 1} for p in parts)  # http and mqtt devices each

    async def test_counts_from_two_processes_merge_exactly(self) -> None:
        config = SimulationConfig(
            dry_run=True, devices=6, rate=20, duration_s=0.5, batch=2, bad_ratio=0.1,
            duplicate_ratio=0.1, seed=4, progress=False, processes=2,
        )  # fmt: skip
        sim = Simulation(config)
        report = await sim.run()
        # each reading counted once, whichever process sent it
        assert {d for d, _ in sim.ledger.series} == {d.id for d in sim.devices}
        assert report["bad_sent"] > 0
        assert report["duplicates_sent"] > 0
        assert report["sent"] == report["accepted"] + report["bad_sent"]
        assert sim.ledger.readings == report["accepted"] - report["duplicates_sent"]
        assert report["rejected_by_code"] == report["expected_rejections"]
        assert sum(report["bad_by_kind"].values()) == report["bad_sent"]
        assert all(p["send_lag_p99_ms"] >= 0 for p in report["schedule"]["per_process"])
        sent = report["schedule"]["sent_batches"]
        assert sent == report["schedule"]["planned_batches"] == 6 * 5
        assert report["processes"] == 2
        assert report["schedule"]["processes"] == 2
        assert len(report["schedule"]["per_process"]) == 2
        assert sim.senders is not None
        assert all(p.returncode == 0 for p in sim.senders.procs)

    async def test_a_failing_sender_fails_the_run_with_its_reason(self) -> None:
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(SinkProtocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            sim = Simulation(
                SimulationConfig(
                    gateway=f"http://127.0.0.1:{port}", admin_token="x", devices=4,
                    protocol="mqtt", mqtt_url=f"mqtt://127.0.0.1:{closed}", processes=2,
                    duration_s=1, progress=False,
                )
            )  # fmt: skip
            with pytest.raises(SenderFailed, match=r"sender process \d .*failed: .*Mqtt"):
                await sim.run()
        assert sim.senders is not None
        assert len(sim.senders.procs) == 2
        assert all(p.returncode is not None for p in sim.senders.procs)  # none left running
