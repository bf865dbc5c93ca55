"""The one place that reaches inside aiomqtt and paho: acknowledge after commit, CONNACK's
session flag, and a cheaper PUBLISH decoder.

aiomqtt 2.5 acknowledges a QoS 1 message as soon as it arrives, so a crash between receipt and
commit would lose it. paho-mqtt 2, which aiomqtt drives, can leave the PUBACK to the application:
`manual_ack_set(True)` and later `ack(mid, qos)` (empicano/aiomqtt#345; aiomqtt#346 would make it
public). This adapter sets it *before* connecting (a persistent session delivers its backlog right
after CONNACK), records CONNACK's session-present flag (aiomqtt drops it) and lets the bridge take
every message already received without one task per message. One `BrokerClient` is one
connection: acks of messages from an earlier connection are never sent on a later one (their
packet ids may have been reused by then); the broker redelivers those.

Private names used, checked against aiomqtt 2.5 and paho-mqtt 2.2 (pyproject pins both minor
versions; tests/test_mqtt_client.py fails if one goes or changes what this module relies on):

- aiomqtt `Client`: `_client` (the paho client), `_queue` (received messages), `_on_connect`,
  `_on_disconnect`, `_on_message` (its paho callbacks, which ours call), `_disconnected` (the
  future that ends the connection, see `probe`), `_connected` (the future a connect waits for:
  failed at once when the connection is lost before CONNACK, see `_chain_callbacks`).
- paho `Client`: `_handle_publish` (replaced on one instance by `_fast_publish_handler`), and in
  that decoder `_in_packet`, `_protocol`, `_logger`, `_manual_ack`, `_handle_on_message`,
  `_send_puback`; `paho.time_func` (not underscored, not documented either).

Nothing else in `gateway/` touches aiomqtt's or paho's internals.
"""

from __future__ import annotations

import asyncio
import logging
import select
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.tls import mqtt_client_context

_BARRIER_TOPIC = "fieldgate/ack-barrier"
_PROBE_READS_MAX = 100_000
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 reason code: another connection with this client id


