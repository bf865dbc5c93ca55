"""Certificate files loaded into TLS contexts: the one place that reads them.

The settings check every file when they are loaded (gateway/settings.py), with the same calls
that use them later, so a missing file, a key that does not match its certificate or a CA file
that holds no certificate stops `fieldgate serve` at once, in one line, instead of failing each
connection later:

- HTTPS (`FIELDGATE_SSL_CERTFILE`, `FIELDGATE_SSL_KEYFILE`): uvicorn makes the server's context
  itself from the two paths (in each worker, too); `check_server_files` loads them as it will.
- MQTT over TLS (`mqtts://`): `mqtt_client_context` makes the client's context, trusting
  `FIELDGATE_MQTT_CA_FILE` instead of the system's CAs when set, with the client certificate
  when set. Hostname verification stays on (`ssl.create_default_context`).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path


class UnusableTlsFile(ValueError):
    """A certificate, key or CA file that does not exist, cannot be read or does not load; the
    message names the setting and the file (a path, never a secret)."""


def check_server_files(certfile: Path, keyfile: Path, *, names: tuple[str, str]) -> None:
    """Load the server's certificate (chain) and key as uvicorn will, or `UnusableTlsFile`."""
    _readable(certfile, names[0])
    _readable(keyfile, names[1])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, certfile, keyfile, names)


def mqtt_client_context(
    ca_file: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    *,
    names: tuple[str, str, str] = (
        "FIELDGATE_MQTT_CA_FILE",
        "FIELDGATE_MQTT_CLIENT_CERTFILE",
        "FIELDGATE_MQTT_CLIENT_KEYFILE",
    ),
) -> ssl.SSLContext:
    """The context of an `mqtts://` connection: the broker's certificate must chain to
    `ca_file` (else the system's CAs) and name the host connected to; with `certfile` and
    `keyfile`, this client shows that certificate (a broker with `require_certificate true`
    wants one). `UnusableTlsFile` when a file does not load."""
    if ca_file is not None:
        _readable(ca_file, names[0])
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as exc:
            raise UnusableTlsFile(
                f"{names[0]}: {ca_file} holds no PEM certificate ({_reason(exc)})"
            ) from None
    else:
        context = ssl.create_default_context()
    if certfile is not None and keyfile is not None:
        _readable(certfile, names[1])
        _readable(keyfile, names[2])
        _load_chain(context, certfile, keyfile, names[1:])
    return context


def _readable(path: Path, name: str) -> None:
    if not path.exists():
        raise UnusableTlsFile(f"{name}: {path} does not exist")
    if not path.is_file():
        raise UnusableTlsFile(f"{name}: {path} is not a file")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise UnusableTlsFile(f"{name}: cannot read {path} ({exc.strerror})") from None


def _load_chain(
    context: ssl.SSLContext, certfile: Path, keyfile: Path, names: tuple[str, ...]
) -> None:
    # An encrypted key would make OpenSSL ask for its passphrase on the terminal: the empty
    # passphrase here makes it fail instead (uvicorn is given none either).
    try:
        context.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except ssl.SSLError as exc:
        raise UnusableTlsFile(
            f"{names[0]} and {names[1]}: cannot load {certfile} with the key {keyfile} "
            f"({_reason(exc)}); both must be PEM, the key unencrypted and matching the "
            "certificate"
        ) from None


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the source location: `[X509: KEY_VALUES_MISMATCH] key values
    mismatch`."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc))
