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
from collections import Counter
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Final
from urllib.parse import unquote, urlsplit

import aiomqtt

INFLIGHT: Final = 1_000  # unacknowledged QoS 1 publishes per connection (paho's window)
# Publishes awaited at once per connection: aiomqtt walks all pending calls on every publish
# (to warn when there are many), so hundreds at once cost more CPU than they gain.
PUBLISHING: Final = 64


def broker_of(url: str) -> tuple[str, int, str | None, str | None]:
    """(host, port, user, password) of `mqtt://[user:pass@]host[:port]`."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt":
        raise ValueError(f"--mqtt must be mqtt://host[:port], not {url!r}")
    return (
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def telemetry_topic(prefix: str, device_id: str) -> str:
    """`[prefix/]devices/{id}/telemetry`, the gateway's layout (FIELDGATE_MQTT_TOPIC_PREFIX)."""
    return f"{prefix}/devices/{device_id}/telemetry" if prefix else f"devices/{device_id}/telemetry"


class MqttPool:
    """`size` connections; device i publishes on connection i % size."""

    def __init__(self, url: str, *, size: int, prefix: str = "", qos: int = 1) -> None:
        self.host, self.port, self.user, self.password = broker_of(url)
        self.prefix = prefix.strip("/")
        self.qos = qos
        run = secrets.token_hex(3)
        self._clients = [self._client(f"fieldgate-sim-{run}-{i}") for i in range(size)]
        self._slots = [asyncio.Semaphore(PUBLISHING) for _ in range(size)]
        self._listener = self._client(f"fieldgate-sim-{run}-errors")
        self._stack = AsyncExitStack()
        self._listen_task: asyncio.Task[None] | None = None
        self.error_notices: Counter[str] = Counter()

    def _client(self, identifier: str) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.user,
            password=self.password,
            identifier=identifier,
            max_inflight_messages=INFLIGHT,
            timeout=30.0,
        )
        # Many devices publish on one connection at once, by design: not worth a warning.
        client.pending_calls_threshold = INFLIGHT
        return client

    async def __aenter__(self) -> MqttPool:
        try:
            for client in [*self._clients, self._listener]:
                await self._stack.enter_async_context(client)
            errors = f"{self.prefix}/devices/+/errors" if self.prefix else "devices/+/errors"
            await self._listener.subscribe(errors, qos=0)
            self._listen_task = asyncio.create_task(self._listen(), name="mqtt-error-notices")
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
        await self._stack.aclose()

    async def _listen(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self._listener.messages:
                parts = str(message.topic).split("/")
                if len(parts) >= 3:
                    self.error_notices[parts[-2]] += 1

    async def publish(self, index: int, device_id: str, body: bytes) -> None:
        """Publish one body; returns when the broker has it (QoS 1) or it is written (QoS 0)."""
        i = index % len(self._clients)
        async with self._slots[i]:
            await self._clients[i].publish(
                telemetry_topic(self.prefix, device_id), body, qos=self.qos
            )
