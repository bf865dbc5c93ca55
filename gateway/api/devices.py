"""The device registry over HTTP: create, list, get, update, delete, rotate token."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from devices.models import is_device_id
from gateway import provisioning
from gateway.api.deps import JSON, RuntimeDep, json_body_doc, read_json
from gateway.api.schemas import (
    DeviceCreate,
    DeviceCreated,
    DeviceList,
    DeviceOut,
    DeviceUpdate,
    TokenOut,
)
from gateway.auth import AdminAuth, OperatorAuth
from gateway.device_views import describe_device, describe_devices, device_view
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.store import registry

router = APIRouter(prefix="/devices", tags=["devices"])


def _check_metadata(metadata: dict[str, Any] | None, limit: int) -> None:
    if metadata is None:
        return
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > limit:
        raise PayloadTooLarge(
            f"the metadata is {size} bytes as JSON; the limit is {limit}",
            code="metadata_too_large",
        )


# The bodies are read in the handlers, after the token check (see gateway.api.deps.read_json).
@router.post(
    "",
    status_code=201,
    response_model=DeviceCreated,
    openapi_extra=json_body_doc(DeviceCreate),
)
async def create_device(request: Request, _: AdminAuth, runtime: RuntimeDep) -> JSON:
    """Create a device; the answer holds its token, shown only this once."""
    body = await read_json(request, DeviceCreate, runtime.settings.max_request_body_bytes)
    _check_metadata(body.metadata, runtime.settings.max_metadata_bytes)
    device, token = await provisioning.create_device(
        runtime.identities,
        body.id,
        body.name,
        body.metadata,
        body.enabled,
        retention_days=body.retention_days,
    )
    return JSON({**device_view(device, None), "token": token}, status_code=201)


@router.get("", response_model=DeviceList)
async def list_devices(
    _: OperatorAuth,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    q: Annotated[
        str | None,
        Query(
            max_length=200,
            description="only devices whose id or name contains this text (case-insensitive);"
            " pages go on with the same q and next_cursor",
        ),
    ] = None,
) -> JSON:
    """List devices in id order, with last_seen, reading counts and the last 24 hours'
    readings and rejections, a page at a time; `q` searches ids and names."""
    if cursor is not None and not is_device_id(cursor):
        raise BadRequest(f"cursor={cursor!r} is not a cursor this API gave", code="invalid_cursor")
    page = await registry.list_devices(after=cursor, limit=limit + 1, search=q)
    more = len(page) > limit
    page = page[:limit]
    return JSON(
        {
            "devices": await describe_devices(page),
            "next_cursor": page[-1].id if more else None,
        }
    )


@router.get("/{device_id}", response_model=DeviceOut)
async def get_device(device_id: str, _: OperatorAuth) -> JSON:
    """One device, with last_seen and reading counts per metric."""
    device = await registry.get_device(device_id)
    return JSON(await describe_device(device))


@router.patch("/{device_id}", response_model=DeviceOut, openapi_extra=json_body_doc(DeviceUpdate))
async def update_device(
    device_id: str, request: Request, _: AdminAuth, runtime: RuntimeDep
) -> JSON:
    """Change a device's name, metadata, enabled flag or retention."""
    body = await read_json(request, DeviceUpdate, runtime.settings.max_request_body_bytes)
    _check_metadata(body.metadata, runtime.settings.max_metadata_bytes)
    device = await registry.get_device(device_id)
    changes = body.model_dump(exclude_none=True)
    if "retention_days" in body.model_fields_set:  # null is a value here: the global setting
        changes["retention_days"] = body.retention_days
    device = await provisioning.update_device(runtime.identities, device, changes)
    if body.enabled is not None:
        runtime.forget_credentials()  # tokens, and device states (bridge, hook)
    if "retention_days" in body.model_fields_set:
        runtime.ingestor.retention.forget([device_id])  # this instance: at once
    return JSON(await describe_device(device))


@router.delete("/{device_id}", status_code=204, response_class=Response)
async def delete_device(device_id: str, _: AdminAuth, runtime: RuntimeDep) -> Response:
    """Delete a device with its tokens, series and readings."""
    await runtime.delete_device(device_id)
    return Response(status_code=204)


@router.post("/{device_id}/token", response_model=TokenOut)
async def rotate_token(device_id: str, _: AdminAuth, runtime: RuntimeDep) -> JSON:
    """Issue a new device token; the old one stops working at once on this gateway and at the
    broker (with FIELDGATE_BROKER_ADMIN), and within FIELDGATE_AUTH_SYNC_INTERVAL_S (0.5 s) on
    every other gateway sharing its database."""
    device = await registry.get_device(device_id)
    token, old = await provisioning.rotate_token(runtime.identities, device)
    runtime.authenticator.forget(old)
    return JSON({"token": token, "role": "device"})
