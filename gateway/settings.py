"""All configuration, from `FIELDGATE_*` environment variables or a `.env` file."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from devices.formats import DEFAULT_EARLIEST, TS_MIN_US, epoch_us
from gateway.errors import BadRequest
from gateway.timespec import parse_duration
from gateway.tls import check_server_files, mqtt_client_context

DEFAULT_DATABASE_URL = "sqlite://fieldgate-data/fieldgate.db"
# MQTT client ids that start with this are the gateway's and the broker admin's; where fieldgate
# keeps the broker's identities, no device id may (a device connects with its id as client id,
# and a broker gives a session to whoever connects with its client id: gateway/broker).
RESERVED_CLIENT_PREFIX = "fieldgate-"
MIN_ADMIN_TOKEN_LENGTH = 16
_TLS_FILES = (
    "ssl_certfile",
    "ssl_keyfile",
    "mqtt_ca_file",
    "mqtt_client_certfile",
    "mqtt_client_keyfile",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FIELDGATE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    environment: Literal["production", "development"] = "production"
    database_url: str = DEFAULT_DATABASE_URL
    admin_token: str | None = Field(default=None, repr=False)
    # MQTT bridge (gateway/mqtt): empty mqtt_url disables it.
    mqtt_url: str = Field(
        default="mqtt://127.0.0.1:1883",
        repr=False,
        description="mqtt://[user:pass@]host[:port] or mqtts:// (TLS); empty disables the bridge",
    )
    mqtt_client_id: str = Field(
        default_factory=lambda: f"fieldgate-{socket.gethostname()}"[:64],
        description="stable across restarts, so the broker keeps the session; unique per instance",
    )
    mqtt_topic_prefix: str = Field(default="", description="e.g. site-1 -> site-1/devices/...")
    mqtt_qos: Literal[0, 1] = 1
    mqtt_shared_group: str = Field(default="", description="subscribe as $share/<group>/...")
    mqtt_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    mqtt_receive_maximum: int = Field(
        default=1_000, ge=1, le=65_535, description="unacknowledged messages in flight at most"
    )
    mqtt_keepalive_s: int = Field(default=30, ge=5)
    mqtt_reconnect_min_s: float = Field(default=0.5, gt=0)
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0)
    mqtt_dead_letter_payload_bytes: int = Field(default=4_096, ge=0)
    dead_letter_max_rows: int = Field(
        default=1_000_000,
        ge=0,
        description="dead letters kept at most (the oldest go first); 0: no cap",
    )
    dead_letter_retention_days: float = Field(
        default=30.0, ge=0, description="dead letters older than this are deleted; 0 keeps all"
    )
    mqtt_device_cache_ttl_s: float = Field(default=5.0, ge=0)
    mqtt_stuck_batch_s: float = Field(
        default=30.0,
        gt=0,
        description="a batch the database refuses (retried) for longer than this makes /readyz 503",
    )

    # Device identities at the broker (gateway/broker): made and kept from the registry.
    broker_admin: Literal["", "mosquitto-dynsec"] = Field(
        default="",
        description="mosquitto-dynsec: each device is a client of the broker's dynamic security "
        "plugin (username = device id, password = token); empty: the broker's access control is "
        "not fieldgate's",
    )
    broker_admin_username: str = Field(
        default="", description="the broker admin that may publish to $CONTROL/dynamic-security"
    )
    broker_admin_password: str | None = Field(default=None, repr=False)
    broker_sync_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="the broker's device clients are compared with the registry (and mended) at "
        "start and this often; 0: at start only",
    )
    # Brokers that ask fieldgate over HTTP (EMQX's HTTP authentication and authorization;
    # gateway/broker/hook.py): the secret the broker sends as its bearer token.
    broker_hook_secret: str | None = Field(
        default=None,
        repr=False,
        description="the bearer token a broker sends to /api/v1/broker/authenticate and "
        "/authorize; at least 16 characters; empty: those endpoints answer 404",
    )

    # TLS (gateway/tls.py): every file is loaded when the settings are, so a wrong one stops
    # `fieldgate serve` in one line. Both of a certificate and its key, or neither.
    ssl_certfile: Path | None = Field(
        default=None, description="serve HTTPS with this PEM certificate (chain); with ssl_keyfile"
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="the unencrypted PEM private key of ssl_certfile"
    )
    mqtt_ca_file: Path | None = Field(
        default=None,
        description="mqtts://: trust the broker's certificate only if this PEM CA signed it "
        "(instead of the system's CAs)",
    )
    mqtt_client_certfile: Path | None = Field(
        default=None,
        description="mqtts://: show the broker this PEM client certificate; with "
        "mqtt_client_keyfile",
    )
    mqtt_client_keyfile: Path | None = Field(
        default=None, description="the unencrypted PEM private key of mqtt_client_certfile"
    )

    # Ingest limits.
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="bytes of a telemetry body at most (413)"
    )
    max_messages: int = Field(default=10_000, ge=1)
    max_future_skew_s: float = Field(default=300.0, ge=0)
    min_timestamp: AwareDatetime = Field(
        default=DEFAULT_EARLIEST,
        description="readings timed before this (RFC 3339, or a date: UTC midnight) are "
        "rejected with timestamp_too_old; epoch seconds sent as milliseconds land in 1970",
    )
    max_metrics_per_request: int = Field(
        default=1_000,
        ge=1,
        description="distinct metrics in one HTTP body or MQTT payload at most (413)",
    )
    max_series_per_device: int = Field(
        default=10_000,
        ge=1,
        description="series (metrics) a device may have; readings of new metrics past it are "
        "rejected with series_limit",
    )

    # InfluxDB line protocol (devices/line_protocol.py, gateway/api/influx_write.py).
    line_protocol_device_tag: str = Field(
        default="device",
        min_length=1,
        max_length=64,
        description="the tag naming a line's device",
    )
    line_protocol_metric: str = Field(
        default="{measurement}.{field}",
        min_length=1,
        max_length=64,
        pattern=r"^[^{}]*(\{(measurement|field)\}[^{}]*)*$",
        description="a line's metric name from its measurement and field key; holds {field}",
    )

    # Limits every client meets, authenticated or not (gateway/api/limits.py, gateway/server.py,
    # gateway/throttle.py).
    max_request_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="bytes of any other request body at most (admin JSON; 413)",
    )
    max_metadata_bytes: int = Field(
        default=16 * 1024, ge=2, description="a device's metadata as compact JSON, at most (413)"
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection must finish its request line and headers within this (408)",
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="the longest wait for the next piece of a request body being read (408)",
    )
    http_body_min_rate: int = Field(
        default=1024,
        ge=0,
        description="bytes a second a body must average after its first http_body_timeout_s (408);"
        " 0 turns it off",
    )
    http_keep_alive_s: int = Field(
        default=5, ge=1, description="an idle connection between requests is closed after this"
    )
    http_max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="bytes of request line and headers at most (431)"
    )
    max_connections: int = Field(
        default=1_000,
        ge=1,
        description="open HTTP connections at most; a request on one past it gets 503",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="serve with this many processes on one socket (gateway/workers.py); "
        "about one per core",
    )
    workers_on_sqlite: bool = Field(
        default=False,
        description="allow workers > 1 on SQLite, where they take turns at the file's one "
        "write lock (measured: MQTT ingest gains, single-reading HTTP does not)",
    )
    shutdown_timeout_s: int = Field(
        default=10,
        ge=0,
        description="on SIGTERM, requests still running after this are cut (not acknowledged)",
    )
    auth_failure_limit: int = Field(
        default=100,
        ge=0,
        description="failed token checks per client address before 429; 0 turns this off",
    )
    auth_failure_window_s: float = Field(
        default=60.0,
        gt=0,
        description="failures are counted until this long after the address's last one",
    )

    # Writer (group commit).
    batch_size: int = Field(default=5_000, ge=1, description="readings per commit at most")
    queue_size: int = Field(default=100_000, ge=1, description="readings waiting at most")
    flush_interval_ms: float = Field(default=0.0, ge=0, description="linger before a commit")
    commits_in_flight: int = Field(
        default=0, ge=0, le=4, description="commits at once (0: PostgreSQL 2, SQLite 1)"
    )
    retry_after_s: int = Field(default=1, ge=1)

    # History: packing, retention, the maintenance job (gateway/maintenance.py).
    compress_after: str = Field(
        default="1h",
        description="readings older than this (a duration: 30m, 1h, 1d) are packed into"
        " compressed chunks by the maintenance job",
    )
    retention_days: float = Field(
        default=0.0,
        ge=0,
        le=100_000,
        description="days of readings kept (a device may set its own); 0: all",
    )
    maintenance_interval_s: float = Field(
        default=300.0, ge=0, description="serve runs the maintenance job this often; 0: never"
    )

    # Reads.
    max_page_size: int = Field(default=10_000, ge=1)
    auth_cache_ttl_s: float = Field(default=5.0, ge=0)
    # How often the auth change counter is read (0: never; then another instance's or the CLI's
    # revocation counts here only when the cache lapses).
    auth_sync_interval_s: float = Field(default=0.5, ge=0)
    # How often each gateway writes when operator and admin tokens were last used (their uses
    # are kept in memory until then; 0: never written).
    token_last_used_interval_s: float = Field(default=60.0, ge=0)

    # Live streams (GET .../telemetry/stream, gateway/live.py). Each commit writes what it added
    # to the commit log, kept this long: a stream that reconnects with Last-Event-ID within it
    # misses nothing (0: no log, no streams). Every gateway sharing a database needs the same.
    live_log_window_s: float = Field(default=600.0, ge=0)
    # How often a gateway with open streams reads the log for other instances' commits (its own
    # wake the streams at once).
    live_poll_interval_s: float = Field(default=0.25, gt=0)
    # Events a stream may hold unsent; a consumer further behind is told (`overflow`) and
    # disconnected, to resume with Last-Event-ID. The writer never waits for a stream.
    stream_buffer_events: int = Field(default=1000, ge=1)
    # Open streams per token, and in all.
    streams_per_token: int = Field(default=8, ge=1)
    max_streams: int = Field(default=1000, ge=1)
    # A comment line this often keeps proxies from closing an idle stream.
    stream_heartbeat_s: float = Field(default=15.0, gt=0)
    # A send that takes longer (the consumer stopped reading) closes the stream.
    stream_send_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("min_timestamp", mode="before")
    @classmethod
    def _date_is_utc_midnight(cls, value: object) -> object:
        if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
            return f"{value.strip()}T00:00:00Z"
        return value

    @field_validator("line_protocol_metric")
    @classmethod
    def _metric_names_each_field(cls, value: str) -> str:
        if "{field}" not in value:
            raise ValueError("must hold {field}: else a line's fields would share one metric")
        return value

    @field_validator("broker_hook_secret")
    @classmethod
    def _hook_secret_long_enough(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Empty turns the hook off; a short secret is refused as a short admin token is."""
        if not value:
            return None
        if len(value) < MIN_ADMIN_TOKEN_LENGTH and info.data.get("environment") != "development":
            raise ValueError(
                f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters "
                "(set FIELDGATE_ENVIRONMENT=development to allow a short one)"
            )
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        token = self.admin_token
        if token is not None and token == "":
            self.admin_token = None
        elif (
            token is not None
            and len(token) < MIN_ADMIN_TOKEN_LENGTH
            and self.environment != "development"
        ):
            raise ValueError(
                f"FIELDGATE_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LENGTH} characters "
                "(set FIELDGATE_ENVIRONMENT=development to allow a short one)"
            )
        if not self.database_url.startswith(("sqlite://", "postgres://", "postgresql://")):
            raise ValueError(
                "FIELDGATE_DATABASE_URL must start with sqlite:// or postgres:// "
                f"(got {self.database_url.split('://')[0]}://...)"
            )
        if self.mqtt_url and not self.mqtt_url.startswith(("mqtt://", "mqtts://")):
            raise ValueError(
                "FIELDGATE_MQTT_URL must start with mqtt:// or mqtts:// (or be empty to disable "
                f"the MQTT bridge; got {self.mqtt_url.split('://')[0]}://...)"
            )
        if self.mqtt_url:
            _check_mqtt_url(self.mqtt_url)
        if any(c in self.mqtt_topic_prefix for c in "+#") or any(
            c in self.mqtt_shared_group for c in "+#/"
        ):
            raise ValueError(
                "FIELDGATE_MQTT_TOPIC_PREFIX and FIELDGATE_MQTT_SHARED_GROUP may not hold wildcards"
            )
        if self.max_metadata_bytes >= self.max_request_body_bytes:
            raise ValueError(
                "FIELDGATE_MAX_METADATA_BYTES must be below FIELDGATE_MAX_REQUEST_BODY_BYTES"
            )
        if epoch_us(self.min_timestamp) < TS_MIN_US:
            raise ValueError("FIELDGATE_MIN_TIMESTAMP may not be before 1970-01-01")
        if not _is_duration(self.compress_after):
            raise ValueError(
                "FIELDGATE_COMPRESS_AFTER must be a duration such as 30m, 1h or 1d "
                f"(got {self.compress_after!r})"
            )
        if self.retention_days and self.retention_days * 86_400 < compress_after_us(self) / 1e6:
            raise ValueError(
                "FIELDGATE_RETENTION_DAYS is shorter than FIELDGATE_COMPRESS_AFTER: readings "
                "would expire before they are packed, row by row"
            )
        if self.batch_size > self.queue_size:
            raise ValueError("FIELDGATE_BATCH_SIZE must not exceed FIELDGATE_QUEUE_SIZE")
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_broker_identities(self) -> Settings:
        """What fieldgate needs to keep the broker's identities (FIELDGATE_BROKER_ADMIN, or
        the hook): the broker, the admin, and a gateway client id no device id can take."""
        if self.broker_admin and not (
            self.mqtt_url and self.broker_admin_username and self.broker_admin_password
        ):
            raise ValueError(
                "FIELDGATE_BROKER_ADMIN needs FIELDGATE_MQTT_URL (the broker), "
                "FIELDGATE_BROKER_ADMIN_USERNAME and FIELDGATE_BROKER_ADMIN_PASSWORD"
            )
        if (self.broker_admin or self.broker_hook_secret) and not self.mqtt_client_id.startswith(
            RESERVED_CLIENT_PREFIX
        ):
            raise ValueError(
                f"FIELDGATE_MQTT_CLIENT_ID must start with {RESERVED_CLIENT_PREFIX!r} when "
                "fieldgate keeps the broker's identities (FIELDGATE_BROKER_ADMIN, "
                "FIELDGATE_BROKER_HOOK_SECRET): no device id may, so no device can take over the "
                "gateway's session"
            )
        return self

    @field_validator(*_TLS_FILES, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `FIELDGATE_SSL_CERTFILE=` (an env file's blank line) means no file, not the directory ".".
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        """Certificates and keys come in pairs and must load; a CA or client certificate asks
        for TLS, so it needs an mqtts:// URL (else it would be ignored on a plain connection)."""
        for cert, key in (
            ("ssl_certfile", "ssl_keyfile"),
            ("mqtt_client_certfile", "mqtt_client_keyfile"),
        ):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(
                    f"FIELDGATE_{cert.upper()} and FIELDGATE_{key.upper()} go together: "
                    "set both or neither"
                )
        # UnusableTlsFile is a ValueError: its one line becomes the error shown.
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            check_server_files(
                self.ssl_certfile,
                self.ssl_keyfile,
                names=("FIELDGATE_SSL_CERTFILE", "FIELDGATE_SSL_KEYFILE"),
            )
        if self.mqtt_ca_file is not None or self.mqtt_client_certfile is not None:
            if self.mqtt_url.startswith("mqtt://"):
                raise ValueError(
                    "FIELDGATE_MQTT_CA_FILE and FIELDGATE_MQTT_CLIENT_CERTFILE are for TLS: "
                    "FIELDGATE_MQTT_URL must start with mqtts://"
                )
            mqtt_client_context(
                self.mqtt_ca_file, self.mqtt_client_certfile, self.mqtt_client_keyfile
            )
        return self


def _is_duration(text: str) -> bool:
    try:
        parse_duration(text, name="FIELDGATE_COMPRESS_AFTER")
    except BadRequest:
        return False
    return True


def compress_after_us(settings: Settings) -> int:
    """FIELDGATE_COMPRESS_AFTER in microseconds (checked when the settings were loaded)."""
    return parse_duration(settings.compress_after, name="FIELDGATE_COMPRESS_AFTER")


def _check_mqtt_url(url: str) -> None:
    """A host, and a port if given, that a connection can use (the URL may hold a password: the
    message quotes neither)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port that is no number or out of range, a broken [IPv6]
        raise ValueError(f"FIELDGATE_MQTT_URL cannot be used: {exc}") from None
    if not parts.hostname:
        raise ValueError("FIELDGATE_MQTT_URL names no host (mqtt://HOST[:PORT])")
    if port == 0:
        raise ValueError("FIELDGATE_MQTT_URL: port 0 is not a broker's port")


class SettingsError(Exception):
    """The configuration is invalid; the message says which setting and why, never its value
    (an admin token or a database password must not reach a terminal or a log)."""


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment and `.env`, or `SettingsError` naming what is wrong.
    `overrides` (a command's options, e.g. `serve --ssl-certfile`) take the place of their
    variables and are checked with them."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_invalid(exc)) from None


def describe_invalid(exc: ValidationError) -> str:
    """One line per invalid setting, as `FIELDGATE_NAME: what is wrong`; pydantic's own text
    would quote the value (`input_value=...`), which may be a secret."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            name = "FIELDGATE_" + str(error["loc"][0]).upper()
            lines.append(f"{name}: {message}")
        else:  # a rule over several settings (_refuse_unsafe): its message names them
            lines.append(message)
    return "\n".join(lines)
