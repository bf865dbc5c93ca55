"""Mosquitto's dynamic security plugin, driven over MQTT: commands in, answers back.

The plugin (`mosquitto_dynamic_security.so`, in Debian's mosquitto 2.0) keeps the broker's
clients, roles and ACLs in a JSON file and takes changes as JSON published by an admin client to
`$CONTROL/dynamic-security/v1`; it answers on `.../response` with one entry per command, matched
here by `correlationData`. This is what `mosquitto_ctrl dynsec` does; the format is the plugin's
own (mosquitto `plugins/dynamic-security/README.md`, checked against 2.0.11).

An admin connection (MQTT 5, clean start, a random client id) lasts one `run`, or the block of
`connection()`: connect, subscribe to the answers, publish the commands, wait for an answer to
each. Changes are rare (a device
made, rotated, disabled, deleted; a sync now and then), so a connection each costs nothing that
matters, and no admin session lingers on the broker.

The plugin rewrites its whole JSON file after every changing command, so work on a large fleet
costs the broker time in proportion to the fleet for each device changed (measured in the tests:
well under a millisecond a command for a few hundred clients).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import aiomqtt
import orjson

from gateway.mqtt.client import BrokerAddress

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
# The admin connection of the task running `Dynsec.connection()`'s block, and its Dynsec.
_connection: ContextVar[tuple[Dynsec, aiomqtt.Client] | None] = ContextVar(
    "dynsec_connection", default=None
)
# Commands per published message: a sync of a large fleet is sent in pieces of this size.
_COMMANDS_PER_MESSAGE = 200


class BrokerAdminError(Exception):
    """The broker's identity store could not be reached or refused the admin (not a command's
    own refusal: `run` returns those)."""


class Dynsec:
    """The admin side of one Mosquitto with the dynamic security plugin."""

    def __init__(
        self,
        address: BrokerAddress,
        username: str,
        password: str,
        *,
        timeout_s: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._username = username
        self._password = password
        self._timeout_s = timeout_s
        # mqtts://: the address's context (FIELDGATE_MQTT_CA_FILE, the client certificate).
        self._tls_context = tls_context or address.tls_context

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[None]:
        """One admin connection for every `run` inside (in this task), instead of one each: a
        change that asks before it acts (`BrokerIdentities`) costs one connection."""
        current = _connection.get()
        if current is not None and current[0] is self:
            yield
            return
        try:
            async with self._client() as client:
                # QoS 0 both ways: at QoS 1 the broker's PUBACK and its answer are two small
                # writes, and Nagle held the answer until our delayed ACK of the first (40 ms a
                # command, bench/broker_identities.py). One connection delivers in order either
                # way, and a lost connection is an error here whatever the QoS.
                await client.subscribe(RESPONSE_TOPIC, qos=0)
                reset = _connection.set((self, client))
                try:
                    yield
                finally:
                    _connection.reset(reset)
        except aiomqtt.MqttError as exc:
            raise self._unreachable(exc) from None

    async def run(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send `commands`; their answers in the same order (`{"command", "error"?, "data"?}`:
        an `error` is the plugin's refusal, e.g. "Client not found"). Raises BrokerAdminError
        when the broker cannot be reached, refuses the admin, or does not answer in time."""
        if not commands:
            return []
        current = _connection.get()
        if current is None or current[0] is not self:
            async with self.connection():
                return await self.run(commands)
        client = current[1]
        tagged = [{**c, "correlationData": secrets.token_hex(8)} for c in commands]
        answers: dict[str, dict[str, Any]] = {}
        try:
            async with asyncio.timeout(self._timeout_s):
                for start in range(0, len(tagged), _COMMANDS_PER_MESSAGE):
                    piece = tagged[start : start + _COMMANDS_PER_MESSAGE]
                    wanted = {c["correlationData"] for c in piece}
                    payload = orjson.dumps({"commands": piece})
                    await client.publish(CONTROL_TOPIC, payload, qos=0)
                    async for message in client.messages:
                        for answer in _answers(message.payload):
                            tag = answer.get("correlationData")
                            if isinstance(tag, str) and tag in wanted:
                                answers[tag] = answer
                        if wanted <= answers.keys():
                            break
        except TimeoutError:
            raise BrokerAdminError(
                f"the broker at {self.address} did not answer the dynamic security commands "
                f"within {self._timeout_s:g} s (is the dynsec plugin loaded, and may "
                f"{self._username!r} publish to {CONTROL_TOPIC}?)"
            ) from None
        except aiomqtt.MqttError as exc:
            raise self._unreachable(exc) from None
        return [answers[c["correlationData"]] for c in tagged]

    def _unreachable(self, exc: aiomqtt.MqttError) -> BrokerAdminError:
        return BrokerAdminError(
            f"cannot manage the broker's identities at {self.address} as {self._username!r}: {exc}"
        )

    async def run_checked(
        self, commands: Sequence[dict[str, Any]], *, may_fail: Sequence[dict[str, Any]] = ()
    ) -> list[dict[str, Any]]:
        """`run` of `may_fail` then `commands` (one message, in order), raising
        BrokerAdminError on the first of `commands` the plugin refused; their answers."""
        answers = (await self.run([*may_fail, *commands]))[len(may_fail) :]
        for command, answer in zip(commands, answers, strict=True):
            if answer.get("error"):
                raise BrokerAdminError(f"{command['command']}: {answer['error']}")
        return answers

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self._username,
            password=self._password,
            identifier=f"fieldgate-admin-{secrets.token_hex(6)}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            tls_context=self._tls_context,
            timeout=self._timeout_s,
        )


def _answers(payload: Any) -> list[dict[str, Any]]:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return []
    responses = body.get("responses") if isinstance(body, dict) else None
    return [r for r in responses if isinstance(r, dict)] if isinstance(responses, list) else []
