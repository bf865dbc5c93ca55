"""Publishing over MQTT: a small pool of broker connections shared by the simulated devices.

The gateway tells devices apart by topic (`[prefix/]devices/{id}/telemetry`), not by
connection, so a few connections carry a whole fleet (a thousand sockets would measure the
simulator's machine, not the gateway). QoS 1 publishes return once the broker acknowledged them
(PUBACK); the gateway's own verdicts come back on `devices/{id}/errors`, which the pool counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections import Counter
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Final
from urllib.parse import unquote, urlsplit

import aiomqtt

INFLIGHT: Final = 1_000  # unacknowledged QoS 1 publishes per connection (paho's window)
# Publishes awaited at once per connection: aiomqtt walks all pending calls on every publish
# (to warn when there are many), so hundreds at once cost more CPU than they gain.
PUBLISHING: Final = 64


def broker_of(url: str) -> tuple[str, int, str | None, str | None, bool]:
    """(host, port, user, password, tls) of `mqtt://[user:pass@]host[:port]` or `mqtts://`."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"--mqtt must be mqtt://host[:port] or mqtts://, not {url!r}")
    tls = parts.scheme == "mqtts"
    return (
        parts.hostname or "127.0.0.1",
        parts.port or (8883 if tls else 1883),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
        tls,
    )


def telemetry_topic(prefix: str, device_id: str) -> str:
    """`[prefix/]devices/{id}/telemetry`, the gateway's layout (FIELDGATE_MQTT_TOPIC_PREFIX)."""
    return f"{prefix}/devices/{device_id}/telemetry" if prefix else f"devices/{device_id}/telemetry"


class MqttPool:
    """`size` connections; device i publishes on connection i % size.

    With `as_devices` ({device id: token}) each device has a connection of its own, as itself
    (username = device id, password = token): what a broker that authenticates devices
    (`fieldgate broker init`) requires, since there a device may publish only its own topic and
    hear only its own errors."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        prefix: str = "",
        qos: int = 1,
        as_devices: Mapping[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.host, self.port, self.user, self.password, tls = broker_of(url)
        # mqtts://: the broker's certificate must chain to `ca_file` (else the system's CAs)
        # and name the host; one context for every connection.
        self.tls_context = ssl.create_default_context(cafile=ca_file) if tls else None
        self.prefix = prefix.strip("/")
        self.qos = qos
        run = secrets.token_hex(3)
        self._own: dict[str, int] = {}  # device id -> its connection (as_devices)
        self._listeners: list[tuple[aiomqtt.Client, str]] = []  # (client, errors filter)
        if as_devices:
            self._clients = []
            for i, (device_id, token) in enumerate(as_devices.items()):
                self._own[device_id] = i
                # as itself: its id as client id too (a broker that authenticates devices
                # insists, so that no device can take over another's session)
                client = self._client(device_id, device_id, token)
                self._clients.append(client)
                self._listeners.append((client, self._topic(device_id, "errors")))
        else:
            self._clients = [
                self._client(f"fieldgate-sim-{run}-{i}", self.user, self.password)
                for i in range(size)
            ]
            listener = self._client(f"fieldgate-sim-{run}-errors", self.user, self.password)
            self._listeners.append((listener, self._topic("+", "errors")))
        self._slots = [asyncio.Semaphore(PUBLISHING) for _ in self._clients]
        self._stack = AsyncExitStack()
        self._listen_tasks: list[asyncio.Task[None]] = []
        self.error_notices: Counter[str] = Counter()

    def _topic(self, device_id: str, kind: str) -> str:
        topic = f"devices/{device_id}/{kind}"
        return f"{self.prefix}/{topic}" if self.prefix else topic

    def _client(self, identifier: str, user: str | None, password: str | None) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=user,
            password=password,
            identifier=identifier,
            tls_context=self.tls_context,
            max_inflight_messages=INFLIGHT,
            timeout=30.0,
        )
        # Many devices publish on one connection at once, by design: not worth a warning.
        client.pending_calls_threshold = INFLIGHT
        return client

    async def __aenter__(self) -> MqttPool:
        try:
            listeners = [c for c, _ in self._listeners if c not in self._clients]
            for client in [*self._clients, *listeners]:
                await self._stack.enter_async_context(client)
            for client, errors in self._listeners:
                await client.subscribe(errors, qos=0)
                self._listen_tasks.append(
                    asyncio.create_task(self._listen(client), name="mqtt-error-notices")
                )
        except BaseException:
            await self._stop_listening()
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_listening()
        await self._stack.aclose()

    async def _stop_listening(self) -> None:
        for task in self._listen_tasks:
            task.cancel()
        for task in self._listen_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                parts = str(message.topic).split("/")
                if len(parts) >= 3:
                    self.error_notices[parts[-2]] += 1

    async def publish(self, index: int, device_id: str, body: bytes) -> None:
        """Publish one body; returns when the broker has it (QoS 1) or it is written (QoS 0)."""
        i = self._own[device_id] if self._own else index % len(self._clients)
        async with self._slots[i]:
            await self._clients[i].publish(
                telemetry_topic(self.prefix, device_id), body, qos=self.qos
            )
