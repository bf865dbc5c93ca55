"""gateway/mqtt/client.py against the libraries it reaches into.

The fast PUBLISH decoder is compared with paho's own on the same bytes, read by paho's own packet
reader (so the remaining-length varint is paho's too): the message delivered, what is written back
(PUBACK, PUBREC), the return code or exception, and which packets it hands to paho. The private
names the adapter uses are checked on the installed versions, so an upgrade fails here first.

The test harness itself feeds paho through `_sock` and `_packet_read` (what `loop_read` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt.client import BrokerAddress, BrokerClient, _fast_publish_handler
from tests.harness import wait_until

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
SUCCESS = f"rc {MQTTErrorCode.MQTT_ERR_SUCCESS!r}"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 1,
    mid: int = 7,
    dup: bool = False,
    retain: bool = False,
    properties: bytes | None = b"\x00",
) -> bytes:
    """A PUBLISH packet on the wire. `properties` is the MQTT 5 property section with its length
    (b"\\x00": empty), None for MQTT 3.1.1 (no section)."""
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    body += (properties or b"") + payload
    return raw_packet((0x30 | dup << 3 | qos << 1 | retain), body)


def raw_packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + varint(len(body)) + body


def packed(**props: Any) -> bytes:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in props.items():
        setattr(p, name, value)
    out: bytes = p.pack()  # type: ignore[no-untyped-call]
    return out


class Wire:
    """A socket paho reads `data` from (in chunks, as a kernel would hand it over) and writes to."""

    def __init__(self, data: bytes, chunk: int = 65_536) -> None:
        self.data = memoryview(data)
        self.chunk = chunk
        self.sent = bytearray()

    def recv(self, n: int) -> bytes:
        out = bytes(self.data[: min(n, self.chunk)])
        self.data = self.data[len(out) :]
        return out

    def send(self, buf: bytes) -> int:
        self.sent += buf
        return len(buf)


@dataclass
class Outcome:
    """What one client made of one packet."""

    result: str
    messages: list[dict[str, Any]]
    sent: bytes
    stored: dict[int, dict[str, Any]]  # QoS 2 messages waiting for PUBREL
    fallbacks: int = 0
    timestamps: list[float] = field(default_factory=list)


def fields(m: paho.MQTTMessage) -> dict[str, Any]:
    properties = m.properties.json() if m.properties is not None else {}  # type: ignore[no-untyped-call]
    return {
        "topic": m._topic,  # bytes: `topic` raises on invalid UTF-8
        "payload": bytes(m.payload),
        "qos": m.qos,
        "mid": m.mid,
        "dup": m.dup,
        "retain": m.retain,
        "state": m.state,
        "info_mid": m.info.mid,
        # the one documented difference: the fast path leaves no properties as None, paho
        # builds an empty Properties
        "properties": properties or None,
    }


@dataclass
class Reader:
    client: paho.Client
    messages: list[paho.MQTTMessage]
    fallbacks: list[None]

    def read(self, packet: bytes, chunk: int = 65_536) -> Outcome:
        wire = Wire(packet, chunk)
        self.client._sock = wire  # type: ignore[assignment]  # recv and send are all it needs
        try:
            while (rc := self.client._packet_read()) is MQTTErrorCode.MQTT_ERR_AGAIN:
                pass
            result = f"rc {rc!r}"
        except Exception as exc:
            result = f"raised {type(exc).__name__}"
        finally:
            self.client._sock = None
        assert not wire.data, "the packet was not read to its end"
        return Outcome(
            result=result,
            messages=[fields(m) for m in self.messages],
            sent=bytes(wire.sent),
            stored={mid: fields(m) for mid, m in self.client._in_messages.items()},
            fallbacks=len(self.fallbacks),
            timestamps=[m.timestamp for m in self.messages],
        )


def reader(
    protocol: MQTTProtocolVersion = V5,
    *,
    fast: bool,
    manual_ack: bool = True,
    configure: Callable[[paho.Client], None] | None = None,
) -> Reader:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    client.manual_ack_set(manual_ack)
    messages: list[paho.MQTTMessage] = []
    client.on_message = lambda _c, _u, m: messages.append(m)
    if configure is not None:
        configure(client)
    fallbacks: list[None] = []
    if fast:
        paho_handler = client._handle_publish

        def counted() -> MQTTErrorCode:
            fallbacks.append(None)
            return paho_handler()

        client._handle_publish = counted  # type: ignore[method-assign]
        client._handle_publish = _fast_publish_handler(client)  # type: ignore[method-assign]
    return Reader(client, messages, fallbacks)


def compare(packet: bytes, protocol: MQTTProtocolVersion = V5, **options: Any) -> Outcome:
    """Read `packet` with paho's decoder and with the fast one; assert they agree."""
    chunk = options.pop("chunk", 65_536)
    want = reader(protocol, fast=False, **options).read(packet, chunk)
    got = reader(protocol, fast=True, **options).read(packet, chunk)
    assert got.result == want.result
    assert got.messages == want.messages
    assert got.sent == want.sent
    assert got.stored == want.stored
    assert all(t > 0 for t in got.timestamps)
    return got