class SubscriptionRefused(aiomqtt.MqttError):
    """The broker answered a SUBSCRIBE with a failure (e.g. not authorized): the connection
    itself is fine."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    # With `tls`: the context of every connection to this address, made once (gateway/tls.py);
    # the system's CAs when none is given.
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tls and self.tls_context is None:
            object.__setattr__(self, "tls_context", mqtt_client_context())
        if self.tls_context is not None:
            self.tls_context.sslsocket_class = _ClosedOnFailedHandshake

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ca_file: Path | None = None,
        client_certfile: Path | None = None,
        client_keyfile: Path | None = None,
    ) -> BrokerAddress:
        """`mqtt://[user:pass@]host[:port]` (1883) or `mqtts://...` (TLS, 8883), whose broker
        must show a certificate from `ca_file` (else a CA the system trusts) naming `host`;
        this client shows `client_certfile` when given (FIELDGATE_MQTT_* settings)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"an MQTT URL starts with mqtt:// or mqtts://, not {parts.scheme}://")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            tls_context=(
                mqtt_client_context(ca_file, client_certfile, client_keyfile) if tls else None
            ),
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class _ClosedOnFailedHandshake(ssl.SSLSocket):
    """paho 2.2 leaves the socket of a failed TLS handshake (an untrusted broker certificate)
    open for the garbage collector, one per reconnect attempt; this closes it at once.
    `SSLContext.sslsocket_class` is the ssl module's public hook for such a subclass."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class BrokerClient:
    """One MQTT 5 connection with a persistent session whose messages are acked by the caller."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        session_expiry_s: int,
        receive_maximum: int,
        keepalive_s: int,
        timeout_s: float = 10.0,
    ) -> None:
        self.session_present: bool | None = None
        self.disconnect_reason: str | None = None
        # The broker closed the connection because another client connected with this client id
        # (MQTT 5 DISCONNECT reason 0x8E, "Session taken over"); `dropped`: it closed it without
        # a DISCONNECT packet (Mosquitto 2.0.11 does so on a takeover too).
        self.taken_over = False
        self.dropped = False
        # Messages received and not yet settled (acknowledged, or given up for redelivery):
        # Receive Maximum bounds it for QoS 1. `on_held` hears every change.
        self.held = 0
        self.on_held: Callable[[int], None] | None = None
        self._aiomqtt = _aiomqtt_client(
            address,
            client_id=client_id,
            properties=_connect_properties(session_expiry_s, receive_maximum),
            keepalive_s=keepalive_s,
            timeout_s=timeout_s,
        )
        self._paho: paho.Client = self._aiomqtt._client
        self._queue: asyncio.Queue[aiomqtt.Message] = self._aiomqtt._queue
        # Until CONNACK (`record_connack` puts paho's own logger back: no cost per message).
        # paho calls only `log` and `isEnabledFor`, which an adapter has.
        self._paho_log = _LastError(self._paho.logger or logging.getLogger("mqtt"))
        self._paho.enable_logger(self._paho_log)  # type: ignore[arg-type]
        # Before connecting: a persistent session delivers its backlog right after CONNACK.
        self._paho.manual_ack_set(True)
        self._chain_callbacks()
        # This instance only (not paho globally): see `_fast_publish_handler`.
        self._paho._handle_publish = _fast_publish_handler(self._paho)  # type: ignore[method-assign]

    def _chain_callbacks(self) -> None:
        """Put ours in front of aiomqtt's paho callbacks: CONNACK's session-present flag and the
        disconnect reason (aiomqtt drops both), and the count of messages held."""
        on_connect, on_disconnect = self._aiomqtt._on_connect, self._aiomqtt._on_disconnect
        on_message = self._aiomqtt._on_message

        def record_connack(
            client: paho.Client,
            userdata: Any,
            flags: paho.ConnectFlags,
            reason: ReasonCode,
            properties: Properties | None = None,
        ) -> None:
            self.session_present = bool(flags.session_present)
            self._paho.enable_logger(self._paho_log.logger)
            on_connect(client, userdata, flags, reason, properties)

        def record_disconnect(
            client: paho.Client,
            userdata: Any,
            flags: paho.DisconnectFlags,
            reason: ReasonCode,
            properties: Properties | None = None,
        ) -> None:
            self.disconnect_reason = str(reason)
            self.taken_over = reason.value == SESSION_TAKEN_OVER
            self.dropped = not flags.is_disconnect_packet_from_server
            connecting = self._aiomqtt._connected
            if not connecting.done():
                # Lost before CONNACK (say, a TLS alert after the handshake: the broker wants a
                # client certificate): aiomqtt would wait out its timeout and say only that.
                why = self._paho_log.last_error or str(reason)
                connecting.set_exception(
                    aiomqtt.MqttError(f"the broker closed the connection before CONNACK: {why}")
                )
            on_disconnect(client, userdata, flags, reason, properties)

        def count_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            on_message(client, userdata, message)
            self._hold(1)

        self._paho.on_connect = record_connack
        self._paho.on_disconnect = record_disconnect
        self._paho.on_message = count_message

    async def __aenter__(self) -> BrokerClient:
        try:
            await self._aiomqtt.__aenter__()
        except aiomqtt.MqttError as exc:
            hint = _tls_hint(str(exc))
            if hint is None:
                raise
            raise aiomqtt.MqttError(f"TLS: {exc}; {hint}") from None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._aiomqtt.__aexit__(exc_type, exc, tb)

    @property
    def connected(self) -> bool:
        return bool(self._paho.is_connected())

    async def subscribe(self, topic: str, qos: int) -> str:
        """Subscribe; the broker's answer (e.g. 'Granted QoS 1'). Raises MqttError if refused."""
        codes = await self._aiomqtt.subscribe(topic, qos)
        failed = [c for c in codes if isinstance(c, ReasonCode) and c.is_failure]
        if failed:
            raise SubscriptionRefused(
                f"the broker refused the subscription to {topic}: {failed[0]}"
            )
        return ", ".join(str(c) for c in codes)

    async def next_message(self) -> aiomqtt.Message:
        """The next message; raises aiomqtt.MqttError when the connection is lost."""
        return await anext(self._aiomqtt.messages)

    def take_ready(self, limit: int) -> list[aiomqtt.Message]:
        """Messages already received, without waiting (at most `limit`)."""
        out: list[aiomqtt.Message] = []
        queue = self._queue
        while len(out) < limit and not queue.empty():
            out.append(queue.get_nowait())
        return out

    def ack(self, message: aiomqtt.Message) -> None:
        """Send the PUBACK of a QoS 1 message (QoS 0 needs none). A no-op once disconnected."""
        if message.qos == 1:
            self._paho.ack(message.mid, message.qos)

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the broker has processed every packet sent so far (the PUBACKs above all).

        Closing a socket that still has unread data (the broker keeps sending) makes the kernel
        reset the connection, and the broker then drops what it had not read yet: the last
        acknowledgements would be lost. The broker handles a connection's packets in order, so
        the answer to an UNSUBSCRIBE (of a filter never subscribed) means all before it is done.
        """
        try:
            await self._aiomqtt.unsubscribe(_BARRIER_TOPIC, timeout=timeout_s)
        except aiomqtt.MqttError:
            return False
        return True

    def probe(self) -> None:
        """Read the socket once ourselves, so a lost connection is noticed even when the event
        loop stopped watching it: uvloop drops a socket whose poll reports an error (a reset by
        the broker) without calling aiomqtt's reader, which then never learns of the loss."""
        disconnected = self._aiomqtt._disconnected
        if disconnected.done():
            return
        error: Exception
        try:
            # paho reads about one packet a call: read what the kernel holds, up to EOF or reset
            for _ in range(_PROBE_READS_MAX):
                sock = self._paho.socket()
                if sock is None or not select.select([sock], [], [], 0)[0]:
                    break
                self._paho.loop_read()
        except Exception as exc:
            error = exc
        else:
            if self._paho.socket() is not None:
                return
            error = aiomqtt.MqttError("the connection to the broker was lost")
        if not disconnected.done():
            disconnected.set_exception(error)

    def settled(self, n: int) -> None:
        """`n` messages taken from this connection are done with (acknowledged or not)."""
        self._hold(-n)

    def _hold(self, n: int) -> None:
        self.held += n
        if self.on_held is not None:
            self.on_held(self.held)

    def publish_nowait(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 0 without waiting (best effort: dropped when disconnected)."""
        self._paho.publish(topic, payload, qos=0)


class _LastError(logging.LoggerAdapter[logging.Logger]):
    """paho's logger for one connection while it connects (set with paho's public
    `enable_logger`), passing all on and keeping the last error: why a socket read failed (a
    TLS alert, say) reaches only the log; the disconnect that follows says "Unspecified
    error"."""

    last_error: str | None = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            self.last_error = str(msg) % args if args else str(msg)
        self.logger.log(level, msg, *args, **kwargs)


