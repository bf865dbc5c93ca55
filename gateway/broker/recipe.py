"""A ready, secured Mosquitto for fieldgate: the files `fieldgate broker init DIR` writes.

- `DIR/mosquitto.conf`: one listener on 127.0.0.1, no anonymous clients, the dynamic security
  plugin, persistence, and queues sized as the README's "Sizing the broker's queues" says.
- `DIR/dynamic-security.json`: the plugin's store with two clients: an admin (`fieldgate-admin`,
  which may only drive the plugin) and the gateway (`fieldgate`, which may take every device's
  telemetry, alone or in a shared group, and publish the error topics: `Topics.gateway_*`).
  Devices are added by the gateway as they are made (gateway/broker/identities.py).
- `DIR/fieldgate.env`: the `FIELDGATE_*` lines a gateway needs to use that broker.

Passwords are random; the JSON holds them as the plugin does (PBKDF2-SHA512, 101 iterations, a
12-byte salt: mosquitto `src/password_mosq.h`), the env file in clear, so both are written
readable by their owner only.
"""

from __future__ import annotations

import base64
import getpass
import glob
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.broker.dynsec import CONTROL_TOPIC
from gateway.mqtt.service import Topics

ADMIN_USERNAME = "fieldgate-admin"
GATEWAY_USERNAME = "fieldgate"
GATEWAY_ROLE = "fieldgate-gateway"  # the sync adds the topics a newer gateway takes to it
_ITERATIONS = 101
_SALT_BYTES = 12
PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_PLACES = (
    "/usr/lib/*/mosquitto_dynamic_security.so",  # Debian, Ubuntu
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)
# Queues (README, "Sizing the broker's queues"): 2,000 messages/s for 10 minutes, within 512 MiB.
QUEUED_MESSAGES = 1_200_000
QUEUED_BYTES = 512 * 1024 * 1024


class RecipeError(Exception):
    """The files cannot be written as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class TlsListener:
    """A listener for devices over TLS, beside the gateway's local one (a device authenticates
    there with its id and token, as on any listener: the identities are the broker's)."""

    port: int
    certfile: Path
    keyfile: Path
    host: str = "0.0.0.0"


