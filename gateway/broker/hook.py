"""Brokers that ask fieldgate who may connect and who may use which topic, over HTTP, in EMQX's
HTTP authentication and authorization format (gateway/api/broker_hook.py speaks it).

The rules are the registry's and `Topics`': the same ones Mosquitto's dynamic security is made
from (gateway/broker/identities.py), so either kind of broker lets in the same clients.

- Who may connect (`authenticate`): a device, as username = client id = its id and password = its
  token (an enabled device's own token: the `Authenticator` decides, with its cache, which
  rotations, disables and deletes drop; its id as client id, so it never takes over another's
  session, and no id starting with RESERVED_CLIENT_PREFIX, the gateway's); the gateway's own
  broker identity, the username and password of FIELDGATE_MQTT_URL. Nobody else: not an admin
  or operator token, not an anonymous client.
- Who may use which topic (`authorize`): a device, while it exists and is enabled, publishes only
  its telemetry and subscribes only to its errors (`Topics.device_publishes` /
  `device_subscribes`); the gateway's username subscribes to every device's telemetry and
  publishes the errors (`Topics.gateway_subscribes` / `gateway_publishes`). A subscription must be
  *covered* by an allowed filter (every topic it could match, the allowed filter matches too), not
  merely overlap it: a device subscribing to `devices/+/errors` would hear every device's errors.

Authorization trusts the username the broker authenticated: let this hook authenticate the
broker's clients too, or make sure no other authenticator lets a client in under a device's id or
the gateway's username.
"""

from __future__ import annotations

import hmac

from devices.models import Role, is_device_id
from gateway.auth import Authenticator
from gateway.broker.identities import reserved
from gateway.errors import Unauthorized
from gateway.mqtt.client import BrokerAddress
from gateway.mqtt.service import DeviceStates, Topics
from gateway.settings import Settings


class BrokerHook:
    """The answers to a broker's questions, and the check of the secret it asks with."""

    def __init__(
        self,
        secret: str,
        authenticator: Authenticator,
        topics: Topics,
        gateway: tuple[str, str] | None,
        device_cache_ttl_s: float,
    ) -> None:
        self._secret = secret.encode()
        self._authenticator = authenticator
        self._topics = topics
        # (username, password) of the gateway's own broker identity, if it has one
        self._gateway = gateway
        # whether devices exist and are enabled, for authorization (which has no token to look
        # up): dropped with the cached tokens (Runtime.forget_credentials)
        self.devices = DeviceStates(device_cache_ttl_s)

    @classmethod
    def from_settings(cls, settings: Settings, authenticator: Authenticator) -> BrokerHook | None:
        """The hook, if FIELDGATE_BROKER_HOOK_SECRET is set."""
        if not settings.broker_hook_secret:
            return None
        gateway = None
        if settings.mqtt_url:
            address = BrokerAddress.from_url(settings.mqtt_url)
            # a username without a password is no identity: anyone could claim it
            if address.username and address.password:
                gateway = (address.username, address.password)
        return cls(
            settings.broker_hook_secret,
            authenticator,
            Topics.with_prefix(settings.mqtt_topic_prefix),
            gateway,
            settings.auth_cache_ttl_s,
        )

    def is_broker(self, secret: str) -> bool:
        """Whether `secret` is the broker's (compared in constant time)."""
        return hmac.compare_digest(secret.encode(), self._secret)

    def is_gateway(self, username: str) -> bool:
        return self._gateway is not None and username == self._gateway[0]

    async def authenticate(self, username: str, password: str, clientid: str) -> bool:
        """Whether a client may connect with `username`, `password` and `clientid` (see the
        module)."""
        if self._gateway is not None and username == self._gateway[0]:
            # the gateway's username is its own, even if a device had the same id
            return hmac.compare_digest(password.encode(), self._gateway[1].encode())
        if not (password and is_device_id(username)) or reserved(username):
            return False
        if clientid != username:  # a device connects as itself only: no other's session
            return False
        try:
            # Not through the per-address failure throttle: every question comes from the
            # broker's address, so one device's wrong password would lock out the fleet. A wrong
            # token costs one lookup, then is cached as wrong like any other.
            principal = await self._authenticator.authenticate(password)
        except Unauthorized:
            return False
        return (
            principal.role is Role.DEVICE
            and principal.device_id == username
            and principal.device_enabled
        )

    async def authorize(self, username: str, action: str, topic: str) -> bool:
        """Whether the client `username` may `action` (publish or subscribe) `topic` (a topic
        name to publish to, a topic filter to subscribe to)."""
        if action not in ("publish", "subscribe") or not is_filter(topic):
            return False
        if action == "publish" and ("+" in topic or "#" in topic):
            return False
        if self.is_gateway(username):
            allowed = (
                self._topics.gateway_publishes()
                if action == "publish"
                else self._topics.gateway_subscribes()
            )
        elif is_device_id(username):
            enabled = (await self.devices.lookup({username}))[username]
            if not enabled:  # no such device (None), or disabled (False)
                return False
            allowed = (
                self._topics.device_publishes(username)
                if action == "publish"
                else self._topics.device_subscribes(username)
            )
        else:
            return False
        return any(covers(f, topic) for f in allowed)

    def forget(self) -> None:
        """Forget every device's state: a credential was taken away."""
        self.devices.clear()


def is_filter(text: str) -> bool:
    """Whether `text` is a valid MQTT topic filter (a topic name is one too): not empty, `+`
    only as a whole level, `#` only as the whole last level."""
    if not text or "\x00" in text:
        return False
    levels = text.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#" and i != len(levels) - 1:
            return False
    return True


def covers(allowed: str, requested: str) -> bool:
    """Whether every topic that `requested` (a valid topic name or filter) matches is matched by
    the filter `allowed`: for a topic name, whether `allowed` matches it (as paho's
    `topic_matches_sub`); for a filter, whether it asks for nothing more than `allowed`.

    A wildcard in `requested` is covered only by a wildcard at least as wide (`+` by `+` or
    `#`, `#` by `#`); a wildcard at the first level of `allowed` does not match a level starting
    with `$` (MQTT 4.7.2), so `#` does not cover `$SYS/...`."""
    want = requested.split("/")
    for i, level in enumerate(allowed.split("/")):
        if i == 0 and level in ("+", "#") and want[0].startswith("$"):
            return False
        if level == "#":
            return True  # `a/#` matches `a` and everything below it
        if i >= len(want):
            return False
        if level == "+":
            if want[i] == "#":
                return False
            continue
        if want[i] != level:
            return False
    return len(want) == len(allowed.split("/"))
