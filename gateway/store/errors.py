"""What the store refuses, in the store's words. `gateway.errors` maps each to its HTTP answer
(one table, `DOMAIN_ERRORS`); the MQTT bridge turns them into dead letters.

    StoreError
    ├── DeviceNotFound (404 device_not_found): ids that name no stored device
    ├── DeviceExists (409 device_exists): a new device's id is taken
    ├── TokenNotFound (404 token_not_found): an id that names no operator or admin token
    ├── DeviceTokenNotManaged (409 device_token): the id of a device's token, which comes and
    │   goes with its device (rotate it, or delete the device), not through /tokens
    └── SeriesGone: a write named series that no longer exist (their device was deleted, by
        another instance or the CLI, since this one cached its series ids); the ingest path
        resolves the series again and retries, so it never reaches a client
"""

from __future__ import annotations

from collections.abc import Sequence


class StoreError(Exception):
    """Base of the store's refusals."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DeviceNotFound(StoreError):
    def __init__(self, device_ids: str | Sequence[str]) -> None:
        ids = [device_ids] if isinstance(device_ids, str) else list(device_ids)
        self.device_ids = ids
        if len(ids) == 1:
            super().__init__(f"device {ids[0]!r} does not exist")
        else:
            super().__init__(f"no such device(s): {', '.join(ids)}")


class DeviceExists(StoreError):
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        super().__init__(f"device {device_id!r} already exists")


class TokenNotFound(StoreError):
    def __init__(self, token_id: int) -> None:
        self.token_id = token_id
        super().__init__(f"token {token_id} does not exist")


class DeviceTokenNotManaged(StoreError):
    def __init__(self, token_id: int, device_id: str) -> None:
        self.token_id = token_id
        self.device_id = device_id
        super().__init__(
            f"token {token_id} is device {device_id!r}'s token: rotate it"
            f" (POST /api/v1/devices/{device_id}/token) or delete the device"
        )


class SeriesGone(StoreError):
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        super().__init__(f"the series of device {device_id!r} no longer exist")