def takes_fast_path(packet: bytes, protocol: MQTTProtocolVersion = V5, **options: Any) -> bool:
    outcome = compare(packet, protocol, **options)
    assert outcome.fallbacks in (0, 1)
    return outcome.fallbacks == 0


TOPICS = {
    "ascii": b"devices/dev-1/telemetry",
    "unicode": "geräte/温度/🌡".encode(),
    "long": ("devices/" + "x" * 4000 + "/telemetry").encode(),
    "longest": b"t" * 65_535,
    "empty": b"",  # MQTT 5 allows it (with a topic alias)
    "invalid utf-8": b"devices/\xff\xfe/telemetry",
}


class TestFastPath:
    """QoS 1, MQTT 5, no properties: decoded by the adapter, as paho would."""

    @pytest.mark.parametrize("topic", TOPICS.values(), ids=TOPICS.keys())
    def test_topics(self, topic: bytes) -> None:
        assert takes_fast_path(publish(topic, b'{"values":{"t":1}}'))

    # Remaining length = 2 + topic + 2 (packet id) + 1 (empty properties) + payload: these
    # sizes put it on each side of the varint's 1/2, 2/3 and 3/4-byte boundaries.
    @pytest.mark.parametrize("remaining", [127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
    def test_remaining_length_boundaries(self, remaining: int) -> None:
        topic = TOPICS["ascii"]
        payload = bytes(range(256)) * (remaining // 256 + 1)
        packet = publish(topic, payload[: remaining - (2 + len(topic) + 2 + 1)])
        assert len(varint(remaining)) in (1, 2, 3, 4)
        assert packet[1 : 1 + len(varint(remaining))] == varint(remaining)
        assert takes_fast_path(packet, chunk=4096)

    @pytest.mark.parametrize("size", [0, 1, 2, 1 << 20])
    def test_payload_sizes(self, size: int) -> None:
        assert takes_fast_path(publish(TOPICS["ascii"], b"\x5a" * size))

    @pytest.mark.parametrize(("dup", "retain"), [(False, False), (True, False), (False, True)])
    @pytest.mark.parametrize("mid", [1, 0x00FF, 0xFF00, 65_535])
    def test_flags_and_packet_ids(self, dup: bool, retain: bool, mid: int) -> None:
        assert takes_fast_path(publish(TOPICS["ascii"], b"x", mid=mid, dup=dup, retain=retain))

    def test_without_manual_ack_it_sends_the_puback_as_paho_does(self) -> None:
        outcome = compare(publish(TOPICS["ascii"], b"x", mid=0x1234), manual_ack=False)
        assert outcome.fallbacks == 0
        assert outcome.sent == b"\x40\x02\x12\x34"

    def test_with_manual_ack_it_sends_nothing(self) -> None:
        outcome = compare(publish(TOPICS["ascii"], b"x"), manual_ack=True)
        assert outcome.fallbacks == 0
        assert outcome.sent == b""

    def test_logging_above_debug_keeps_the_fast_path(self) -> None:
        """aiomqtt gives paho a logger; only DEBUG (paho logs each PUBLISH) needs paho's path."""

        def info_logger(client: paho.Client) -> None:
            logger = logging.getLogger("test_mqtt_client.info")
            logger.setLevel(logging.INFO)
            client.enable_logger(logger)

        assert takes_fast_path(publish(TOPICS["ascii"], b"x"), configure=info_logger)


def _debug_logger(client: paho.Client) -> None:
    logger = logging.getLogger("test_mqtt_client.debug")
    logger.setLevel(logging.DEBUG)
    client.enable_logger(logger)


def _on_log(client: paho.Client) -> None:
    client.on_log = lambda *_: None


ASCII = TOPICS["ascii"]
# Each way the fast decoder hands a packet to paho, and what paho does with it.
FALLBACKS: dict[str, tuple[bytes, MQTTProtocolVersion, dict[str, Any]]] = {
    "qos 0": (publish(ASCII, b"x", qos=0), V5, {}),
    "qos 2": (publish(ASCII, b"x", qos=2), V5, {}),
    "qos 3 (invalid)": (publish(ASCII, b"x", qos=3), V5, {}),
    "mqtt 3.1.1": (publish(ASCII, b"x", properties=None), V311, {}),
    "mqtt 3.1.1 qos 0": (publish(ASCII, b"x", qos=0, properties=None), V311, {}),
    "on_log set": (publish(ASCII, b"x"), V5, {"configure": _on_log}),
    "debug logging": (publish(ASCII, b"x"), V5, {"configure": _debug_logger}),
    "properties": (publish(ASCII, b"x", properties=packed(MessageExpiryInterval=60)), V5, {}),
    "user properties": (
        publish(ASCII, b"x", properties=packed(UserProperty=[("k", "v"), ("k", "w")])),
        V5,
        {},
    ),
    "content type": (
        publish(ASCII, b"x", properties=packed(ContentType="application/json")),
        V5,
        {},
    ),
    "empty body": (raw_packet(0x32, b""), V5, {}),
    "one byte body": (raw_packet(0x32, b"\x00"), V5, {}),
    "topic longer than the packet": (raw_packet(0x32, b"\x00\x10abc"), V5, {}),
    "no packet id": (raw_packet(0x32, b"\x00\x03abc"), V5, {}),
    "half a packet id": (raw_packet(0x32, b"\x00\x03abc\x00"), V5, {}),
    "no property length": (raw_packet(0x32, b"\x00\x03abc\x00\x07"), V5, {}),
    "property length beyond the packet": (raw_packet(0x32, b"\x00\x03abc\x00\x07\x05\x01"), V5, {}),
    "unknown property": (raw_packet(0x32, b"\x00\x03abc\x00\x07\x02\x7f\x00xyz"), V5, {}),
}


class TestFallbacks:
    @pytest.mark.parametrize(("packet", "protocol", "options"), FALLBACKS.values(), ids=FALLBACKS)
    def test_handed_to_paho(
        self, packet: bytes, protocol: MQTTProtocolVersion, options: dict[str, Any]
    ) -> None:
        outcome = compare(packet, protocol, **options)
        assert outcome.fallbacks == 1

    def test_malformed_packets_fail_as_in_paho(self) -> None:
        """Not just handed over: these end in paho's error, not in a message."""
        for name in (
            "empty body",
            "topic longer than the packet",
            "property length beyond the packet",
        ):
            packet, protocol, options = FALLBACKS[name]
            outcome = compare(packet, protocol, **options)
            assert outcome.messages == [], name
            assert outcome.result != SUCCESS, name

    def test_qos_2_is_stored_for_pubrel_as_in_paho(self) -> None:
        outcome = compare(publish(ASCII, b"x", qos=2, mid=9))
        assert outcome.fallbacks == 1
        assert outcome.sent == b"\x50\x02\x00\x09"  # PUBREC
        assert list(outcome.stored) == [9]


PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": st.text(max_size=20),
        "ResponseTopic": st.text(min_size=1, max_size=20),
        "CorrelationData": st.binary(max_size=20),
        "UserProperty": st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
        "TopicAlias": st.integers(1, 65_535),
    },
)


class TestGenerated:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        topic=st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=40)),
        payload=st.one_of(st.binary(max_size=300), st.integers(0, 20_000).map(lambda n: b"p" * n)),
        qos=st.integers(0, 2),
        mid=st.integers(1, 65_535),
        dup=st.booleans(),
        retain=st.booleans(),
        properties=st.one_of(st.just({}), PROPERTIES),
        manual_ack=st.booleans(),
        chunk=st.sampled_from([1, 7, 65_536]),
    )
    def test_mqtt5(
        self,
        topic: bytes,
        payload: bytes,
        qos: int,
        mid: int,
        dup: bool,
        retain: bool,
        properties: dict[str, Any],
        manual_ack: bool,
        chunk: int,
    ) -> None:
        section = packed(**properties)
        packet = publish(
            topic, payload, qos=qos, mid=mid, dup=dup, retain=retain, properties=section
        )
        outcome = compare(packet, V5, manual_ack=manual_ack, chunk=chunk)
        assert outcome.fallbacks == (0 if qos == 1 and section == b"\x00" else 1)
        if outcome.result == SUCCESS:  # not when paho refuses a property (e.g. text with NUL)
            assert [m["payload"] for m in outcome.messages] == ([payload] if qos < 2 else [])

    @settings(max_examples=100, deadline=None)
    @given(
        topic=st.text(min_size=1, max_size=100).map(str.encode),
        payload=st.binary(max_size=300),
        qos=st.integers(0, 2),
        dup=st.booleans(),
        retain=st.booleans(),
    )
    def test_mqtt311(self, topic: bytes, payload: bytes, qos: int, dup: bool, retain: bool) -> None:
        packet = publish(topic, payload, qos=qos, dup=dup, retain=retain, properties=None)
        assert compare(packet, V311).fallbacks == 1


