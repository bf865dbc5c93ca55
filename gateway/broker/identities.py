"""Device identities at the broker, made from the registry (Mosquitto's dynamic security).

Each device is a broker client: username = its device id, password = its token, client id = its
device id (it may connect with no other: see RESERVED_CLIENT_PREFIX), in a role of its
own (`fieldgate-device:{id}`) that may publish only its telemetry topic and subscribe only its
errors topic (`Topics.device_publishes` / `device_subscribes`; Mosquitto 2.0's dynsec ACLs have
no `%u` pattern, hence a role per device). The client is marked as fieldgate's by its text name,
so a sync never touches the broker's other clients (the admin, the gateway, people).

Every change goes registry first, broker second, except a rotation (gateway/provisioning.py):
the broker never holds a device the registry does not, so a client the registry does not know
is always left over and a sync may delete it. The sync (`sync`, run at start, every
FIELDGATE_BROKER_SYNC_INTERVAL_S and by `fieldgate broker sync`) reads the broker first and the
registry second, so a change made between the two reads is never undone:

- a device without a client is *missing*: the broker keeps only password hashes and the
  registry only token hashes, so nobody can make its client without a new token. It is
  reported (in /readyz, by the command) and `fieldgate broker sync --rotate-missing` rotates
  those devices' tokens to provision them;
- a client of ours with no device is deleted, with its role;
- an enabled flag or a role that differs is set as the registry says, and a role missing a topic
  `Topics` now gives (a broker provisioned before SenML's `devices/{id}/senml`) gets it; so
  does the gateway's own role made by `fieldgate broker init` (GATEWAY_ROLE);
- a client of someone else's whose username is a device id is reported as a conflict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from gateway.broker.dynsec import BrokerAdminError, Dynsec
from gateway.broker.recipe import GATEWAY_ROLE
from gateway.mqtt.service import Topics
from gateway.settings import RESERVED_CLIENT_PREFIX

ROLE_PREFIX = "fieldgate-device:"
# Client ids starting with RESERVED_CLIENT_PREFIX are the gateway's and the admin's; no device id
# may (`reserved`). A device connects only with its own id as client id, so it can never take
# over the gateway's session: a broker gives a session, with its subscriptions and the messages
# queued for it, to whoever connects with its client id (Mosquitto 2.0 checks no username).
DEVICE_TEXTNAME = "fieldgate device"
_EXAMPLES = 10
# Seconds a device may go without a broker client after it is made before it counts as missing:
# its row is committed before its client is made.
MAKING_S = 60.0


@dataclass
class Drift:
    """How the broker differs from the registry, and what a sync did about it."""

    missing: list[str] = field(default_factory=list)  # devices with no broker client
    conflicts: list[str] = field(default_factory=list)  # device ids taken by others' clients
    deleted: list[str] = field(default_factory=list)  # clients of devices that are gone
    fixed: list[str] = field(default_factory=list)  # enabled flag or role set right

    @property
    def clean(self) -> bool:
        """Nothing left that the sync could not mend."""
        return not (self.missing or self.conflicts)

    def summary(self) -> dict[str, Any]:
        return {
            "missing": len(self.missing),
            "conflicts": len(self.conflicts),
            "deleted": len(self.deleted),
            "fixed": len(self.fixed),
            "missing_examples": sorted(self.missing)[:_EXAMPLES],
            "conflict_examples": sorted(self.conflicts)[:_EXAMPLES],
        }


class Owner(Enum):
    """Whose broker client has a given username."""

    NOBODY = "nobody"
    FIELDGATE = "fieldgate"  # one of ours: a device's (its text name says so)
    OTHER = "other"  # the admin, the gateway, a person's: never changed by fieldgate


class BrokerClientTaken(Exception):
    """The broker has a client with the device's id as its username that fieldgate did not make
    (the gateway's own, the admin, a person's): fieldgate never changes it. Or the id is
    `reserved` (RESERVED_CLIENT_PREFIX) for the gateway's and admin's client ids."""

    def __init__(self, device_id: str) -> None:
        self.reserved = reserved(device_id)
        super().__init__(
            f"device ids starting with {RESERVED_CLIENT_PREFIX!r} are reserved for the broker's "
            "own clients (the gateway's and the admin's client ids): choose another id"
            if self.reserved
            else f"the broker has a client named {device_id!r} that fieldgate did not make; a "
            "device with that id cannot have a broker identity (choose another id, or remove "
            "that client from the broker)"
        )
        self.device_id = device_id


def reserved(device_id: str) -> bool:
    """Whether `device_id` could be a client id of the gateway's or the admin's."""
    return device_id.startswith(RESERVED_CLIENT_PREFIX)


# The registry's side of a sync: {device id: (enabled, created at)}, as
# registry.device_enabled_states gives it.
RegistryStates = Callable[[], Awaitable[Mapping[str, tuple[bool, datetime]]]]


def role_name(device_id: str) -> str:
    return f"{ROLE_PREFIX}{device_id}"


class BrokerIdentities:
    """Devices' broker clients, kept as the registry says (all changes through `Dynsec`)."""

    def __init__(self, dynsec: Dynsec, topics: Topics) -> None:
        self.dynsec = dynsec
        self.topics = topics

    def __str__(self) -> str:
        return f"Mosquitto dynamic security at {self.dynsec.address}"

    def _acls(self, device_id: str) -> list[dict[str, Any]]:
        return [
            {"acltype": "publishClientSend", "topic": t, "allow": True}
            for t in self.topics.device_publishes(device_id)
        ] + [
            {"acltype": "subscribePattern", "topic": t, "allow": True}
            for t in self.topics.device_subscribes(device_id)
        ]

    def _role(self, device_id: str) -> dict[str, Any]:
        acls = self._acls(device_id)
        return {"command": "createRole", "rolename": role_name(device_id), "acls": acls}

    def _gateway_acls(self) -> list[dict[str, Any]]:
        return [
            {"acltype": "subscribePattern", "topic": t, "allow": True}
            for t in self.topics.gateway_subscribes()
        ] + [
            {"acltype": "publishClientSend", "topic": t, "allow": True}
            for t in self.topics.gateway_publishes()
        ]

    async def owner(self, device_id: str) -> Owner:
        """Whose broker client has the device's id as its username, if any."""
        (answer,) = await self.dynsec.run([{"command": "getClient", "username": device_id}])
        if answer.get("error") == "Client not found":
            return Owner.NOBODY
        if answer.get("error"):
            raise BrokerAdminError(f"getClient: {answer['error']}")
        client = (answer.get("data") or {}).get("client") or {}
        return Owner.FIELDGATE if client.get("textname") == DEVICE_TEXTNAME else Owner.OTHER

    async def create(self, device_id: str, token: str, *, enabled: bool) -> None:
        """The device's client and role. A leftover client of ours (a delete that did not reach
        the broker) is replaced; a client of someone else's with that username is left alone:
        BrokerClientTaken."""
        async with self.dynsec.connection():
            await self._create(device_id, token, enabled=enabled)

    async def _create(self, device_id: str, token: str, *, enabled: bool) -> None:
        if reserved(device_id):
            raise BrokerClientTaken(device_id)
        owner = await self.owner(device_id)
        if owner is Owner.OTHER:
            raise BrokerClientTaken(device_id)
        leftovers = [{"command": "deleteRole", "rolename": role_name(device_id)}]
        if owner is Owner.FIELDGATE:
            leftovers.insert(0, {"command": "deleteClient", "username": device_id})
        commands: list[dict[str, Any]] = [
            self._role(device_id),
            {
                "command": "createClient",
                "username": device_id,
                "password": token,
                "clientid": device_id,  # it connects with its id as client id, or not at all
                "textname": DEVICE_TEXTNAME,
                "roles": [{"rolename": role_name(device_id)}],
            },
        ]
        if not enabled:
            commands.append({"command": "disableClient", "username": device_id})
        # the role's delete fails when there was none
        await self.dynsec.run_checked(commands, may_fail=leftovers)

    async def set_password(self, device_id: str, token: str, *, enabled: bool) -> None:
        """The device's new token as its password (the broker closes its connections, so the
        old one stops working at once); a device with no client gets one. Never another's
        client's password: BrokerClientTaken."""
        async with self.dynsec.connection():
            owner = await self.owner(device_id)
            if owner is Owner.OTHER:
                raise BrokerClientTaken(device_id)
            if owner is Owner.NOBODY:
                await self._create(device_id, token, enabled=enabled)
                return
            command = {"command": "setClientPassword", "username": device_id, "password": token}
            await self.dynsec.run_checked([command])

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        """Enable or disable the device's client (disabling closes its connections); there may
        be none, and another's client is not touched."""
        async with self.dynsec.connection():
            if await self.owner(device_id) is Owner.FIELDGATE:
                verb = "enableClient" if enabled else "disableClient"
                await self.dynsec.run_checked([{"command": verb, "username": device_id}])

    async def delete(self, device_id: str) -> None:
        """Delete the device's client (closing its connections) and role; absent ones are fine,
        and another's client with its id is not touched."""
        async with self.dynsec.connection():
            commands = [{"command": "deleteRole", "rolename": role_name(device_id)}]
            if await self.owner(device_id) is Owner.FIELDGATE:
                commands.insert(0, {"command": "deleteClient", "username": device_id})
            await self.dynsec.run(commands)

    async def clients(self) -> list[dict[str, Any]]:
        """Every client of the broker, as `listClients` (verbose) tells them."""
        (answer,) = await self.dynsec.run_checked(
            [{"command": "listClients", "verbose": True, "count": -1, "offset": 0}]
        )
        clients = (answer.get("data") or {}).get("clients") or []
        return [c for c in clients if isinstance(c, dict)]

    async def roles(self) -> dict[str, set[tuple[str, str]]]:
        """Every role of the broker: its name -> the (acltype, topic) it allows."""
        (answer,) = await self.dynsec.run_checked(
            [{"command": "listRoles", "verbose": True, "count": -1, "offset": 0}]
        )
        roles = (answer.get("data") or {}).get("roles") or []
        return {
            str(r.get("rolename")): {
                (str(a.get("acltype")), str(a.get("topic")))
                for a in r.get("acls") or []
                if isinstance(a, dict) and a.get("allow")
            }
            for r in roles
            if isinstance(r, dict)
        }

    async def sync(self, read_registry: RegistryStates, *, mend: bool = True) -> Drift:
        """Compare the broker with the registry and, if `mend`, set right what can be (see the
        module's docstring). `read_registry` is an async callable giving {device id: (enabled,
        created at)}, called after the broker was read."""
        async with self.dynsec.connection():
            return await self._sync(read_registry, mend=mend)

    async def _sync(self, read_registry: RegistryStates, *, mend: bool) -> Drift:
        clients = await self.clients()
        roles = await self.roles()
        devices: Mapping[str, tuple[bool, datetime]] = await read_registry()
        # a device made this recently may be between its row and its client (registry first)
        settled = datetime.now(UTC) - timedelta(seconds=MAKING_S)
        drift = Drift()
        commands: list[dict[str, Any]] = []
        by_name = {str(c.get("username")): c for c in clients}
        for device_id, (enabled, created_at) in devices.items():
            client = by_name.get(device_id)
            if client is None:
                if created_at < settled:
                    drift.missing.append(device_id)
                continue
            if client.get("textname") != DEVICE_TEXTNAME:
                drift.conflicts.append(device_id)
                continue
            mending = self._mend_device(device_id, enabled, client, roles)
            if mending:
                commands += mending
                drift.fixed.append(device_id)
        for name, client in by_name.items():
            if client.get("textname") == DEVICE_TEXTNAME and name not in devices:
                drift.deleted.append(name)
                commands.append({"command": "deleteClient", "username": name})
                commands.append({"command": "deleteRole", "rolename": role_name(name)})
        # roles left by a client that is gone (those of clients just deleted are in `commands`)
        mine = {name for name, c in by_name.items() if c.get("textname") == DEVICE_TEXTNAME}
        for role in roles:
            owner = role[len(ROLE_PREFIX) :]
            if role.startswith(ROLE_PREFIX) and owner not in mine:
                commands.append({"command": "deleteRole", "rolename": role})
        if GATEWAY_ROLE in roles:
            commands += _missing_acls(GATEWAY_ROLE, roles[GATEWAY_ROLE], self._gateway_acls())
        if mend and commands:
            await self.dynsec.run(commands)
        return drift

    def _mend_device(
        self,
        device_id: str,
        enabled: bool,
        client: dict[str, Any],
        roles: dict[str, set[tuple[str, str]]],
    ) -> list[dict[str, Any]]:
        """The commands that set a device's client and role right (none: they are)."""
        role = role_name(device_id)
        held = {str(r.get("rolename")) for r in client.get("roles") or [] if isinstance(r, dict)}
        commands: list[dict[str, Any]] = []
        if role not in roles:
            commands.append(self._role(device_id))
        else:
            commands += _missing_acls(role, roles[role], self._acls(device_id))
        if role not in held:
            commands.append({"command": "addClientRole", "username": device_id, "rolename": role})
        if client.get("clientid") != device_id:
            commands.append(
                {"command": "setClientId", "username": device_id, "clientid": device_id}
            )
        if bool(client.get("disabled", False)) == enabled:
            verb = "enableClient" if enabled else "disableClient"
            commands.append({"command": verb, "username": device_id})
        return commands


def _missing_acls(
    role: str, held: set[tuple[str, str]], wanted: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The commands that add to `role` the ACLs of `wanted` it does not hold (`held`)."""
    return [
        {"command": "addRoleACL", "rolename": role, **acl}
        for acl in wanted
        if (acl["acltype"], acl["topic"]) not in held
    ]
