"""The operator console (gateway/console/) in a real browser: Debian's chromium driven by
Playwright against a real `fieldgate serve` on SQLite. What the charts draw is read back from
the page (`window.fieldgate.charts[metric].data`, uPlot's series) and compared with what the
test posted and what the API aggregates. The screenshots of the devices and device pages are
written to test-artifacts/screenshots/ (ignored by git), or where FIELDGATE_SCREENSHOTS_DIR
says: `FIELDGATE_SCREENSHOTS_DIR=docs/screenshots` refreshes the copies the README links."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ADMIN_TOKEN, CHROMIUM, GatewayProcess, free_port, need_chromium
from tests.harness import wait_for_healthz

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / os.environ.get("FIELDGATE_SCREENSHOTS_DIR", "test-artifacts/screenshots")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The charted device's readings: one every 2 minutes (at :30) over the last 23 hours (the hour
# left keeps them all inside "the last 24 h" however late in the suite this module runs), a
# daily swing plus a wobble: each bucket of the 24 h range's `auto` window (5 minutes) holds 2-3
# and draws a min/max band around its average.
NOW_MS = int(time.time() * 1000)
TEMPS = [
    (NOW_MS - k * 120_000 - 30_000, round(21 + 3 * math.sin(k / 120) + (k % 4) * 0.25, 2))
    for k in range(690, 0, -1)
]
HUMIDITY = [(ts, round(45 - 2 * (temp - 21), 2)) for ts, temp in TEMPS]
EXPECT_MS = 5_000  # what a page may take to show what it loaded (typically well under 1 s)


class Fleet:
    """The running gateway and the devices the tests made."""

    def __init__(self, gateway: GatewayProcess, database: Path) -> None:
        self.gateway = gateway
        self.database = database
        self.url = gateway.base_url
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )
        self.tokens: dict[str, str] = {}

    def create(self, device: str, name: str = "") -> str:
        r = self.client.post("/api/v1/devices", json={"id": device, "name": name})
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        self.tokens[device] = token
        return token

    def post(self, device: str, readings: list[dict[str, Any]], token: str | None = None) -> None:
        r = self.client.post(
            f"/api/v1/devices/{device}/telemetry",
            json=readings,
            headers={"Authorization": f"Bearer {token or self.tokens[device]}"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == sum(len(x["values"]) for x in readings), r.text

    def reject(self, device: str, reason: str, message: str) -> None:
        """A dead letter as the MQTT bridge stores one (this gateway runs without MQTT)."""
        with sqlite3.connect(self.database) as db:
            db.execute(
                "INSERT INTO dead_letter (received_us, transport, device_id, topic, reason,"
                " message, details, payload_bytes, payload) VALUES (?, 'mqtt', ?, ?, ?, ?,"
                " '[]', 5, ?)",
                (NOW_MS * 1000, device, f"devices/{device}/telemetry", reason, message, b"{oops"),
            )


def start(gateway: GatewayProcess, within_s: float = 30) -> None:
    """Spawn `fieldgate serve` and wait until it answers /healthz (synchronous: Playwright's sync
    API runs its own loop, where asyncio.run cannot)."""
    gateway.spawn()
    assert gateway.process is not None
    wait_for_healthz(gateway.base_url, gateway.process, gateway.log_path.read_text, within_s)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    need_chromium()
    workdir = tmp_path_factory.mktemp("console")
    database = workdir / "fieldgate.sqlite3"
    env = {
        "FIELDGATE_DATABASE_URL": f"sqlite:///{database}",
        "FIELDGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FIELDGATE_MQTT_URL": "",
    }
    gateway = GatewayProcess(env, free_port(), workdir / "fieldgate.log")
    start(gateway)
    fleet = Fleet(gateway, database)
    try:
        fleet.create("console-boiler", "Boiler room")
        fleet.create("console-roof", "Roof station")
        fleet.create("console-idle")
        fleet.post(
            "console-boiler",
            [
                {"ts": ts, "values": {"temp": temp, "humidity": hum}}
                for (ts, temp), (_, hum) in zip(TEMPS, HUMIDITY, strict=True)
            ],
        )
        fleet.post("console-roof", [{"ts": NOW_MS - 60_000, "values": {"wind": 3.5}}])
        fleet.reject("console-boiler", "invalid_json", "the payload is not JSON")
        yield fleet
    finally:
        fleet.client.close()
        gateway.terminate()


@pytest.fixture(scope="module")
def browser(fleet: Fleet) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, fleet: Fleet) -> Iterator[Page]:
    context = browser.new_context(
        viewport={"width": 1200, "height": 900}, base_url=fleet.url, timezone_id="UTC"
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], "the console raised in the page"


def signed_in(page: Page, token: str = ADMIN_TOKEN, at: str = "/#/devices") -> Page:
    """The console at `at` with `token` in its session, as after signing in."""
    page.add_init_script(f"sessionStorage.setItem('fieldgate.token', {json.dumps(token)})")
    page.goto(at)
    return page


def unlabelled(page: Page) -> list[str]:
    """The form controls on show that have no label (nor any accessible name)."""
    found: list[str] = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter((e) => e.getClientRects().length > 0)
            .filter((e) => !(e.labels?.length || e.getAttribute("aria-label")
                || (e.tagName === "BUTTON" && e.textContent.trim())))
            .map((e) => e.outerHTML)"""
    )
    return found


