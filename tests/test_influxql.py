"""GET|POST /query: the requests Grafana's built-in InfluxDB data source (InfluxQL mode) sends,
replayed as it sends them, and answered as the aggregate API answers on the same data (SQLite
and PostgreSQL).

The query texts are Grafana's own: the backend's query builder
(grafana/grafana pkg/tsdb/influxdb/models/query.go and query_test.go: `SELECT mean("value")
FROM "cpu" WHERE time >= 1596240000000ms and time <= 1596240300000ms GROUP BY time(10s)
fill(null)`), its request (pkg/tsdb/influxdb/influxql/influxql.go `createRequest`: GET with
`q`, `db`, `epoch=ms` in the query string, or POST with `q` in a form body and `db`, `epoch` in
the query string; the data source's user and password as HTTP basic auth), its health check
(`SHOW measurements`, healthcheck.go) and the editor's metadata queries
(public/app/plugins/datasource/influxdb/influxql_query_builder.ts and its tests).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import httpx
import pytest

from devices.models import Role
from gateway.influxql import (
    InfluxQLError,
    Select,
    ShowMeasurements,
    ShowTagKeys,
    ShowTagValues,
    parse,
)
from gateway.influxql_executor import split_metric
from tests.conftest import Gateway
from tests.harness import new_token

S = 1_000_000
BASE = 1_763_596_800 * S  # 2025-11-20T00:00:00Z
BASE_MS = BASE // 1000
TEN_MIN_MS = 600_000
# Grafana's time filter for [BASE, BASE + 10 min]: both ends inclusive, in ms.
TIME_FILTER = f"time >= {BASE_MS}ms and time <= {BASE_MS + TEN_MIN_MS - 1}ms"


def basic(password: str, user: str = "grafana") -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def load(gateway: Gateway) -> str:
    """Two devices: pump-1 with temperature and cpu.usage_idle every 20 s (nothing in minutes 3
    and 4), pump-2 with cpu.usage_idle and cpu.usage_user every 30 s; an operator token."""
    for device, step_s, metrics in (
        ("pump-1", 20, ("temperature", "cpu.usage_idle")),
        ("pump-2", 30, ("cpu.usage_idle", "cpu.usage_user")),
    ):
        token = await gateway.create_device(device)
        messages = []
        for i in range(600 // step_s):
            t = BASE + i * step_s * S
            if device == "pump-1" and 180 * S <= t - BASE < 300 * S:
                continue
            values = {m: round(math.sin(i + len(m) + step_s) * 40 + 50, 3) for m in metrics}
            messages.append({"ts": t // 1000, "values": values})
        r = await gateway.post(device, token, messages)
        assert r.status_code == 200, r.text
    return await new_token(Role.OPERATOR)


async def grafana_get(gateway: Gateway, token: str, q: str) -> httpx.Response:
    """The request createRequest builds with httpMode GET."""
    return await gateway.client.get(
        "/query", params={"db": "mydb", "epoch": "ms", "q": q}, headers=basic(token)
    )


async def grafana_post(gateway: Gateway, token: str, q: str) -> httpx.Response:
    """The request createRequest builds with httpMode POST."""
    return await gateway.client.post(
        "/query",
        params={"db": "mydb", "epoch": "ms"},
        data={"q": q},
        headers=basic(token),
    )


async def fleet(gateway: Gateway, token: str, **params: Any) -> Any:
    r = await gateway.client.get(
        "/api/v1/telemetry/aggregate",
        params={"start": "2025-11-20T00:00:00Z", "end": "2025-11-20T00:10:00Z", **params},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def epoch_ms(rfc3339: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def as_values(buckets: list[dict[str, Any]], key: str) -> list[list[Any]]:
    return [[epoch_ms(b["start"]), b[key]] for b in buckets]


def assert_values(got: list[list[Any]], want: list[list[Any]]) -> None:
    assert [row[0] for row in got] == [row[0] for row in want]
    for g, w in zip(got, want, strict=True):
        for gv, wv in zip(g[1:], w[1:], strict=True):
            assert gv == (pytest.approx(wv, rel=1e-12) if isinstance(wv, float) else wv), (g, w)


class TestGrafanaQueries:
    async def test_built_query_get_and_post_match_the_aggregate_api(self, gateway: Gateway) -> None:
        token = await load(gateway)
        # query.go with a tag condition, time($__interval) = 1m, fill(null)
        q = (
            f'SELECT mean("usage_idle") FROM "cpu" WHERE ("device" = \'pump-1\') AND '
            f"{TIME_FILTER} GROUP BY time(1m) fill(null)"
        )
        want = await fleet(
            gateway, token, metric="cpu.usage_idle", device="pump-1", window="1m", fill="null"
        )
        for send in (grafana_get, grafana_post):
            r = await send(gateway, token, q)
            assert r.status_code == 200, r.text
            (result,) = r.json()["results"]
            assert result["statement_id"] == 0
            (series,) = result["series"]
            assert series["name"] == "cpu"
            assert series["columns"] == ["time", "mean"]
            assert "tags" not in series
            assert_values(series["values"], as_values(want["series"][0]["buckets"], "avg"))
            # minutes 3 and 4 are empty: fill(null) answers them with null
            assert [v for t, v in series["values"] if v is None] == [None, None]

    async def test_group_by_device_gives_a_tagged_series_per_device(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = (
            f'SELECT max("usage_idle") FROM "cpu" WHERE {TIME_FILTER} '
            'GROUP BY time(2m), "device" fill(none)'
        )
        r = await grafana_get(gateway, token, q)
        assert r.status_code == 200, r.text
        series = r.json()["results"][0]["series"]
        assert [s["tags"] for s in series] == [{"device": "pump-1"}, {"device": "pump-2"}]
        want = await fleet(gateway, token, metric="cpu.usage_idle", window="2m", agg="max")
        for s, w in zip(series, want["series"], strict=True):
            assert s["tags"]["device"] == w["device"]
            assert s["columns"] == ["time", "max"]
            assert_values(s["values"], as_values(w["buckets"], "max"))

    async def test_without_group_by_device_devices_are_combined_exactly(
        self, gateway: Gateway
    ) -> None:
        token = await load(gateway)
        q = (
            'SELECT mean("usage_idle"), sum("usage_idle"), count("usage_idle"), '
            f'min("usage_idle") AS "low" FROM "cpu" WHERE {TIME_FILTER} GROUP BY time(1m)'
        )
        r = await grafana_get(gateway, token, q)
        (series,) = r.json()["results"][0]["series"]
        assert series["columns"] == ["time", "mean", "sum", "count", "low"]
        want = await fleet(
            gateway, token, metric="cpu.usage_idle", window="1m", agg="sum,min", fill="null"
        )
        per_device = [s["buckets"] for s in want["series"]]
        expected = []
        for buckets in zip(*per_device, strict=True):
            n = sum(b["count"] for b in buckets)
            total = sum(b["sum"] for b in buckets if b["sum"] is not None)
            low = min(b["min"] for b in buckets if b["min"] is not None)
            expected.append([epoch_ms(buckets[0]["start"]), total / n, total, n, low])
        assert_values(series["values"], expected)

    @pytest.mark.parametrize("fill", ["none", "null", "previous", "linear"])
    async def test_fills_are_fieldgates(self, gateway: Gateway, fill: str) -> None:
        token = await load(gateway)
        q = (
            f'SELECT last("value") FROM "temperature" WHERE {TIME_FILTER} '
            f'GROUP BY time(1m), "device" fill({fill})'
        )
        r = await grafana_post(gateway, token, q)
        (series,) = r.json()["results"][0]["series"]
        assert series["tags"] == {"device": "pump-1"}
        want = await fleet(gateway, token, metric="temperature", window="1m", agg="last", fill=fill)
        assert_values(series["values"], as_values(want["series"][0]["buckets"], "last"))
        assert len(series["values"]) == (8 if fill == "none" else 10)

    async def test_fill_with_a_number(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = (
            f'SELECT mean("value"), count("value") FROM "temperature" WHERE {TIME_FILTER} '
            "GROUP BY time(1m) fill(-1)"
        )
        r = await grafana_get(gateway, token, q)
        values = r.json()["results"][0]["series"][0]["values"]
        empty = [row for row in values if row[2] == -1]
        assert [row[0] for row in empty] == [BASE_MS + 180_000, BASE_MS + 240_000]
        assert all(row[1] == -1 for row in empty)

    async def test_intervals_under_a_second_are_read_as_one_second(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = (
            f'SELECT count("value") FROM "temperature" WHERE time >= {BASE_MS}ms and '
            f"time <= {BASE_MS + 40_999}ms GROUP BY time(200ms) fill(0)"
        )
        r = await grafana_get(gateway, token, q)
        values = r.json()["results"][0]["series"][0]["values"]
        assert len(values) == 41
        assert [row for row in values if row[1] != 0] == [
            [BASE_MS, 1],
            [BASE_MS + 20_000, 1],
            [BASE_MS + 40_000, 1],
        ]
        assert values[1] == [BASE_MS + 1000, 0]

    async def test_tz_aligns_whole_days_as_the_aggregate_apis_tz(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = (
            f'SELECT count("value") FROM "temperature" WHERE {TIME_FILTER} '
            "GROUP BY time(1d) fill(none) tz('Europe/Oslo')"
        )
        r = await grafana_get(gateway, token, q)
        # 01:00 in Oslo: the local day began at 23:00 UTC the day before
        assert r.json()["results"][0]["series"][0]["values"] == [[BASE_MS - 3_600_000, 24]]
        r = await grafana_get(gateway, token, q.replace("Europe/Oslo", "Mars/Olympus"))
        assert "Mars/Olympus" in r.json()["results"][0]["error"]

    async def test_relative_and_rfc3339_times_and_rfc3339_answers(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = (
            'SELECT count("usage_user") FROM "cpu" WHERE time >= \'2025-11-20T00:00:00Z\' '
            "AND time < '2025-11-20T00:02:00Z' AND time > now() - 3650d GROUP BY time(1m)"
        )
        r = await gateway.client.get("/query", params={"q": q}, headers=basic(token))
        (series,) = r.json()["results"][0]["series"]
        assert series["values"] == [["2025-11-20T00:00:00Z", 2], ["2025-11-20T00:01:00Z", 2]]

    async def test_several_statements_and_a_failing_one(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = (
            f'SHOW DATABASES; SELECT first("usage_idle") FROM "cpu" WHERE {TIME_FILTER} '
            "GROUP BY time(1m); SHOW MEASUREMENTS"
        )
        r = await grafana_get(gateway, token, q)
        assert r.status_code == 200
        results = r.json()["results"]
        assert [res["statement_id"] for res in results] == [0, 1, 2]
        assert results[0]["series"][0]["values"] == [["fieldgate"]]
        assert "across devices" in results[1]["error"]
        assert 'GROUP BY "device"' in results[1]["error"]
        assert results[2] == {"statement_id": 2, "error": "not executed"}

    async def test_no_matching_series_is_an_empty_result(self, gateway: Gateway) -> None:
        token = await load(gateway)
        for q in (
            f'SELECT mean("nope") FROM "cpu" WHERE {TIME_FILTER} GROUP BY time(1m)',
            f'SELECT mean("usage_idle") FROM "cpu" WHERE "device" = \'x\' AND {TIME_FILTER} '
            "GROUP BY time(1m)",
            f'SELECT mean("usage_idle") FROM "cpu" WHERE "host" = \'x\' AND {TIME_FILTER} '
            "GROUP BY time(1m)",
        ):
            r = await grafana_get(gateway, token, q)
            assert r.json() == {"results": [{"statement_id": 0}]}, q

    async def test_regex_device_condition_as_grafana_writes_template_variables(
        self, gateway: Gateway
    ) -> None:
        token = await load(gateway)
        q = (
            f'SELECT mean("usage_idle") FROM "cpu" WHERE ("device"::tag =~ /^(pump-2)$/) AND '
            f'{TIME_FILTER} GROUP BY time(5m), "device"::tag fill(null)'
        )
        r = await grafana_get(gateway, token, q)
        series = r.json()["results"][0]["series"]
        assert [s["tags"] for s in series] == [{"device": "pump-2"}]
        assert len(series[0]["values"]) == 2


class TestMetadata:
    async def test_the_editors_metadata_queries(self, gateway: Gateway) -> None:
        token = await load(gateway)

        async def ask(q: str) -> Any:
            r = await grafana_get(gateway, token, q)
            assert r.status_code == 200, r.text
            (result,) = r.json()["results"]
            return result.get("series", [])

        measurements = [
            {"name": "measurements", "columns": ["name"], "values": [["cpu"], ["temperature"]]}
        ]
        assert await ask("SHOW measurements") == measurements  # the health check
        assert await ask("SHOW MEASUREMENTS LIMIT 100") == measurements
        assert await ask("SHOW MEASUREMENTS WITH MEASUREMENT =~ /(?i)TEMP/ LIMIT 100") == [
            {"name": "measurements", "columns": ["name"], "values": [["temperature"]]}
        ]
        assert await ask("SHOW MEASUREMENTS WHERE \"device\" = 'pump-2' LIMIT 100") == [
            {"name": "measurements", "columns": ["name"], "values": [["cpu"]]}
        ]
        assert await ask('SHOW TAG KEYS FROM "cpu"') == [
            {"name": "cpu", "columns": ["tagKey"], "values": [["device"]]}
        ]
        assert [s["name"] for s in await ask("SHOW TAG KEYS")] == ["cpu", "temperature"]
        assert await ask('SHOW TAG VALUES FROM "cpu" WITH KEY = "device"') == [
            {
                "name": "cpu",
                "columns": ["key", "value"],
                "values": [["device", "pump-1"], ["device", "pump-2"]],
            }
        ]
        assert await ask('SHOW TAG VALUES FROM "temperature" WITH KEY = "device"') == [
            {"name": "temperature", "columns": ["key", "value"], "values": [["device", "pump-1"]]}
        ]
        assert await ask('SHOW TAG VALUES WITH KEY = "host"') == []
        assert await ask('SHOW TAG VALUES FROM "temperature" WITH KEY =~ /dev/') == [
            {"name": "temperature", "columns": ["key", "value"], "values": [["device", "pump-1"]]}
        ]
        assert await ask('SHOW TAG VALUES FROM "temperature" WITH KEY IN ("host", "device")')
        assert await ask('SHOW TAG VALUES FROM "temperature" WITH KEY != "device"') == []
        assert await ask('SHOW FIELD KEYS FROM "cpu"') == [
            {
                "name": "cpu",
                "columns": ["fieldKey", "fieldType"],
                "values": [["usage_idle", "float"], ["usage_user", "float"]],
            }
        ]
        assert await ask('SHOW FIELD KEYS FROM "temperature"') == [
            {
                "name": "temperature",
                "columns": ["fieldKey", "fieldType"],
                "values": [["value", "float"]],
            }
        ]
        (rp,) = await ask('SHOW RETENTION POLICIES on "mydb"')
        assert rp["values"][0][0] == "autogen"


class TestAuthAndErrors:
    async def test_the_token_as_password_bearer_or_token_header(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = {"q": "SHOW MEASUREMENTS", "db": "x", "u": "any", "p": token}
        assert (await gateway.client.get("/query", params=q)).status_code == 200
        for scheme in ("Bearer", "Token"):
            r = await gateway.client.get(
                "/query",
                params={"q": "SHOW MEASUREMENTS"},
                headers={"Authorization": f"{scheme} {token}"},
            )
            assert r.status_code == 200, scheme

    async def test_refusals_in_influxdbs_format(self, gateway: Gateway) -> None:
        device_token = await gateway.create_device("d1")
        r = await gateway.client.get("/query", params={"q": "SHOW MEASUREMENTS"})
        assert r.status_code == 401
        assert set(r.json()) == {"error"}
        r = await gateway.client.get(
            "/query", params={"q": "SHOW MEASUREMENTS"}, headers=basic("wrong")
        )
        assert r.status_code == 401
        assert r.json() == {"error": "authorization failed: the token (password) is not valid"}
        r = await gateway.client.get(
            "/query", params={"q": "SHOW MEASUREMENTS"}, headers=basic(device_token)
        )
        assert r.status_code == 403
        assert "operator" in r.json()["error"]
        r = await gateway.client.get("/query", headers=gateway.admin)
        assert r.status_code == 400
        assert r.json() == {"error": 'missing required parameter "q"'}
        r = await gateway.client.get(
            "/query", params={"q": "SHOW DATABASES", "epoch": "fortnight"}, headers=gateway.admin
        )
        assert r.status_code == 400
        assert "epoch" in r.json()["error"]

    @pytest.mark.parametrize(
        ("q", "says"),
        [
            ('SELECT "value" FROM "cpu" WHERE time >= now() - 1h', "raw SELECT"),
            ('SELECT mean("value") / 100 FROM "cpu" WHERE time >= now() - 1h', "math"),
            (
                'SELECT median("value") FROM "cpu" WHERE time > now() - 1h GROUP BY time(1m)',
                "median",
            ),
            ('SELECT mean("value") FROM "cpu" WHERE time > now() - 1h', "GROUP BY time"),
            (
                'SELECT mean("value") FROM "cpu" WHERE time > now() - 1h GROUP BY time(1m), "host"',
                "host",
            ),
            ("DROP MEASUREMENT cpu", "found DROP, expected SELECT or SHOW at line 1, char 1"),
            ("SHOW SERIES", "found SERIES"),
        ],
    )
    async def test_outside_the_subset_is_a_400_saying_what_is_supported(
        self, gateway: Gateway, q: str, says: str
    ) -> None:
        r = await gateway.client.get("/query", params={"q": q}, headers=gateway.admin)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error.startswith("error parsing query: ")
        assert says in error
        assert "fieldgate answers this InfluxQL subset" in error

    async def test_a_statement_past_the_bucket_limit_fails_alone(self, gateway: Gateway) -> None:
        token = await load(gateway)
        q = 'SELECT mean("usage_idle") FROM "cpu" WHERE time >= now() - 3650d GROUP BY time(1s)'
        r = await grafana_get(gateway, token, q)
        assert r.status_code == 200
        assert "buckets" in r.json()["results"][0]["error"]


class TestParser:
    """The query texts of Grafana's own tests parse; the mapping is one rule."""

    @pytest.mark.parametrize(
        "q",
        [
            'SELECT mean("value") FROM "policy"."cpu" WHERE time >= 1596240000000ms and '
            "time <= 1596240300000ms GROUP BY time(10s) fill(null)",
            'SELECT mean("value") FROM "cpu" WHERE time >= 1596240000000ms and time <= '
            "1596240300000ms GROUP BY time(5s) tz('UTC')",
            'SELECT mean("value") FROM "cpu" WHERE ("device" = \'server1\' OR "device" = '
            "'server2') AND time >= 1596240000000ms and time <= 1596240300000ms GROUP BY "
            'time(5s), "device" fill(null)',
            'SELECT mean("value") FROM "cpu" WHERE time >= 1596240000000ms and time <= '
            "1596240300000ms GROUP BY time(200ms) ORDER BY time ASC",
        ],
    )
    def test_grafana_built_selects(self, q: str) -> None:
        (st,) = parse(q)
        assert isinstance(st, Select)
        assert st.source.name == "cpu"
        assert [b.ns for b in st.times] == [1596240000000 * 10**6, 1596240300000 * 10**6]

    def test_grafana_metadata_texts(self) -> None:
        (st,) = parse(
            'SHOW TAG VALUES FROM "one_week"."cpu" WITH KEY = "app" WHERE "host" = \'server1\''
        )
        assert isinstance(st, ShowTagValues)
        assert st.key.holds({"_tagKey": "app"})
        assert not st.key.holds({"_tagKey": "device"})
        assert st.where is not None
        assert st.where.holds({"host": "server1"})
        (st,) = parse("SHOW MEASUREMENTS WITH MEASUREMENT =~ /(?i)abc\\/edf\\// LIMIT 100")
        assert isinstance(st, ShowMeasurements)
        assert st.name_filter is not None
        assert st.name_filter.matches("xABC/EDF/y")
        assert st.limit == 100
        (st,) = parse("SHOW TAG KEYS WHERE \"app\" = 'lab\\'el'")
        assert isinstance(st, ShowTagKeys)
        assert st.where is not None
        assert st.where.holds({"app": "lab'el"})

    def test_regexes_are_re2s(self) -> None:
        """Linear time whatever the pattern (Python's re would backtrack here for centuries),
        and RE2's syntax, as InfluxDB's Go regexps: no lookaheads."""
        (st,) = parse('SHOW TAG VALUES WITH KEY = "device" WHERE "device" =~ /(a+)+$/')
        assert isinstance(st, ShowTagValues)
        assert st.where is not None
        assert not st.where.holds({"device": "a" * 64 + "b"})
        assert st.where.holds({"device": "aaa"})
        with pytest.raises(InfluxQLError, match=r"invalid regex /\(\?=x\)/: invalid perl operator"):
            parse("SHOW MEASUREMENTS WITH MEASUREMENT =~ /(?=x)/")

    def test_errors_say_where(self) -> None:
        with pytest.raises(
            InfluxQLError, match="found EOF, expected measurement at line 1, char 19"
        ):
            parse("SHOW TAG KEYS FROM")
        with pytest.raises(InfluxQLError, match="found ,, expected field key at line 2, char 13"):
            parse('SHOW DATABASES;\nSELECT mean(, "x") FROM "m"')
        with pytest.raises(InfluxQLError, match="unterminated string"):
            parse('SHOW TAG KEYS WHERE "a" = \'b')

    @pytest.mark.parametrize(
        ("metric", "split"),
        [
            ("cpu.usage_idle", ("cpu", "usage_idle")),
            ("a.b.c", ("a", "b.c")),
            ("temperature", ("temperature", "value")),
            (".x", (".x", "value")),
        ],
    )
    def test_measurement_and_field_of_a_metric(self, metric: str, split: tuple[str, str]) -> None:
        assert split_metric(metric) == split
