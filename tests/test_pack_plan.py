"""Where packing puts readings (gateway/store/packed.py `_plan`): chunk sizes, partition edges,
late readings into full chunks; the layout, without a database."""

from __future__ import annotations

import numpy as np

from gateway.store import chunk_codec
from gateway.store.packed import PARTITION_US, TARGET, _plan

S = 1_000_000


def _chunk(ts: list[int]) -> tuple[int, int, int, bytes]:
    encoded = chunk_codec.encode(ts, [1.0] * len(ts))
    return (ts[0], ts[-1], len(ts), encoded.data)


def _layout(plan_rows: list[tuple[object, ...]]) -> list[tuple[int, int, int]]:
    return [(int(r[1]), int(r[2]), int(r[3])) for r in plan_rows]  # type: ignore[call-overload]


def test_a_backlog_is_cut_into_target_sized_chunks() -> None:
    ts = np.arange(10 * TARGET + 17, dtype=np.int64) * S + 10 * PARTITION_US
    plan = _plan(1, ts, np.ones(len(ts)), [])
    sizes = [n for _, _, n in _layout(plan.write)]
    assert sum(sizes) == len(ts)
    assert all(TARGET <= n < 2 * TARGET for n in sizes)
    assert plan.watermark == int(ts[-1])


def test_no_chunk_crosses_a_partition_edge() -> None:
    edge = 11 * PARTITION_US
    ts = np.arange(edge - 100 * S, edge + 100 * S, S, dtype=np.int64)
    layout = _layout(_plan(1, ts, np.ones(len(ts)), []).write)
    assert layout == [(edge - 100 * S, edge - S, 100), (edge, edge + 99 * S, 100)]


def test_late_readings_go_into_the_chunk_that_spans_them_not_after_a_full_one() -> None:
    full = [10 * PARTITION_US + i * 10 * S for i in range(TARGET)]
    chunks = [_chunk(full)]
    inside = full[5] + 3 * S  # between two of its readings
    after = full[-1] + 10 * S  # after the full chunk: a chunk of its own
    ts = np.array([inside, after], dtype=np.int64)
    plan = _plan(1, ts, np.array([2.0, 3.0]), chunks)
    assert plan.delete == [full[0]]
    layout = sorted(_layout(plan.write))
    assert layout == [(full[0], full[-1], TARGET + 1), (after, after, 1)]