def chart_data(page: Page, metric: str) -> list[list[float]]:
    """[x (epoch s), avg, min, max] as the metric's chart draws them."""
    page.wait_for_function(f"() => window.fieldgate.charts[{json.dumps(metric)}] !== undefined")
    data: list[list[float]] = page.evaluate(
        f"() => window.fieldgate.charts[{json.dumps(metric)}].plot.data.map((s) => Array.from(s))"
    )
    return data


def expected_buckets(readings: list[tuple[int, float]], window_ms: int) -> dict[int, list[float]]:
    """Bucket start (epoch ms, windows aligned to the epoch) -> the values posted in it."""
    buckets: dict[int, list[float]] = {}
    for ts, value in readings:
        buckets.setdefault(ts - ts % window_ms, []).append(value)
    return buckets


class TestSignIn:
    def test_serve_prints_where_the_console_is(self, fleet: Fleet) -> None:
        log = fleet.gateway.log_path.read_text()
        assert f"operator console: {fleet.url}/ (sign in with an admin or operator token)" in log

    def test_tab_reaches_the_form_and_enter_submits(self, page: Page) -> None:
        page.goto("/")
        field = page.get_by_label("Token", exact=True)
        expect(field).to_be_visible()
        assert unlabelled(page) == []
        page.locator("body").focus()
        for _ in range(10):  # the skip link, the brand, then the form
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "signin-token":
                break
        expect(field).to_be_focused()
        page.keyboard.type(ADMIN_TOKEN)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Devices")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('fieldgate.token')") == ADMIN_TOKEN
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("Token", exact=True)).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('fieldgate.token')") is None

    def test_a_wrong_token_is_refused_with_a_message(self, page: Page) -> None:
        page.goto("/")
        page.get_by_label("Token", exact=True).fill("not-a-token")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#signin-message")).to_contain_text("401")
        expect(page.get_by_label("Token", exact=True)).to_be_visible()

    def test_a_401_anywhere_shows_the_sign_in_again(self, page: Page, fleet: Fleet) -> None:
        signed_in(page, "fgo_revoked-or-never-valid", at="/#/devices/console-boiler")
        expect(page.locator("#signin-message")).to_contain_text("401")
        expect(page.get_by_label("Token", exact=True)).to_be_focused()
        assert page.evaluate("sessionStorage.getItem('fieldgate.token')") is None