class TestBrokerClient:
    @pytest.fixture
    async def client(self) -> BrokerClient:
        # not connected: building one needs a running loop (aiomqtt makes futures), no broker
        return BrokerClient(
            BrokerAddress.from_url("mqtt://127.0.0.1:1"),
            client_id="test-mqtt-client",
            session_expiry_s=60,
            receive_maximum=10,
            keepalive_s=30,
        )

    async def test_installs_the_decoder_on_its_instance_only(self, client: BrokerClient) -> None:
        assert client._paho._handle_publish.__name__ == "handle_publish"
        assert paho.Client._handle_publish.__qualname__ == "Client._handle_publish"
        other = paho.Client(CallbackAPIVersion.VERSION2, protocol=V5)
        assert other._handle_publish.__func__ is paho.Client._handle_publish  # type: ignore[attr-defined]

    async def test_a_publish_reaches_take_ready_unacknowledged_until_ack(
        self, client: BrokerClient
    ) -> None:
        held: list[int] = []
        client.on_held = held.append
        ours, broker = socket.socketpair()
        ours.setblocking(False)
        broker.sendall(publish(b"devices/d1/telemetry", b'{"v":1}', mid=0x0102, retain=True))
        client._paho._sock = ours
        try:
            assert client._paho._packet_read() is MQTTErrorCode.MQTT_ERR_SUCCESS
            (message,) = client.take_ready(10)
            assert message.topic.value == "devices/d1/telemetry"
            assert (message.payload, message.qos, message.mid) == (b'{"v":1}', 1, 0x0102)
            assert (message.retain, message.properties) == (True, None)
            assert held == [1]
            broker.setblocking(False)
            with pytest.raises(BlockingIOError):  # manual ack: no PUBACK until the caller's
                broker.recv(16)
            client.ack(message)  # written when the event loop sees the socket writable
            received = bytearray()

            def puback_arrived() -> bool:
                with contextlib.suppress(BlockingIOError):
                    received.extend(broker.recv(16))
                return len(received) >= 4

            await wait_until(puback_arrived)
            assert received == b"\x40\x02\x01\x02"
            client.settled(1)
            assert held == [1, 0]
        finally:
            asyncio.get_running_loop().remove_writer(ours.fileno())
            client._paho._sock = None
            ours.close()
            broker.close()


