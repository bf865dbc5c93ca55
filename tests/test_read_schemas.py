"""Real answers of every read endpoint against the app's own OpenAPI document, on both databases.

The read answers are rendered by orjson from plain dicts (no pydantic on the hot path), so
nothing but this test ties them to the response models gateway/api/schemas.py declares. The
schemas are checked closed: an answer key the document does not declare fails too.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import pytest

from tests.conftest import Gateway

S = 1_000_000
BASE = 1_763_596_800 * S  # 2025-11-20T00:00:00Z
AGGS = "avg,min,max,sum,count,first,last,stddev"
FILLS = ["none", "null", "previous", "linear"]
RAW = "/api/v1/devices/{device_id}/telemetry"
LATEST = "/api/v1/devices/{device_id}/telemetry/latest"
DEVICE_AGGREGATE = "/api/v1/devices/{device_id}/telemetry/aggregate"
FLEET_AGGREGATE = "/api/v1/telemetry/aggregate"


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / S, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to other keys."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def answer_validator(gw: Gateway, path: str) -> jsonschema_rs.Draft202012Validator:
    """The app's declared 200 JSON answer of GET `path` (its references resolved in the
    document's components)."""
    doc = gw.app.openapi()
    declared = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
    schema = declared["schema"]
    assert "$ref" in schema or "anyOf" in schema, f"{path} declares no answer model: {schema}"
    return jsonschema_rs.Draft202012Validator(
        closed({**schema, "components": copy.deepcopy(doc["components"])})
    )


def assert_valid(gw: Gateway, path: str, body: Any) -> None:
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in answer_validator(gw, path).iter_errors(body)
    ]
    assert not errors, f"{path} answered outside its schema:\n" + "\n".join(errors)


async def get(gw: Gateway, path: str, **params: Any) -> Any:
    r = await gw.client.get(path, params=params, headers=gw.admin)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


@pytest.fixture
async def fleet(gateway: Gateway) -> Gateway:
    """Devices s-1 (metrics a, b) and s-2 (metric a) with readings over 4 minutes, minute 2
    empty, one reading before the range (fill=previous uses it), a lone reading in minute 3
    (stddev null); s-3 with no readings."""
    for device_id, metrics in (("s-1", ("a", "b")), ("s-2", ("a",))):
        token = await gateway.create_device(device_id)
        offsets = [-30, 0, 20, 50, 60, 70, 185]
        msgs = [
            {"ts": iso(BASE + off * S), "values": {m: i * 1.5 - j for j, m in enumerate(metrics)}}
            for i, off in enumerate(offsets)
        ]
        r = await gateway.post(device_id, token, msgs)
        assert r.json()["accepted"] == len(offsets) * len(metrics), r.text
    await gateway.create_device("s-3")
    return gateway


WINDOW = {"start": iso(BASE), "end": iso(BASE + 240 * S), "window": "1m", "agg": AGGS}


class TestRawAndLatest:
    async def test_raw_pages(self, fleet: Gateway) -> None:
        path = RAW.format(device_id="s-1")
        body = await get(fleet, path, metric="a", limit=3)
        assert body["next_cursor"]
        assert_valid(fleet, RAW, body)
        last = await get(fleet, path, metric="a", cursor=body["next_cursor"])
        assert last["next_cursor"] is None
        assert len(last["points"]) == 4
        assert_valid(fleet, RAW, last)
        assert_valid(fleet, RAW, await get(fleet, path, metric="never"))

    @pytest.mark.parametrize("device_id", ["s-1", "s-3"])
    async def test_latest(self, fleet: Gateway, device_id: str) -> None:
        body = await get(fleet, LATEST.format(device_id=device_id))
        assert len(body["values"]) == (2 if device_id == "s-1" else 0)
        assert_valid(fleet, LATEST, body)