class TestDevices:
    def test_the_list_shows_the_devices_made(self, page: Page, fleet: Fleet) -> None:
        signed_in(page)
        for device in ("console-boiler", "console-roof", "console-idle"):
            expect(page.locator(f"tr[data-device='{device}']")).to_be_visible()
        boiler = page.locator("tr[data-device='console-boiler']")
        expect(boiler).to_contain_text("Boiler room")
        expect(boiler.get_by_role("link", name="console-boiler")).to_be_visible()
        last_seen = boiler.locator("time")
        expect(last_seen).to_have_attribute("title", last_seen_of(fleet))
        expect(page.locator("tr[data-device='console-idle']")).to_contain_text("never")
        listed = fleet.client.get("/api/v1/devices").json()["devices"][0]
        if "readings_24h" in listed:  # GET /devices' counts of the last 24 h (consoleapi)
            expect(boiler.locator("td[data-label='Readings (24 h)']")).to_have_text(
                f"{len(TEMPS) * 2:,}"
            )
            expect(boiler.locator("td[data-label='Rejected (24 h)']")).to_have_text("1")
        else:
            expect(boiler.locator("td[data-label='Readings (24 h)']")).to_have_text("—")
        assert unlabelled(page) == []
        page.screenshot(path=str(SCREENSHOTS / "devices.png"), full_page=True)

    def test_search_narrows_the_list(self, page: Page, fleet: Fleet) -> None:
        signed_in(page)
        expect(page.locator("tr[data-device='console-boiler']")).to_be_visible()
        page.get_by_label("Search devices").fill("roof")
        page.get_by_label("Search devices").press("Enter")
        searched = fleet.client.get("/api/v1/devices", params={"q": "roof"}).json()["devices"]
        if len(searched) > 1:
            pytest.skip("GET /api/v1/devices has no `q` search on this branch yet (consoleapi)")
        expect(page.locator("#device-table tbody tr")).to_have_count(1)
        expect(page.locator("tr[data-device='console-roof']")).to_be_visible()

    def test_readable_at_360_px_without_horizontal_scroll(
        self, browser: Browser, fleet: Fleet
    ) -> None:
        context = browser.new_context(viewport={"width": 360, "height": 740}, base_url=fleet.url)
        try:
            page = signed_in(context.new_page())
            expect(page.locator("tr[data-device='console-boiler']")).to_be_visible()
            widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1], f"scrolls sideways at 360 px: {widths}"
            page.goto("/#/devices/console-boiler")
            chart_data(page, "temp")
            widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1], f"the device page scrolls sideways at 360 px: {widths}"
        finally:
            context.close()

    def test_create_shows_the_token_once(self, page: Page, fleet: Fleet) -> None:
        signed_in(page)
        page.get_by_label("Device ID").fill("console-new")
        page.get_by_label("Name (optional)").fill("Made in the console")
        page.get_by_role("button", name="Create device").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_be_visible()
        token = page.get_by_label("Token for console-new").input_value()
        assert token
        expect(dialog.get_by_role("button", name="Copy")).to_be_visible()
        # It is the device's real token: it writes.
        fleet.post("console-new", [{"ts": NOW_MS, "values": {"t": 1.0}}], token=token)
        dialog.get_by_role("button", name="Close").click()
        expect(dialog).to_be_hidden()
        assert page.get_by_label("Token for console-new").input_value() == ""
        assert token not in page.content()
        expect(page.locator("tr[data-device='console-new']")).to_contain_text("Made in the console")

    def test_pages_follow_next_cursor(self, page: Page, fleet: Fleet) -> None:
        for i in range(50):  # ids after every other test's: their rows stay on page 1
            fleet.create(f"zz-page-{i:02}")
        total = len(fleet.client.get("/api/v1/devices", params={"limit": 1000}).json()["devices"])
        signed_in(page)
        rows = page.locator("#device-table tbody tr")
        expect(rows).to_have_count(50)
        expect(page.locator("tr[data-device='console-boiler']")).to_be_visible()
        expect(page.get_by_role("button", name="Previous")).to_be_disabled()
        page.get_by_role("button", name="Next").click()
        expect(rows).to_have_count(total - 50)
        expect(page.locator("tr[data-device='zz-page-49']")).to_be_visible()
        expect(page.get_by_role("button", name="Next")).to_be_disabled()
        page.get_by_role("button", name="Previous").click()
        expect(page.locator("tr[data-device='console-boiler']")).to_be_visible()


def last_seen_of(fleet: Fleet) -> str:
    device = fleet.client.get("/api/v1/devices/console-boiler").json()
    last_seen: str = device["last_seen"]
    return last_seen