class TestPrivateNames:
    """Every private name gateway/mqtt/client.py uses, on the installed versions."""

    def test_the_versions_checked_against(self) -> None:
        assert version("aiomqtt").startswith("2.5."), version("aiomqtt")
        assert version("paho-mqtt").startswith("2.2."), version("paho-mqtt")

    async def test_aiomqtt(self) -> None:
        client = aiomqtt.Client("127.0.0.1", 1, protocol=aiomqtt.ProtocolVersion.V5)
        assert isinstance(client._client, paho.Client)
        assert client._client.on_connect == client._on_connect
        assert client._client.on_disconnect == client._on_disconnect
        assert client._client.on_message == client._on_message
        assert hasattr(client._queue, "get_nowait")
        assert hasattr(client._queue, "empty")
        assert not client._disconnected.done()
        # the callbacks ours call, with the arguments we pass
        assert list(inspect.signature(client._on_connect).parameters) == [
            "client",
            "userdata",
            "flags",
            "reason_code",
            "properties",
        ]
        assert list(inspect.signature(client._on_disconnect).parameters)[:4] == [
            "client",
            "userdata",
            "flags",
            "reason_code",
        ]
        assert list(inspect.signature(client._on_message).parameters) == [
            "client",
            "userdata",
            "message",
        ]

    def test_paho(self) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=V5)
        for name in ("_handle_publish", "_handle_on_message", "_send_puback"):
            assert callable(getattr(client, name, None)), f"paho Client.{name} is gone"
        assert set(client._in_packet) >= {"command", "packet"}
        assert client._protocol == V5
        assert client._logger is None
        client.manual_ack_set(True)
        assert client._manual_ack is True
        assert callable(paho.time_func)
        assert list(inspect.signature(client._send_puback).parameters) == ["mid"]
        assert list(inspect.signature(client._handle_on_message).parameters) == ["message"]
        assert list(inspect.signature(paho.MQTTMessage).parameters) == ["mid", "topic"]