@dataclass(frozen=True)
class BrokerRecipe:
    directory: Path
    port: int
    admin_password: str
    gateway_password: str
    tls: TlsListener | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def store_path(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def env_path(self) -> Path:
        return self.directory / "fieldgate.env"


def find_plugin() -> str | None:
    for pattern in _PLUGIN_PLACES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def write_recipe(
    directory: Path,
    *,
    port: int,
    topic_prefix: str = "",
    plugin: str | None = None,
    overwrite: bool = False,
    tls: TlsListener | None = None,
) -> BrokerRecipe:
    """Write the three files into `directory` (made if need be); RecipeError if one exists
    (unless `overwrite`) or the plugin cannot be found."""
    plugin = plugin or find_plugin()
    if plugin is None or not Path(plugin).is_file():
        raise RecipeError(
            f"Mosquitto's dynamic security plugin ({PLUGIN_NAME}) was not found"
            + (f" at {plugin}" if plugin else "")
            + ": install mosquitto 2 (apt-get install mosquitto) or name it with --plugin"
        )
    if tls is not None:
        for path in (tls.certfile, tls.keyfile):
            if not path.is_file():
                raise RecipeError(f"{path} is not a file (the TLS listener's certificate or key)")
        tls = TlsListener(tls.port, tls.certfile.resolve(), tls.keyfile.resolve(), tls.host)
    directory = directory.resolve()
    passwords = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    recipe = BrokerRecipe(directory, port, *passwords, tls)
    paths = (recipe.config_path, recipe.store_path, recipe.env_path)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise RecipeError(f"{', '.join(existing)} exist already (--force writes over them)")
    directory.mkdir(parents=True, exist_ok=True)
    topics = Topics.with_prefix(topic_prefix)
    _write(recipe.config_path, _config(recipe, plugin), private=False)
    _write(recipe.store_path, json.dumps(_store(recipe, topics), indent=2) + "\n", private=True)
    _write(recipe.env_path, _env(recipe, topic_prefix), private=True)
    return recipe


def _write(path: Path, text: str, *, private: bool) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _config(recipe: BrokerRecipe, plugin: str) -> str:
    d = recipe.directory
    return f"""\
# Written by `fieldgate broker init`. Start the broker with: mosquitto -c {recipe.config_path}
# and a gateway with the lines of {recipe.env_path} in its environment.
per_listener_settings false
listener {recipe.port} 127.0.0.1
allow_anonymous false

{_tls_listener(recipe.tls)}

# Identities: the admin, the gateway and every device (added by the gateway as devices are made).
plugin {plugin}
plugin_opt_config_file {recipe.store_path}

# Sessions and queues survive a restart; a crash loses what came since the last autosave.
persistence true
persistence_location {d}/
autosave_interval 60
# What the broker holds for a gateway that is down or behind (README, "Sizing the broker's
# queues"): 2,000 messages/s for 10 minutes, bounded in memory.
max_queued_messages {QUEUED_MESSAGES}
max_queued_bytes {QUEUED_BYTES}
persistent_client_expiration 7d

log_dest file {d}/mosquitto.log
pid_file {d}/mosquitto.pid
# Started as root, Mosquitto would switch to its own user, which cannot write this directory.
user {getpass.getuser()}
"""


def _tls_listener(tls: TlsListener | None) -> str:
    if tls is None:
        return (
            "# No TLS listener: add one (`fieldgate broker init --tls-port ...`) before devices\n"
            "# reach this broker over a network."
        )
    return f"""\
# Devices over TLS (their id and token, as on any listener of this broker).
listener {tls.port} {tls.host}
certfile {tls.certfile}
keyfile {tls.keyfile}"""


def _password_entry(password: str) -> dict[str, Any]:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _ITERATIONS,
    }


def _acls(kind: str, topics: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"acltype": kind, "topic": t, "allow": True} for t in topics]


def _store(recipe: BrokerRecipe, topics: Topics) -> dict[str, Any]:
    control = f"{CONTROL_TOPIC.rsplit('/', 1)[0]}/#"  # $CONTROL/dynamic-security/#
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {
                "username": ADMIN_USERNAME,
                "textname": "fieldgate: manages the device clients",
                **_password_entry(recipe.admin_password),
                "roles": [{"rolename": "fieldgate-admin"}],
            },
            {
                "username": GATEWAY_USERNAME,
                "textname": "fieldgate: the gateway",
                **_password_entry(recipe.gateway_password),
                "roles": [{"rolename": GATEWAY_ROLE}],
            },
        ],
        "groups": [],
        "roles": [
            {
                "rolename": "fieldgate-admin",
                "acls": _acls("publishClientSend", (control,))
                + _acls("publishClientReceive", (control,))
                + _acls("subscribePattern", (control,)),
            },
            {
                "rolename": GATEWAY_ROLE,
                "acls": _acls("subscribePattern", topics.gateway_subscribes())
                + _acls("publishClientSend", topics.gateway_publishes()),
            },
        ],
    }


def _env(recipe: BrokerRecipe, topic_prefix: str) -> str:
    lines = [
        f"# Written by `fieldgate broker init`: a gateway using the broker of {recipe.config_path}",
        f"FIELDGATE_MQTT_URL=mqtt://{GATEWAY_USERNAME}:{recipe.gateway_password}"
        f"@127.0.0.1:{recipe.port}",
        "FIELDGATE_BROKER_ADMIN=mosquitto-dynsec",
        f"FIELDGATE_BROKER_ADMIN_USERNAME={ADMIN_USERNAME}",
        f"FIELDGATE_BROKER_ADMIN_PASSWORD={recipe.admin_password}",
    ]
    if topic_prefix:
        lines.append(f"FIELDGATE_MQTT_TOPIC_PREFIX={topic_prefix}")
    return "\n".join(lines) + "\n"