class TestDevicePage:
    def test_charts_draw_the_posted_readings(self, page: Page, fleet: Fleet) -> None:
        signed_in(page, at="/#/devices/console-boiler")
        expect(page.get_by_role("heading", name="console-boiler")).to_be_visible()
        drawn = chart_data(page, "temp")
        answer = fleet.client.get(
            "/api/v1/devices/console-boiler/telemetry/aggregate",
            params={"metric": "temp", "start": "-24h", "window": "auto", "agg": "avg,min,max"},
        ).json()
        # What the API aggregates, as the chart draws it.
        assert drawn == [
            [datetime.fromisoformat(b["start"]).timestamp() for b in answer["buckets"]],
            [b["avg"] for b in answer["buckets"]],
            [b["min"] for b in answer["buckets"]],
            [b["max"] for b in answer["buckets"]],
        ]
        # And what the test posted: each bucket's readings, whose min/max make a band.
        window_ms = int(datetime.fromisoformat(answer["buckets"][1]["start"]).timestamp() * 1000)
        window_ms -= int(datetime.fromisoformat(answer["buckets"][0]["start"]).timestamp() * 1000)
        assert drawn[0] == [b / 1000 for b in expected_buckets(TEMPS, window_ms)]
        for x, avg, low, high in zip(*drawn, strict=True):
            values = expected_buckets(TEMPS, window_ms)[int(x * 1000)]
            assert avg == pytest.approx(sum(values) / len(values))
            assert (low, high) == (min(values), max(values))
        assert any(low < high for _, _, low, high in zip(*drawn, strict=True)), "no band drawn"
        assert chart_data(page, "humidity")[2] == [
            min(v) for v in expected_buckets(HUMIDITY, window_ms).values()
        ]
        latest = page.locator("#latest-table tr[data-metric='temp']")
        expect(latest).to_contain_text(f"{TEMPS[-1][1]:g}")
        expect(page.locator("#rejected-table")).to_contain_text("invalid_json")
        expect(page.locator("#rejected-table")).to_contain_text("the payload is not JSON")
        page.get_by_label("Range").select_option("custom")  # its inputs on show too
        assert unlabelled(page) == []
        page.get_by_label("Range").select_option("24h")
        chart_data(page, "humidity")
        page.screenshot(path=str(SCREENSHOTS / "device.png"), full_page=True)

    def test_a_range_picker_reloads_the_charts(self, page: Page, fleet: Fleet) -> None:
        signed_in(page, at="/#/devices/console-boiler")
        assert len(chart_data(page, "temp")[0]) > 30
        page.get_by_label("Range").select_option("1h")
        # The last hour: ~30 readings in 10 s windows, one reading each.
        page.wait_for_function("() => window.fieldgate.charts.temp?.plot.data[0].length < 35")
        drawn = chart_data(page, "temp")
        in_hour = [t for ts, t in TEMPS if ts >= drawn[0][0] * 1000]
        assert drawn[1] == in_hour
        # (the readings were posted when the module started: on a slow machine, minutes ago)
        hour_ago_ms = time.time() * 1000 - 3_600_000
        assert abs(len(in_hour) - sum(ts >= hour_ago_ms for ts, _ in TEMPS)) <= 1
        assert len(in_hour) >= 10
        expect(page.locator("#window-summary")).to_contain_text("windows of 10s")

    def test_a_custom_range_is_charted_and_not_live(self, page: Page) -> None:
        signed_in(page, at="/#/devices/console-boiler")
        chart_data(page, "temp")
        page.get_by_label("Range").select_option("custom")
        start, end = TEMPS[100][0] // 1000, TEMPS[130][0] // 1000  # an hour; the page's zone: UTC
        for label, at in (("Start", start), ("End", end)):
            page.get_by_label(label).fill(
                datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            )
        page.get_by_role("button", name="Show").click()
        page.wait_for_function("() => window.fieldgate.charts.temp?.plot.data[0].length === 30")
        assert chart_data(page, "temp")[1] == [t for _, t in TEMPS[100:130]]
        expect(page.locator("#window-summary")).to_contain_text("not live")
        assert page.evaluate("() => window.fieldgate.stream.state") == "closed"

    def test_a_reading_posted_over_http_appears_live(self, page: Page, fleet: Fleet) -> None:
        signed_in(page, at="/#/devices/console-roof")
        chart_data(page, "wind")
        page.wait_for_function(
            "() => ['open', 'failed'].includes(window.fieldgate.stream.state)", timeout=EXPECT_MS
        )
        if page.evaluate("window.fieldgate.stream.state") == "failed":
            pytest.skip("no live stream (GET .../telemetry/stream) on this branch yet")
        fleet.post("console-roof", [{"ts": int(time.time() * 1000), "values": {"wind": 12.25}}])
        page.wait_for_function(
            "() => window.fieldgate.charts.wind.live.some((p) => p.value === 12.25)", timeout=2_000
        )
        assert 12.25 in chart_data(page, "wind")[3]  # the max of the bucket it went into
        expect(page.locator("#latest-table tr[data-metric='wind']")).to_contain_text("12.25")

    def test_admin_actions(self, page: Page, fleet: Fleet) -> None:
        fleet.create("console-doomed")
        signed_in(page, at="/#/devices/console-doomed")
        page.get_by_role("button", name="Disable").click()
        expect(page.locator("#device-enabled")).to_have_text("no")
        assert fleet.client.get("/api/v1/devices/console-doomed").json()["enabled"] is False
        page.get_by_role("button", name="Enable").click()
        expect(page.locator("#device-enabled")).to_have_text("yes")

        page.get_by_role("button", name="Rotate token").click()
        page.get_by_role("button", name="Rotate token").last.click()  # the confirmation's
        token = page.get_by_label("Token for console-doomed")
        expect(token).not_to_have_value("")
        fleet.post("console-doomed", [{"ts": NOW_MS, "values": {"t": 2.0}}], token.input_value())
        page.get_by_role("button", name="Close").click()

        page.get_by_role("button", name="Delete", exact=True).click()
        page.get_by_role("button", name="Cancel").click()
        assert fleet.client.get("/api/v1/devices/console-doomed").status_code == 200
        page.get_by_role("button", name="Delete", exact=True).click()
        page.get_by_role("button", name="Delete device").click()
        expect(page.get_by_role("heading", name="Devices")).to_be_visible()
        assert fleet.client.get("/api/v1/devices/console-doomed").status_code == 404

    def test_an_operator_sees_the_403(self, page: Page, fleet: Fleet) -> None:
        r = fleet.client.post("/api/v1/tokens", json={"role": "operator", "name": "console test"})
        assert r.status_code == 201, r.text
        signed_in(page, r.json()["token"], at="/#/devices/console-roof")
        page.get_by_role("button", name="Disable").click()
        expect(page.locator("#admin-message")).to_contain_text("403")
        assert fleet.client.get("/api/v1/devices/console-roof").json()["enabled"] is True

    def test_a_503_and_a_network_error_are_messages_not_blank_charts(self, page: Page) -> None:
        unavailable = {
            "error": {
                "code": "database_unavailable",
                "message": "the database is unavailable; retry later",
                "details": [],
            }
        }
        # The browser's answers replaced: the gateway's own 503 needs its database down.
        page.route(
            "**/telemetry/aggregate?**",
            lambda route: route.fulfill(status=503, headers={"Retry-After": "7"}, json=unavailable),
        )
        page.route("**/telemetry/latest", lambda route: route.abort("connectionrefused"))
        signed_in(page, at="/#/devices/console-boiler")
        charts = page.locator("#charts [role=alert]")
        expect(charts).to_contain_text("unavailable (503)")
        expect(charts).to_contain_text("Retry in 7 s")
        expect(page.locator("#latest [role=alert]")).to_contain_text("could not be reached")
        assert page.evaluate("() => Object.keys(window.fieldgate.charts)") == []
        page.unroute("**/telemetry/aggregate?**")
        charts.get_by_role("button", name="Try again").click()
        assert len(chart_data(page, "temp")[0]) > 30

    def test_an_unknown_device_is_a_message(self, page: Page) -> None:
        signed_in(page, at="/#/devices/no-such-device")
        expect(page.get_by_role("alert").filter(has_text="404")).to_be_visible()