# OpenSSL's reasons (stable names) for the two mistakes of an mqtts:// setup, and what to do.
_TLS_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the broker's certificate is not trusted: "
    "FIELDGATE_MQTT_CA_FILE must name the CA that signed it, and it must name the host of "
    "FIELDGATE_MQTT_URL",
    "CERTIFICATE_REQUIRED": "the broker wants a client certificate: set "
    "FIELDGATE_MQTT_CLIENT_CERTFILE and FIELDGATE_MQTT_CLIENT_KEYFILE",
    "UNKNOWN_CA": "the broker does not trust this client's certificate "
    "(FIELDGATE_MQTT_CLIENT_CERTFILE)",
}


def _tls_hint(error: str) -> str | None:
    """What to do about a failed connection, when TLS is why."""
    return next((hint for reason, hint in _TLS_HINTS.items() if reason in error), None)


def _connect_properties(session_expiry_s: int, receive_maximum: int) -> Properties:
    connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    connect.SessionExpiryInterval = session_expiry_s
    # The broker sends at most this many unacknowledged QoS 1 messages: the in-flight bound.
    connect.ReceiveMaximum = receive_maximum
    return connect


def _aiomqtt_client(
    address: BrokerAddress,
    *,
    client_id: str,
    properties: Properties,
    keepalive_s: int,
    timeout_s: float,
) -> aiomqtt.Client:
    """MQTT 5 with a persistent session (clean_start=False) under `client_id`."""
    return aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        keepalive=keepalive_s,
        properties=properties,
        tls_context=address.tls_context,
        timeout=timeout_s,
        # No max_queued_incoming_messages: aiomqtt drops what does not fit. ReceiveMaximum
        # bounds what can be waiting here.
    )


def _fast_publish_handler(client: paho.Client) -> Callable[[], MQTTErrorCode]:
    """paho's `_handle_publish` for this client, without a `Properties` object per message.

    For MQTT 5 paho builds a `Properties` (its whole property table, rebuilt each time) for every
    PUBLISH, even one without properties: about 30 us a message, which profiling put at the top
    of the bridge's time. The bridge never reads a message's properties. So a QoS 1 PUBLISH with
    an empty property section (what devices send) is decoded here as paho would, except that
    `message.properties` is None; anything else (QoS 0 or 2, properties present, a short or
    malformed packet, paho's debug logging on) goes to paho's own method unchanged. Checked against
    paho-mqtt 2.2 (`Client._handle_publish`, `_packet.decode_publish`; tests/test_mqtt_client.py
    compares the two on generated packets): installed on one client instance by `BrokerClient`,
    never on the class.
    """
    original = client._handle_publish
    success = MQTTErrorCode.MQTT_ERR_SUCCESS

    def handle_publish() -> MQTTErrorCode:
        header = client._in_packet["command"]
        packet = client._in_packet["packet"]
        if (
            (header & 0x06) != 0x02  # QoS 1 only
            or client._protocol != paho.MQTTv5
            or client.on_log is not None
            or (client._logger is not None and client._logger.isEnabledFor(logging.DEBUG))
        ):
            return original()
        n = len(packet)
        if n < 2:
            return original()
        slen = (packet[0] << 8) | packet[1]
        props_at = 2 + slen + 2  # topic length, topic, packet id
        if n <= props_at or packet[props_at] != 0:  # a property section that is not empty
            return original()
        mid = (packet[props_at - 2] << 8) | packet[props_at - 1]
        message = paho.MQTTMessage(mid=mid, topic=bytes(packet[2 : 2 + slen]))
        message.dup = bool(header & 0x08)
        message.qos = 1
        message.retain = bool(header & 0x01)
        message.properties = None
        message.payload = bytes(packet[props_at + 1 :])
        message.timestamp = paho.time_func()
        client._handle_on_message(message)
        if client._manual_ack:
            return success
        return client._send_puback(mid)

    return handle_publish
