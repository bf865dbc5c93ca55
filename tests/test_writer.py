"""The writer's commit path on SQLite and PostgreSQL: exact counts per request when requests of
several devices share a commit (duplicates of stored rows and within the commit), the first
occurrence of a key kept, last_seen only moving forward, PostgreSQL's fallback when another
session commits the same keys meanwhile, and commits in flight side by side (PostgreSQL: two,
never one device in both; a device's requests committed in order; flush waits for them all)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.store import readings
from gateway.store.database import connection
from gateway.store.readings import Rows, insert_batch
from gateway.writer import Writer
from tests.conftest import Gateway, poll_until
from tests.harness import committed, is_sqlite, stored, wait_until, writes_held

T0 = 1_700_000_000_000  # epoch ms
T0_US = T0 * 1000


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


async def series_of(gw: Gateway, device_id: str, metrics: list[str]) -> list[int]:
    """Create a device and its series; their ids."""
    await gw.create_device(device_id)
    ids: list[int] = await gw.app.state.runtime.series.resolve(device_id, metrics)
    return ids


async def all_readings(gw: Gateway) -> list[tuple[int, int, float]]:
    rows = await committed(
        gw.settings.database_url, "SELECT series_id, ts, value FROM reading ORDER BY 1, 2"
    )
    return [(int(s), int(t), float(v)) for s, t, v in rows]


async def last_seen(gw: Gateway) -> dict[str, int | None]:
    rows = await committed(gw.settings.database_url, "SELECT id, last_seen_us FROM device")
    return {str(d): s for d, s in rows}


class TestInsertBatch:
    async def test_exact_counts_per_part_with_duplicates_stored_and_within(
        self, gateway: Gateway
    ) -> None:
        a_t, a_u = await series_of(gateway, "a", ["t", "u"])
        (b_t,) = await series_of(gateway, "b", ["t"])
        first = await insert_batch(connection(), [("a", Rows([a_t], [T0_US], [1.0]))], {"a": 10})
        assert first == [1]
        parts = [
            # a stored duplicate, a new row, a new row of another series, a duplicate of the 2nd
            ("a", Rows([a_t, a_t, a_u, a_t], [T0_US, T0_US + 1, T0_US, T0_US + 1], [9, 2, 3, 9])),
            # the same ts as a's rows (another series: new), then a duplicate within the part
            ("b", Rows([b_t, b_t], [T0_US, T0_US], [4.0, 9.0])),
            # a's second request in the same commit: a duplicate of the first part, a new row
            ("a", Rows([a_u, a_t], [T0_US, T0_US + 2], [9.0, 5.0])),
        ]
        assert await insert_batch(connection(), parts, {"a": 30, "b": 20}) == [2, 1, 1]
        assert await all_readings(gateway) == sorted(
            [
                (a_t, T0_US, 1.0),  # the stored value stays
                (a_t, T0_US + 1, 2.0),  # the first occurrence in the commit is kept
                (a_t, T0_US + 2, 5.0),
                (a_u, T0_US, 3.0),
                (b_t, T0_US, 4.0),
            ]
        )
        assert await last_seen(gateway) == {"a": 30, "b": 20}
        # Redelivered whole: all duplicates; an older last_seen does not move it back.
        assert await insert_batch(connection(), parts, {"a": 25}) == [0, 0, 0]
        assert await last_seen(gateway) == {"a": 30, "b": 20}

    async def test_values_and_times_are_stored_bit_for_bit(self, gateway: Gateway) -> None:
        """PostgreSQL's insert sends its columns as array literals: every double comes back with
        the same bits (subnormals, extremes, -0.0, 17 significant digits), every ts exactly."""
        a_t, a_u = await series_of(gateway, "a", ["t", "u"])
        values = [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 0.1 + 0.2]
        values += [1 / 3, -123456789.12345679, 1e16, 1.5e-7, 20.37]
        ts = [T0_US + k for k in range(len(values))] + [2**62, 1]
        values += [-1.0, 0.0]
        sids = [a_t, a_u] * (len(values) // 2)
        assert await insert_batch(connection(), [("a", Rows(sids, ts, values))], {}) == [12]
        got = {(s, t): v for s, t, v in await all_readings(gateway)}
        for sid, t, v in zip(sids, ts, values, strict=True):
            if v == 0 and is_sqlite(gateway.settings.database_url):
                assert got[sid, t] == 0.0  # SQLite stores -0.0 as 0 (the zero's sign is lost)
                continue
            assert got[sid, t].hex() == v.hex(), (t, v)

    async def test_late_readings_below_the_newest_stored_one(self, gateway: Gateway) -> None:
        """Readings older than a series' newest stored one: each one stored or new."""
        (s,) = await series_of(gateway, "a", ["t"])
        stored_ts = [T0_US, T0_US + 2, T0_US + 4]
        assert await insert_batch(connection(), [("a", Rows([s] * 3, stored_ts, [0.0] * 3))], {})
        late = [T0_US + 1, T0_US + 2, T0_US + 3, T0_US + 5, T0_US + 4]
        assert await insert_batch(connection(), [("a", Rows([s] * 5, late, [1.0] * 5))], {}) == [3]
        assert [ts - T0_US for _, ts, _ in await all_readings(gateway)] == [0, 1, 2, 3, 4, 5]

    @pytest.mark.postgres
    async def test_keys_committed_by_another_session_meanwhile(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The plain insert finds another session's uncommitted row, waits, and fails with
        unique_violation when that commits: the whole statement rolls back and the ON CONFLICT
        path counts the key as a duplicate."""
        if is_sqlite(gateway.settings.database_url):
            pytest.skip("one connection: no other session can interleave")
        (s,) = await series_of(gateway, "a", ["t"])
        fallbacks: list[int] = []
        real_fallback = readings._postgres_insert_on_conflict

        async def fallback(*args: Any) -> tuple[list[int], dict[int, int]]:
            fallbacks.append(1)
            return await real_fallback(*args)

        monkeypatch.setattr(readings, "_postgres_insert_on_conflict", fallback)
        other = await asyncpg.connect(gateway.settings.database_url, timeout=10)
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute(
                "INSERT INTO reading (series_id, ts, value) VALUES ($1, $2, 7.0)", s, T0_US + 1
            )
            parts = [("a", Rows([s, s, s], [T0_US, T0_US + 1, T0_US + 2], [1.0, 2.0, 3.0]))]
            task = asyncio.create_task(insert_batch(connection(), parts, {"a": 10}))

            async def waiting_on_the_lock() -> bool:
                return bool(
                    await other.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                )

            await poll_until(waiting_on_the_lock, within=10, what="the insert to wait")
            await tx.commit()
            assert await task == [2]
        finally:
            await other.close()
        assert fallbacks == [1]
        assert await all_readings(gateway) == [
            (s, T0_US, 1.0),
            (s, T0_US + 1, 7.0),
            (s, T0_US + 2, 3.0),
        ]
        assert await last_seen(gateway) == {"a": 10}


async def post(gw: Gateway, device_id: str, token: str, ts_ms: list[int]) -> httpx.Response:
    return await gw.post(device_id, token, [{"ts": t, "values": {"t": t - T0}} for t in ts_ms])


class TestCommitsInFlight:
    async def test_requests_of_several_devices_in_one_commit_get_exact_counts(
        self, gateway: Gateway
    ) -> None:
        writer = gateway.app.state.runtime.writer
        tokens = {d: await gateway.create_device(d) for d in ("a", "b")}
        # Warm-ups (SQLite's held lock would stall a token lookup or a new series too)
        assert (await post(gateway, "a", tokens["a"], [T0])).json()["accepted"] == 1
        assert (await post(gateway, "b", tokens["b"], [T0 - 1])).json()["accepted"] == 1
        bodies = [  # (device, ts): stored, within the request, across requests of a device
            ("a", [T0, T0 + 1, T0 + 1]),
            ("b", [T0, T0 + 1]),
            ("a", [T0 + 1, T0 + 2]),
            ("b", [T0 + 1, T0 + 2, T0 + 3]),
            ("a", [T0 + 2, T0 + 3]),
        ]
        tasks: list[asyncio.Task[httpx.Response]] = []
        queued = 0
        async with writes_held(gateway):
            for device, ts in bodies:  # queued in this order
                tasks.append(asyncio.create_task(post(gateway, device, tokens[device], ts)))
                queued += len(ts)
                await wait_until(lambda n=queued: writer.pending == n)  # type: ignore[misc]
        answers = [(r.status_code, r.json()) for r in await asyncio.gather(*tasks)]
        assert [(s, a["accepted"], a["duplicates"]) for s, a in answers] == [
            (200, 1, 2),
            (200, 2, 0),
            (200, 1, 1),
            (200, 2, 1),
            (200, 1, 1),
        ]
        url = gateway.settings.database_url
        assert [ts for _, ts, _ in await stored(url, "a")] == [(T0 + i) * 1000 for i in range(4)]
        assert [ts for _, ts, _ in await stored(url, "b")] == [
            (T0 + i) * 1000 for i in range(-1, 4)
        ]

    async def test_a_device_is_in_one_commit_at_a_time_and_in_order(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        writer = gateway.app.state.runtime.writer
        tokens = {d: await gateway.create_device(d) for d in ("a", "b")}
        for device in ("a", "b"):  # token and series known before the lock is held
            assert (await post(gateway, device, tokens[device], [T0])).status_code == 200
        active: list[set[str]] = []
        overlaps: list[tuple[set[str], set[str]]] = []
        started: list[tuple[str, int]] = []  # (device, first ts) of each part, as commits start
        most = 0
        real_insert = insert_batch

        async def spy(
            conn: Any, parts: list[tuple[str, Rows]], seen: dict[str, int], log_at: Any
        ) -> Any:
            nonlocal most
            devices = {d for d, _ in parts}
            overlaps.extend((devices, other) for other in active if other & devices)
            active.append(devices)
            most = max(most, len(active))
            started.extend((d, rows.ts[0]) for d, rows in parts)
            try:
                return await real_insert(conn, parts, seen, log_at)
            finally:
                active.remove(devices)

        monkeypatch.setattr("gateway.writer.insert_batch", spy)
        lanes = 1 if is_sqlite(gateway.settings.database_url) else 2
        order = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
        tasks: list[asyncio.Task[httpx.Response]] = []
        async with writes_held(gateway):
            for device, i in order:
                tasks.append(asyncio.create_task(post(gateway, device, tokens[device], [T0 + i])))
                await wait_until(lambda n=len(tasks): writer.pending == n)  # type: ignore[misc]
            await wait_until(lambda: len(active) == lanes)  # the commits that were free to start
            flushed = asyncio.create_task(writer.flush())
            for _ in range(5):
                await asyncio.sleep(0)
            assert not flushed.done()  # the commits in flight are held
        await flushed
        # Everything queued before the flush is committed once it returns.
        url = gateway.settings.database_url
        assert len(await stored(url, "a")) == 4
        assert len(await stored(url, "b")) == 3
        answers = await asyncio.gather(*tasks)
        assert [r.json()["accepted"] for r in answers] == [1] * 5
        assert most == lanes
        assert overlaps == []
        for device in ("a", "b"):
            mine = [ts for d, ts in started if d == device]
            assert mine == sorted(mine)


class TestStop:
    async def test_stopped_before_its_lanes_ever_ran(self) -> None:
        """A gateway stopped before the writer's task first ran (an app whose requests never
        yielded to the loop): every lane returns, none waits for a wakeup that was cleared (the
        second of two lanes hung; PostgreSQL runs two)."""
        writer = Writer(batch_size=10, queue_size=10, commits_in_flight=2)
        run = asyncio.create_task(writer.run())
        await writer.stop()  # before `run` started its lanes
        await asyncio.wait_for(run, timeout=5)
