"""Dead letters older than the retention are deleted (on start, then hourly)."""

from __future__ import annotations

from typing import cast

from gateway.store.dead_letters import DeadLetter, Letter, insert_letters
from gateway.timespec import now_us
from tests.conftest import make_settings, poll_until, start_gateway

DAY_US = 86_400_000_000


def letter(received_us: int, device: str) -> Letter:
    return Letter(
        received_us=received_us,
        transport="mqtt",
        device_id=device,
        topic=f"devices/{device}/telemetry",
        reason="invalid_json",
        message="not JSON",
        payload=b"{oops",
    )


async def ids_left() -> set[str]:
    return {str(d) for d in await DeadLetter.all().values_list("device_id", flat=True)}


async def test_old_dead_letters_are_pruned_and_recent_ones_kept(database_url: str) -> None:
    now = now_us()
    async for _ in start_gateway(make_settings(database_url, dead_letter_retention_days=0)):
        await insert_letters(
            [letter(now - 40 * DAY_US, "old"), letter(now - 2 * DAY_US, "recent")],
            payload_limit=100,
        )
        assert await ids_left() == {"old", "recent"}  # 0 keeps everything
    async for _ in start_gateway(make_settings(database_url, dead_letter_retention_days=30)):
        left = await poll_until(
            lambda: _only_recent(), within=10, what="the 40-day-old dead letter to go"
        )
        assert left == {"recent"}


async def _only_recent() -> set[str] | None:
    left = await ids_left()
    return left if left == {"recent"} else None


async def test_past_the_row_cap_the_oldest_dead_letters_go(database_url: str) -> None:
    now = now_us()
    async for _ in start_gateway(make_settings(database_url)):
        for batch in range(4):  # 12 letters, 3 at a time, never more than 5 kept
            await insert_letters(
                [letter(now, f"dev-{batch}-{i}") for i in range(3)],
                payload_limit=100,
                keep_at_most=5,
            )
            assert len(await ids_left()) <= 5
        # flat=True gives the values themselves (Tortoise's stubs say tuples)
        kept = cast(
            list[str], await DeadLetter.all().order_by("id").values_list("device_id", flat=True)
        )
        assert kept == ["dev-2-1", "dev-2-2", "dev-3-0", "dev-3-1", "dev-3-2"]
        await insert_letters([letter(now, "no-cap")], payload_limit=100)
        assert len(await ids_left()) == 6  # 0 (the default here) keeps them all