class TestLiveResume:
    """Last in the module: it restarts the gateway under the page."""

    def test_after_a_drop_the_stream_resumes_with_last_event_id(
        self, page: Page, fleet: Fleet
    ) -> None:
        resumed_with: list[str | None] = []
        page.on(
            "request",
            lambda r: (
                resumed_with.append(r.headers.get("last-event-id"))
                if r.url.endswith("/telemetry/stream")
                else None
            ),
        )
        signed_in(page, at="/#/devices/console-roof")
        chart_data(page, "wind")
        page.wait_for_function("() => window.fieldgate.stream.state === 'open'")
        fleet.post("console-roof", [{"ts": int(time.time() * 1000), "values": {"wind": 7.75}}])
        page.wait_for_function(
            "() => window.fieldgate.charts.wind.live.some((p) => p.value === 7.75)"
        )
        last_id = page.evaluate("() => window.fieldgate.stream.lastId")
        assert last_id

        # a graceful stop (uvicorn re-raises the signal once stopped)
        assert fleet.gateway.terminate() in (0, -signal.SIGTERM)
        page.wait_for_function("() => window.fieldgate.stream.state !== 'open'")
        start(fleet.gateway)
        # Committed before the page is back: it comes by the resume, not the live tail.
        fleet.post("console-roof", [{"ts": int(time.time() * 1000), "values": {"wind": 8.5}}])
        page.wait_for_function(
            "() => window.fieldgate.charts.wind.live.some((p) => p.value === 8.5)", timeout=15_000
        )
        assert resumed_with[0] is None  # the first request: nothing to resume
        assert last_id in resumed_with[1:], resumed_with
        live = page.evaluate("() => window.fieldgate.charts.wind.live.map((p) => p.value)")
        assert live.count(7.75) == 1, live  # none twice
        assert live.count(8.5) == 1, live
