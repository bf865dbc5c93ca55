"""The telemetry lane (gateway/api/writes.py `TelemetryLane`) answers device posts without
FastAPI's routing: it must answer exactly as the documented route does. Each case is sent to two
gateways on the same kind of database, one with the lane and one without, and the two answers
(status, body, the headers a client acts on) must be the same; the stored readings too. Both
databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from gateway.api.writes import TelemetryLane
from gateway.app import create_app
from tests.conftest import ADMIN_TOKEN, Gateway, _pg_admin, make_settings

T0 = 1_700_000_000_000
HEADERS_COMPARED = ("content-type", "www-authenticate", "retry-after", "connection", "location")


@dataclass(frozen=True)
class Case:
    name: str
    device: str  # in the path
    token: str | None  # "a", "b" (a device's token), "admin", "off" (disabled device), or raw
    # (where "{a}" stands for device a's token)
    body: bytes = b""
    method: str = "POST"
    suffix: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    chunks: int = 0  # > 0: the body is streamed (chunked, no Content-Length) in this many parts


def reading(ts: int = T0, **values: Any) -> bytes:
    return orjson.dumps({"ts": ts, "values": values or {"t": 21.5}})


JSON = "application/json"
TEXT = ("content-type", "text/plain")
SENML = ("content-type", "application/senml+json")


def senml(*records: dict[str, Any]) -> bytes:
    return orjson.dumps(list(records))


CASES = [
    Case("one reading", "dev-a", "a", reading()),
    Case("the same again: a duplicate", "dev-a", "a", reading()),
    Case(
        "an array",
        "dev-a",
        "a",
        orjson.dumps([{"ts": T0 + i, "values": {"t": i}} for i in range(5)]),
    ),
    Case("no ts", "dev-a", "a", b'{"values": {"h": 40}}'.replace(b"40", b"40.5")),
    Case(
        "a partly bad message",
        "dev-a",
        "a",
        orjson.dumps({"ts": T0 + 9, "values": {"t": 1, "bad name!": 2}}),
    ),
    Case("nothing valid", "dev-a", "a", orjson.dumps({"ts": T0, "values": {"t": "warm"}})),
    Case("an empty array", "dev-a", "a", b"[]"),
    Case("not JSON", "dev-a", "a", b"{nope"),
    Case("an empty body", "dev-a", "a", b""),
    Case("not UTF-8", "dev-a", "a", b'{"values": {"t": 1}, "x": "\xff"}'),
    Case(
        "too many messages",
        "dev-a",
        "a",
        orjson.dumps([{"ts": T0 + i, "values": {"t": 1}} for i in range(11)]),
    ),
    Case("a timestamp in seconds", "dev-a", "a", reading(ts=1_700_000_000)),
    Case("over the body limit, declared", "dev-a", "a", b"[" + b" " * 5000 + b"]"),
    Case("a streamed body", "dev-a", "a", reading(ts=T0 + 20), chunks=3),
    Case("a streamed body over the limit", "dev-a", "a", b"[" + b" " * 5000 + b"]", chunks=5),
    Case("no Authorization", "dev-a", None, reading()),
    Case("Basic auth", "dev-a", "Basic dXNlcjpwYXNz", reading()),
    Case("Bearer and no token", "dev-a", "Bearer ", reading()),
    Case("an unknown token", "dev-a", "Bearer fgd_" + "A" * 43, reading()),
    Case("another device's token", "dev-b", "a", reading()),
    Case("the admin token", "dev-a", "admin", reading()),
    Case("a device that does not exist", "nobody", "a", reading()),
    Case("a disabled device", "dev-off", "off", reading()),
    Case("a NUL in the path", "dev%00a", "a", reading()),
    Case("a trailing slash", "dev-a", "a", reading(), suffix="/"),
    Case("GET on the write path", "dev-a", "a", method="GET"),
    Case("PUT on the write path", "dev-a", "a", reading(), method="PUT"),
    Case("a second segment", "dev-a/x", "a", reading()),
    Case("a percent-encoded slash in the id", "dev-a%2Fx", "a", reading()),
    Case("a percent-encoded id", "dev%2Da", "a", reading()),
    Case("an empty id", "", "a", reading()),
    Case("a query string", "dev-a", "a", reading(), suffix="?x=1"),
    Case("a lower-case scheme", "dev-a", "bearer {a}", reading()),
    Case("two spaces after the scheme", "dev-a", "Bearer  {a}", reading()),
    Case("a tab after the scheme", "dev-a", "Bearer\t{a}", reading()),
    Case("HEAD on the write path", "dev-a", "a", method="HEAD"),
    Case("OPTIONS on the write path", "dev-a", "a", method="OPTIONS"),
    # The body's format follows its Content-Type (SenML: devices/senml.py).
    Case("explicit JSON", "dev-a", "a", reading(ts=T0 + 30), headers=(("content-type", JSON),)),
    Case("another type: native", "dev-a", "a", reading(ts=T0 + 31), headers=(TEXT,)),
    Case(
        "a SenML pack",
        "dev-a",
        "a",
        senml({"n": "t", "u": "Cel", "v": 1, "t": 1.7e9 + 1}),
        headers=(SENML,),
    ),
    Case(
        "a SenML type in capitals, with a parameter",
        "dev-a",
        "a",
        senml({"bn": "", "n": "t", "v": 2, "t": 1.7e9 + 2}),
        headers=(("content-type", "Application/SenML+JSON; charset=utf-8"),),
    ),
    Case(
        "a partly bad pack",
        "dev-a",
        "a",
        senml({"n": "t", "v": 3, "bt": 1.7e9 + 3}, {"v": 1}),
        headers=(SENML,),
    ),
    Case(
        "a pack in another unit",
        "dev-a",
        "a",
        senml({"n": "t", "u": "K", "v": 4}),
        headers=(SENML,),
    ),
    Case("a native body as SenML", "dev-a", "a", reading(), headers=(SENML,)),
    Case("a SenML pack as JSON", "dev-a", "a", orjson.dumps([{"n": "t", "v": 5}])),
]


@asynccontextmanager
async def started(url: str, *, lane: bool) -> AsyncIterator[Gateway]:
    """The app with or without the lane (one at a time: Tortoise's connections are global)."""
    settings = make_settings(url, max_messages=10, max_body_bytes=4096)
    app = create_app(settings, telemetry_lane=lane)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg") as client:
            yield Gateway(client, settings, app)


async def answers_and_store(url: str, *, lane: bool) -> tuple[list[Any], Any]:
    """Every case's answer, then what dev-a has stored."""
    async with started(url, lane=lane) as gw:
        tokens = await prepare(gw)
        answers = [await send(gw, tokens, case) for case in CASES]
        r = await gw.client.get(
            "/api/v1/devices/dev-a/telemetry",
            params={"metric": "t", "from": "2023-11-14T00:00:00Z", "to": "2023-11-16T00:00:00Z"},
            headers=gw.admin,
        )
        assert r.status_code == 200, r.text
        return answers, r.json()


async def prepare(gw: Gateway) -> dict[str, str]:
    tokens = {
        "a": await gw.create_device("dev-a"),
        "b": await gw.create_device("dev-b"),
        "off": await gw.create_device("dev-off"),
    }
    r = await gw.client.patch("/api/v1/devices/dev-off", json={"enabled": False}, headers=gw.admin)
    assert r.status_code == 200, r.text
    return tokens


async def send(gw: Gateway, tokens: dict[str, str], case: Case) -> tuple[int, Any, dict[str, str]]:
    headers = dict(case.headers)
    if case.token in tokens:
        headers["Authorization"] = f"Bearer {tokens[case.token]}"
    elif case.token == "admin":
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    elif case.token is not None:
        headers["Authorization"] = case.token.format(**tokens)
    content: Any = case.body or None
    if case.chunks:
        size = -(-len(case.body) // case.chunks)

        async def parts() -> AsyncIterator[bytes]:
            for i in range(0, len(case.body), size):
                yield case.body[i : i + size]

        content = parts()
    r = await gw.client.request(
        case.method,
        f"/api/v1/devices/{case.device}/telemetry{case.suffix}",
        content=content,
        headers=headers,
    )
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return r.status_code, body, {h: r.headers[h] for h in HEADERS_COMPARED if h in r.headers}


async def test_the_lane_answers_as_the_route_does(
    database_url: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    second_url = f"sqlite://{tmp_path}/second.db"
    if not database_url.startswith("sqlite://"):
        second_url = await clone_of(request.getfixturevalue("pg_template"), database_url)
    try:
        with_lane, stored_lane = await answers_and_store(database_url, lane=True)
        without, stored_route = await answers_and_store(second_url, lane=False)
    finally:
        if second_url.startswith("postgres"):
            await _pg_admin(
                f'DROP DATABASE IF EXISTS "{second_url.rsplit("/", 1)[1]}" WITH (FORCE)'
            )
    for case, a, b in zip(CASES, with_lane, without, strict=True):
        assert a == b, case.name
    # The cases reach every kind of answer the endpoint gives.
    assert {status for status, _, _ in with_lane} >= {200, 400, 401, 403, 404, 405, 413, 422}
    assert stored_lane == stored_route
    # The first reading, four new of the array (its first is the first's duplicate), the
    # partly bad message's good one, the streamed one; explicit JSON, text/plain (native), and
    # three SenML records (the pack in another unit than the series' Cel is refused).
    assert len(stored_lane["points"]) == 12
    assert stored_lane["unit"] == "Cel"
    answers = {case.name: answer for case, answer in zip(CASES, with_lane, strict=True)}
    assert answers["a partly bad pack"][1]["rejected"][0]["index"] == 1
    status, body, _ = answers["a pack in another unit"]
    assert (status, body["error"]["details"][0]["code"]) == (422, "unit_mismatch")
    status, body, _ = answers["a native body as SenML"]
    assert (status, body["error"]["code"]) == (400, "invalid_pack")
    assert answers["a SenML pack as JSON"][0] == 422  # read as native: no values


async def clone_of(template: str, database_url: str) -> str:
    """A second empty migrated PostgreSQL database beside `database_url`'s."""
    name = f"{database_url.rsplit('/', 1)[1]}_2"
    await _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return database_url.rsplit("/", 1)[0] + "/" + name


async def test_the_lane_is_what_answers_and_is_counted_under_the_route(
    gateway: Gateway,
) -> None:
    """The lane serves telemetry posts itself (in front of an app that fails every request it
    gets) and passes everything else on; the request metric names the route's template, as for
    any route."""
    gw = gateway
    token = await gw.create_device("dev-m")
    passed_on: list[str] = []

    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        passed_on.append(scope["path"])
        raise AssertionError("not for the lane's inner app")

    lane = TelemetryLane(fails, prefix="/api/v1")
    label = {"method": "POST", "route": "/api/v1/devices/{device_id}/telemetry", "status": "200"}
    before = REGISTRY.get_sample_value("fieldgate_http_requests_total", label) or 0.0

    async def with_app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = gw.app  # as Starlette sets it
        await lane(scope, receive, send)

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=with_app), base_url="http://fg")
    async with client:
        r = await client.post(
            "/api/v1/devices/dev-m/telemetry",
            json={"ts": T0, "values": {"t": 1}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
        assert passed_on == []
        with pytest.raises(AssertionError, match="inner app"):
            await client.get("/api/v1/devices/dev-m/telemetry", headers=gw.admin)
        assert passed_on == ["/api/v1/devices/dev-m/telemetry"]
    # Through the whole app, the request metric counts the lane's answer under the route.
    r = await gw.post("dev-m", token, {"ts": T0 + 1, "values": {"t": 2}})
    assert r.status_code == 200, r.text
    assert REGISTRY.get_sample_value("fieldgate_http_requests_total", label) == before + 1


async def test_under_a_mount_the_lane_matches_the_path_as_the_router_does(tmp_path: Any) -> None:
    """Embedded under a mount (`root_path`), the router matches the path below the mount's; so
    must the lane: a path the route does not serve is not stored."""
    answers: dict[bool, list[tuple[int, Any]]] = {}
    for lane in (True, False):
        settings = make_settings(f"sqlite://{tmp_path}/{lane}.db", max_body_bytes=4096)
        app = create_app(settings, telemetry_lane=lane)
        parent = Starlette(routes=[Mount("/api", app=app)])
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=parent)
            async with httpx.AsyncClient(transport=transport, base_url="http://fg") as client:
                admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                r = await client.post("/api/api/v1/devices", json={"id": "dev-a"}, headers=admin)
                assert r.status_code == 201, r.text
                device = {"Authorization": f"Bearer {r.json()['token']}"}
                got = []
                for path in (
                    "/api/v1/devices/dev-a/telemetry",
                    "/api/api/v1/devices/dev-a/telemetry",
                ):
                    r = await client.post(path, content=reading(), headers=device)
                    got.append((r.status_code, r.json()))
                answers[lane] = got
    assert answers[True] == answers[False]
    assert [status for status, _ in answers[True]] == [404, 200]
