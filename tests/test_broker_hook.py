"""Brokers that ask over HTTP (EMQX's HTTP authentication and authorization): who may connect,
who may use which topic, the broker's secret, and revocation reaching the answers. The requests
are made as EMQX 5 makes them from the configuration its documentation shows (placeholders
rendered into a JSON body, a form body or the query string). Both databases."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from devices.models import Role
from gateway.broker.hook import covers, is_filter
from gateway.store import registry
from tests.conftest import Gateway, make_settings, poll_until
from tests.harness import bearer, new_token, running

SECRET = "broker-hook-" + secrets.token_hex(8)
GATEWAY_USER = "fieldgate-gw"
GATEWAY_PASSWORD = "gw-" + secrets.token_hex(8)
# The gateway's broker identity is FIELDGATE_MQTT_URL's; port 9 (discard) refuses, so the bridge
# keeps retrying in the background and never connects: the hook needs no broker.
MQTT_URL = f"mqtt://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:9"
AUTHN = "/api/v1/broker/authenticate"
AUTHZ = "/api/v1/broker/authorize"

# EMQX's default headers on a POST (emqx_auth_http_utils:default_headers/0), and the one the
# documentation's configuration adds; the secret is a header the user configures.
EMQX_HEADERS = {
    "accept": "application/json",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "keep-alive": "timeout=30, max=1000",
    "content-type": "application/json",
    "x-request-source": "EMQX",
    "authorization": f"Bearer {SECRET}",
}
# The request templates of EMQX's documentation (access-control/authn/http.md, authz/http.md)
AUTHN_BODY = {"username": "${username}", "password": "${password}"}
AUTHN_URL = AUTHN + "?clientid=${clientid}"
AUTHZ_BODY = {"username": "${username}", "topic": "${topic}", "action": "${action}"}
AUTHZ_URL = AUTHZ + "?clientid=${clientid}"


def render(template: str, values: dict[str, str]) -> str:
    """A template with `${name}` placeholders filled (an absent value is "", as EMQX does)."""
    out = template
    for name in ("username", "password", "clientid", "topic", "action"):
        out = out.replace("${" + name + "}", values.get(name, ""))
    return out


async def ask(
    gw: Gateway,
    url: str,
    body: dict[str, str],
    values: dict[str, str],
    *,
    method: str = "post",
    content_type: str = "application/json",
    headers: dict[str, str | None] | None = None,
) -> httpx.Response:
    """The request EMQX makes for `values` from a URL and body template (emqx_auth_http_utils:
    generate_request/2): POST with the body as JSON or as a form, or GET with it in the query
    string. Placeholders in the URL's query are filled in URL-encoded."""
    path, _, query = url.partition("?")
    query_fields = {
        k: render(v, values) for k, v in (p.split("=", 1) for p in query.split("&") if p)
    }
    fields = {k: render(v, values) for k, v in body.items()}
    given: dict[str, str | None] = {**EMQX_HEADERS, **(headers or {})}
    sent = {k: v for k, v in given.items() if v is not None}  # None: not sent
    if method == "get":
        sent.pop("content-type")
        return await gw.client.get(path, params={**query_fields, **fields}, headers=sent)
    sent["content-type"] = content_type
    if content_type == "application/json":
        content = json.dumps(fields, separators=(",", ":")).encode()
    else:
        content = urlencode(fields).encode()
    return await gw.client.post(path, params=query_fields, content=content, headers=sent)