class TestAggregates:
    @pytest.mark.parametrize("fill", FILLS)
    async def test_device_one_metric(self, fleet: Gateway, fill: str) -> None:
        body = await get(
            fleet, DEVICE_AGGREGATE.format(device_id="s-1"), metric="a", fill=fill, **WINDOW
        )
        assert len(body["buckets"]) == (3 if fill == "none" else 4)
        assert "stddev" in body["buckets"][0]
        assert_valid(fleet, DEVICE_AGGREGATE, body)

    @pytest.mark.parametrize("fill", FILLS)
    async def test_device_several_metrics(self, fleet: Gateway, fill: str) -> None:
        path = DEVICE_AGGREGATE.format(device_id="s-1")
        body = await get(fleet, path, metric=["a", "b", "never"], fill=fill, **WINDOW)
        assert [s["metric"] for s in body["series"]] == ["a", "b", "never"]
        assert_valid(fleet, DEVICE_AGGREGATE, body)

    @pytest.mark.parametrize(
        "params",
        [
            {"agg": "count"},  # no value aggs: start and count only
            {"window": "1d", "tz": "Europe/Oslo"},  # calendar buckets: the answer names its tz
            {"window": None, "start": None, "end": None},  # defaults: auto over the last 24h
        ],
    )
    async def test_device_variants(self, fleet: Gateway, params: dict[str, str | None]) -> None:
        query = {k: v for k, v in {**WINDOW, **params}.items() if v is not None}
        body = await get(
            fleet, DEVICE_AGGREGATE.format(device_id="s-1"), metric="a", fill="null", **query
        )
        assert body["buckets"]
        assert_valid(fleet, DEVICE_AGGREGATE, body)

    @pytest.mark.parametrize("fill", FILLS)
    async def test_fleet_all_devices(self, fleet: Gateway, fill: str) -> None:
        body = await get(fleet, FLEET_AGGREGATE, metric="a", fill=fill, **WINDOW)
        assert [s["device"] for s in body["series"]] == ["s-1", "s-2"]
        assert_valid(fleet, FLEET_AGGREGATE, body)

    async def test_fleet_named_devices_several_metrics(self, fleet: Gateway) -> None:
        body = await get(
            fleet,
            FLEET_AGGREGATE,
            metric=["a", "b"],
            device=["s-3", "s-1"],
            fill="linear",
            **WINDOW,
        )
        assert body["metric"] == ["a", "b"]
        assert [(s["device"], s["metric"]) for s in body["series"]] == [
            ("s-3", "a"),
            ("s-3", "b"),
            ("s-1", "a"),
            ("s-1", "b"),
        ]
        assert_valid(fleet, FLEET_AGGREGATE, body)


class TestTheCheckCanFail:
    """The validators refuse what the API must not answer (so a passing test means something)."""

    async def test_undeclared_and_missing_keys_fail(self, fleet: Gateway) -> None:
        body = await get(fleet, DEVICE_AGGREGATE.format(device_id="s-1"), metric="a", **WINDOW)
        validator = answer_validator(fleet, DEVICE_AGGREGATE)
        assert validator.is_valid(body)
        bucket = body["buckets"][0]
        assert not validator.is_valid({**body, "buckets": [{**bucket, "median": 1.0}]})
        assert not validator.is_valid({**body, "buckets": [{"start": bucket["start"]}]})
        assert not validator.is_valid({k: v for k, v in body.items() if k != "window"})
        assert not validator.is_valid({**body, "extra": 1})
        raw = answer_validator(fleet, RAW)
        assert not raw.is_valid({"device": "s-1", "metric": "a", "points": [{"ts": "x"}]})


REFUSALS = [
    # (method, path as called, the operation's path template, how, expected status)
    ("get", "/api/v1/devices", "/api/v1/devices", {"params": {"limit": 0}}, 400),
    ("get", "/api/v1/devices", "/api/v1/devices", {"auth": None}, 401),
    ("get", "/api/v1/devices", "/api/v1/devices", {"auth": "device"}, 403),
    ("get", "/api/v1/devices/nope", "/api/v1/devices/{device_id}", {}, 404),
    ("post", "/api/v1/devices", "/api/v1/devices", {"json": {"id": 5}}, 422),
    (
        "post",
        "/api/v1/devices/s-1/telemetry",
        "/api/v1/devices/{device_id}/telemetry",
        {"auth": "device", "json": {"values": {"a": "warm"}}},
        422,
    ),
    (
        "patch",
        "/api/v1/devices/s-1",
        "/api/v1/devices/{device_id}",
        {"json": {"metadata": {"k": "x" * 70_000}}},
        413,
    ),
    ("get", RAW.format(device_id="s-1"), RAW, {"params": {"metric": "a", "cursor": "!"}}, 400),
]


@pytest.mark.parametrize(("method", "path", "template", "how", "status"), REFUSALS)
async def test_refusals_are_declared_with_their_shape(
    gateway: Gateway, method: str, path: str, template: str, how: dict[str, Any], status: int
) -> None:
    """Every error is `{"error": {...}}` and each operation declares the statuses it answers."""
    device_token = await gateway.create_device("s-1")
    how = dict(how)
    auth = how.pop("auth", "admin")
    headers = {} if auth is None else gateway.admin
    if auth == "device":
        headers = {"Authorization": f"Bearer {device_token}"}
    r = await gateway.client.request(method.upper(), path, headers=headers, **how)
    assert r.status_code == status, r.text
    doc = gateway.app.openapi()
    declared = doc["paths"][template][method]["responses"]
    assert str(status) in declared, f"{method} {template} does not declare {status}"
    schema = declared[str(status)]["content"]["application/json"]["schema"]
    validator = jsonschema_rs.Draft202012Validator(
        closed({**schema, "components": copy.deepcopy(doc["components"])})
    )
    errors = [e.message for e in validator.iter_errors(r.json())]
    assert not errors, errors
    assert schema == {"$ref": "#/components/schemas/ErrorOut"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's 422 shape
