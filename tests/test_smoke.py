from tests.conftest import Gateway


async def test_post_and_read_back(gateway: Gateway) -> None:
    token = await gateway.create_device("dev-1")
    r = await gateway.post("dev-1", token, {"ts": 1_700_000_000_000, "values": {"t": 1.5}})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    r = await gateway.client.get(
        "/api/v1/devices/dev-1/telemetry", params={"metric": "t"}, headers=gateway.admin
    )
    assert r.json()["points"] == [{"ts": "2023-11-14T22:13:20Z", "value": 1.5}]