async def authn(
    gw: Gateway, username: str, password: str, clientid: str | None = None, **kwargs: Any
) -> str:
    """EMQX's authentication answer for a client (its client id: the username unless given):
    allow or deny."""
    values = {"username": username, "password": password, "clientid": clientid or username}
    r = await ask(gw, AUTHN_URL, AUTHN_BODY, values, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["is_superuser"] is False
    assert set(answer) == {"result", "is_superuser"}
    return str(answer["result"])


async def authz(gw: Gateway, username: str, action: str, topic: str, **kwargs: Any) -> str:
    """EMQX's authorization answer for a client's publish or subscribe: allow or deny."""
    values = {"username": username, "clientid": f"c-{username}", "topic": topic, "action": action}
    r = await ask(gw, AUTHZ_URL, AUTHZ_BODY, values, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert set(answer) == {"result"}
    return str(answer["result"])


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


def hook_settings(database_url: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {"broker_hook_secret": SECRET, "mqtt_url": MQTT_URL}
    values.update(overrides)
    return make_settings(database_url, **values)


@pytest.fixture
async def hooked(database_url: str) -> AsyncIterator[Gateway]:
    """A gateway with the broker hook on, and a low failure throttle (which the hook must not
    feed)."""
    async with running(hook_settings(database_url, auth_failure_limit=3)) as gw:
        yield gw


@pytest.fixture
async def prefixed(database_url: str) -> AsyncIterator[Gateway]:
    """The hook with FIELDGATE_MQTT_TOPIC_PREFIX=site-1."""
    async with running(hook_settings(database_url, mqtt_topic_prefix="site-1")) as gw:
        yield gw


class TestAuthenticate:
    async def test_a_device_with_its_token(self, hooked: Gateway) -> None:
        token = await hooked.create_device("dev-a")
        assert await authn(hooked, "dev-a", token) == "allow"

    async def test_form_and_query_string_ask_the_same(self, hooked: Gateway) -> None:
        token = await hooked.create_device("dev-a")
        form = {"content_type": "application/x-www-form-urlencoded"}
        assert await authn(hooked, "dev-a", token, **form) == "allow"
        assert await authn(hooked, "dev-a", token, method="get") == "allow"
        assert await authn(hooked, "dev-a", token + "x", **form) == "deny"
        assert await authn(hooked, "dev-a", token + "x", method="get") == "deny"

    async def test_anyone_else_is_denied(self, hooked: Gateway) -> None:
        token_a = await hooked.create_device("dev-a")
        token_b = await hooked.create_device("dev-b")
        operator = await new_token(Role.OPERATOR)
        refused = [
            ("dev-a", token_a + "x"),  # a wrong token
            ("dev-a", token_b),  # another device's token
            ("dev-a", ""),  # no password
            ("", ""),  # anonymous
            ("", token_a),  # a token without the username
            ("nobody", token_a),  # not a device
            ("dev-a", hooked.admin["Authorization"].removeprefix("Bearer ")),  # the admin token
            ("dev-a", operator),
            (GATEWAY_USER, token_a),  # the gateway's username with a device's token
        ]
        for username, password in refused:
            assert await authn(hooked, username, password) == "deny", (username, password)
        assert await authn(hooked, "dev-b", token_b) == "allow"

    async def test_a_device_connects_as_itself_only(self, hooked: Gateway) -> None:
        """With its id as client id, or not at all: a broker gives a session to whoever connects
        with its client id, so a device must never take the gateway's (or another's)."""
        token = await hooked.create_device("dev-a")
        assert await authn(hooked, "dev-a", token, clientid="dev-a") == "allow"
        for other in ("fieldgate-gw", "dev-b", "dev-a-2"):
            assert await authn(hooked, "dev-a", token, clientid=other) == "deny", other
        # ids that start like the gateway's client ids are never a device's
        reserved = await hooked.create_device("fieldgate-x")
        assert await authn(hooked, "fieldgate-x", reserved) == "deny"

    async def test_the_gateway_identity(self, hooked: Gateway) -> None:
        assert await authn(hooked, GATEWAY_USER, GATEWAY_PASSWORD) == "allow"
        assert await authn(hooked, GATEWAY_USER, GATEWAY_PASSWORD + "x") == "deny"
        assert await authn(hooked, GATEWAY_USER, "") == "deny"

    async def test_a_disabled_device(self, hooked: Gateway) -> None:
        token = await hooked.create_device("dev-a")
        assert await authn(hooked, "dev-a", token) == "allow"  # cached now
        r = await hooked.client.patch(
            "/api/v1/devices/dev-a", json={"enabled": False}, headers=hooked.admin
        )
        assert r.status_code == 200, r.text
        assert await authn(hooked, "dev-a", token) == "deny"

    async def test_a_device_created_disabled(self, hooked: Gateway) -> None:
        token = await hooked.create_device("dev-a", enabled=False)
        assert await authn(hooked, "dev-a", token) == "deny"

    async def test_a_deleted_device(self, hooked: Gateway) -> None:
        token = await hooked.create_device("dev-a")
        assert await authn(hooked, "dev-a", token) == "allow"
        r = await hooked.client.delete("/api/v1/devices/dev-a", headers=hooked.admin)
        assert r.status_code == 204
        assert await authn(hooked, "dev-a", token) == "deny"

    async def test_a_rotated_token(self, hooked: Gateway) -> None:
        old = await hooked.create_device("dev-a")
        assert await authn(hooked, "dev-a", old) == "allow"
        r = await hooked.client.post("/api/v1/devices/dev-a/token", headers=hooked.admin)
        assert r.status_code == 200, r.text
        assert await authn(hooked, "dev-a", old) == "deny"
        assert await authn(hooked, "dev-a", r.json()["token"]) == "allow"

    async def test_a_rotation_elsewhere_within_a_second(self, hooked: Gateway) -> None:
        """Another instance or the CLI rotates: the auth change poll drops the cached token."""
        old = await hooked.create_device("dev-a")
        assert await authn(hooked, "dev-a", old) == "allow"
        await registry.rotate_device_token(await registry.get_device("dev-a"))

        async def denied() -> bool:
            return await authn(hooked, "dev-a", old) == "deny"

        await poll_until(denied, within=1.0, what="the old token's deny")

    async def test_denials_do_not_feed_the_failure_throttle(self, hooked: Gateway) -> None:
        """Every question comes from the broker's one address: its devices' wrong passwords
        must not lock the address out (the limit here is 3)."""
        token = await hooked.create_device("dev-a")
        for i in range(10):
            assert await authn(hooked, "dev-a", f"wrong-{i}") == "deny"
        assert await authn(hooked, "dev-a", token) == "allow"
        # the API's own token checks from this address are not throttled either
        r = await hooked.client.get("/api/v1/devices", headers=bearer("not-a-token"))
        assert r.status_code == 401, r.text


class TestAuthorize:
    async def test_a_device_uses_its_own_topics_only(self, hooked: Gateway) -> None:
        await hooked.create_device("dev-a")
        await hooked.create_device("dev-b")
        cases = [
            ("publish", "devices/dev-a/telemetry", "allow"),
            ("publish", "devices/dev-a/senml", "allow"),  # SenML packs
            ("subscribe", "devices/dev-a/errors", "allow"),
            ("publish", "devices/dev-b/telemetry", "deny"),  # another device's topic
            ("publish", "devices/dev-b/senml", "deny"),
            ("subscribe", "devices/dev-b/errors", "deny"),
            ("publish", "devices/dev-a/errors", "deny"),  # the gateway's to publish
            ("subscribe", "devices/dev-a/telemetry", "deny"),
            ("subscribe", "devices/+/errors", "deny"),  # every device's errors
            ("subscribe", "devices/dev-a/#", "deny"),  # its telemetry too
            ("subscribe", "#", "deny"),
            ("subscribe", "$share/g/devices/dev-b/errors", "deny"),
            ("publish", "devices/+/telemetry", "deny"),  # a wildcard is no topic name
            ("publish", "devices/dev-a/telemetry/x", "deny"),
            ("publish", "other/topic", "deny"),
            ("publish", "", "deny"),
            ("all", "devices/dev-a/telemetry", "deny"),  # not an action EMQX asks about
            ("", "devices/dev-a/telemetry", "deny"),
        ]
        for action, topic, expected in cases:
            assert await authz(hooked, "dev-a", action, topic) == expected, (action, topic)

    async def test_form_and_query_string_ask_the_same(self, hooked: Gateway) -> None:
        await hooked.create_device("dev-a")
        form = {"content_type": "application/x-www-form-urlencoded"}
        for kwargs in [form, {"method": "get"}]:
            assert await authz(hooked, "dev-a", "publish", "devices/dev-a/telemetry", **kwargs) == (
                "allow"
            )
            assert await authz(hooked, "dev-a", "subscribe", "devices/+/errors", **kwargs) == (
                "deny"
            )

    async def test_the_gateway(self, hooked: Gateway) -> None:
        cases = [
            ("subscribe", "$share/g/devices/+/telemetry", "allow"),  # as the bridge asks
            ("subscribe", "devices/+/telemetry", "allow"),  # EMQX strips $share/g/ first
            ("subscribe", "$share/g/devices/+/senml", "allow"),
            ("subscribe", "devices/+/senml", "allow"),
            ("publish", "devices/dev-a/senml", "deny"),
            ("publish", "devices/dev-a/errors", "allow"),
            ("publish", "devices/dev-a/telemetry", "deny"),
            ("subscribe", "devices/#", "deny"),
            ("subscribe", "#", "deny"),
            ("subscribe", "$share/g/#", "deny"),
            ("publish", "devices/+/errors", "deny"),
        ]
        for action, topic, expected in cases:
            assert await authz(hooked, GATEWAY_USER, action, topic) == expected, (action, topic)

    async def test_unknown_and_disabled_devices_are_denied(self, hooked: Gateway) -> None:
        assert await authz(hooked, "ghost", "publish", "devices/ghost/telemetry") == "deny"
        assert await authz(hooked, "", "publish", "devices//telemetry") == "deny"
        await hooked.create_device("dev-a")
        assert await authz(hooked, "dev-a", "publish", "devices/dev-a/telemetry") == "allow"
        r = await hooked.client.patch(
            "/api/v1/devices/dev-a", json={"enabled": False}, headers=hooked.admin
        )
        assert r.status_code == 200, r.text

        async def denied() -> bool:
            return await authz(hooked, "dev-a", "publish", "devices/dev-a/telemetry") == "deny"

        await poll_until(denied, within=1.0, what="the disabled device's deny")
        r = await hooked.client.delete("/api/v1/devices/dev-a", headers=hooked.admin)
        assert r.status_code == 204
        assert await authz(hooked, "dev-a", "subscribe", "devices/dev-a/errors") == "deny"

    async def test_with_a_topic_prefix(self, prefixed: Gateway) -> None:
        token = await prefixed.create_device("dev-a")
        assert await authn(prefixed, "dev-a", token) == "allow"
        cases = [
            ("dev-a", "publish", "site-1/devices/dev-a/telemetry", "allow"),
            ("dev-a", "subscribe", "site-1/devices/dev-a/errors", "allow"),
            ("dev-a", "publish", "devices/dev-a/telemetry", "deny"),
            ("dev-a", "publish", "site-2/devices/dev-a/telemetry", "deny"),
            ("dev-a", "subscribe", "site-1/devices/+/errors", "deny"),
            (GATEWAY_USER, "subscribe", "$share/g/site-1/devices/+/telemetry", "allow"),
            (GATEWAY_USER, "subscribe", "site-1/devices/+/telemetry", "allow"),
            (GATEWAY_USER, "publish", "site-1/devices/dev-a/errors", "allow"),
            (GATEWAY_USER, "subscribe", "devices/+/telemetry", "deny"),
            (GATEWAY_USER, "publish", "devices/dev-a/errors", "deny"),
        ]
        for username, action, topic, expected in cases:
            got = await authz(prefixed, username, action, topic)
            assert got == expected, (username, action, topic)


class TestTheBrokersSecret:
    async def test_missing_or_wrong_is_401(self, hooked: Gateway) -> None:
        values = {"username": "dev-a", "password": "x", "topic": "t", "action": "publish"}
        for auth in [None, "Bearer wrong", f"Bearer {SECRET}x", f"Basic {SECRET}", SECRET]:
            for url, body in [(AUTHN_URL, AUTHN_BODY), (AUTHZ_URL, AUTHZ_BODY)]:
                r = await ask(hooked, url, body, values, headers={"authorization": auth})
                assert r.status_code == 401, (auth, url, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"

    async def test_an_api_token_is_not_the_secret(self, hooked: Gateway) -> None:
        r = await hooked.client.post(AUTHN, json={}, headers=hooked.admin)
        assert r.status_code == 401, r.text

    async def test_a_body_of_the_wrong_shape(self, hooked: Gateway) -> None:
        auth = bearer(SECRET)
        r = await hooked.client.post(AUTHN, content=b"{nope", headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
        r = await hooked.client.post(AUTHN, json=["dev-a"], headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_body")
        r = await hooked.client.post(AUTHN, json={"username": 7}, headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_body")
        # an empty question is a question nobody passes
        r = await hooked.client.post(AUTHN, headers=auth)
        assert r.json() == {"result": "deny", "is_superuser": False}

    async def test_off_without_a_secret(self, database_url: str) -> None:
        async with running(make_settings(database_url, broker_hook_secret="")) as gw:
            for method in ("GET", "POST"):
                for path in (AUTHN, AUTHZ):
                    r = await gw.client.request(method, path, headers=bearer(SECRET))
                    assert r.status_code == 404, (method, path, r.text)
                    assert r.json()["error"]["code"] == "not_found"

    def test_a_short_secret_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="at least 16 characters"):
            make_settings("sqlite://x", broker_hook_secret="short")
        dev = make_settings("sqlite://x", broker_hook_secret="short", environment="development")
        assert dev.broker_hook_secret == "short"
        assert make_settings("sqlite://x", broker_hook_secret="").broker_hook_secret is None
        assert SECRET not in repr(make_settings("sqlite://x", broker_hook_secret=SECRET))


TOPICS = ["a", "a/b", "a/b/c", "a//b", "/a", "a/", "$SYS/x", "$share/g/a/b", "b/a"]
FILTERS = ["a", "a/+", "a/#", "+/b", "+/+", "#", "+", "a/+/c", "/+", "+/", "$SYS/#", "a/b/#"]


class TestCovers:
    @pytest.mark.parametrize("allowed", FILTERS)
    @pytest.mark.parametrize("topic", TOPICS)
    def test_a_topic_name_as_paho_matches_it(self, allowed: str, topic: str) -> None:
        assert covers(allowed, topic) == topic_matches_sub(allowed, topic)

    @pytest.mark.parametrize(
        ("allowed", "requested", "expected"),
        [
            ("devices/+/errors", "devices/+/errors", True),
            ("devices/+/errors", "devices/a/errors", True),
            ("devices/a/errors", "devices/+/errors", False),  # overlaps, asks for more
            ("devices/a/errors", "devices/a/#", False),
            ("devices/a/#", "devices/a/errors/#", True),
            ("devices/a/#", "devices/a", True),
            ("devices/+", "devices/#", False),  # `devices/#` matches `devices/a/b` too
            ("#", "+/x", True),
            ("#", "#", True),
            ("+", "#", False),
            ("+/+", "+/#", False),
            ("$share/+/devices/+/telemetry", "$share/g/devices/+/telemetry", True),
            ("$share/+/devices/+/telemetry", "$share/+/devices/+/telemetry", True),
            ("+/+/devices/+/telemetry", "$share/g/devices/+/telemetry", False),  # a $ level
        ],
    )
    def test_a_filter_only_within_the_allowed_one(
        self, allowed: str, requested: str, expected: bool
    ) -> None:
        assert covers(allowed, requested) is expected

    @pytest.mark.parametrize(
        ("text", "valid"),
        [
            ("a/+/b", True),
            ("a/#", True),
            ("#", True),
            ("a/b", True),
            ("a//b", True),
            ("", False),
            ("a/#/b", False),
            ("a/b#", False),
            ("a+/b", False),
            ("a/\x00", False),
        ],
    )
    def test_filters_that_are_not_valid(self, text: str, valid: bool) -> None:
        assert is_filter(text) is valid
