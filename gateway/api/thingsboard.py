"""ThingsBoard's device HTTP API, for firmware written for ThingsBoard: it changes only its host.

`POST /api/v1/{device_token}/telemetry` takes ThingsBoard's bodies (devices/thingsboard.py) and
stores them through the one ingest path (`ingest_payload`, as the native endpoint does: same
validation, codes, writer, guarantees and metrics). Answers, as ThingsBoard gives them (its
firmware and client libraries check 200 against anything else):

- 200 with an empty body once the readings are committed, also when some readings of the body
  were rejected: a firmware that resends on any other answer would store its valid readings a
  second time (readings timed at receipt get a new time on each try), and the rejected ones
  would be rejected again. Rejected readings are counted in
  `fieldgate_readings_rejected_total` by code;
- 400 (with fieldgate's error body) when nothing in the body was valid: `no_valid_readings`,
  with a rejection per message or reading in `details`; `invalid_json` for what is not JSON;
- 401 for a token that is not valid (ThingsBoard's answer), 403 for an operator or admin token
  (only a device token may post here) or a disabled device (`device_disabled`), 429 from the
  failure throttle; 413, 408 and 503 as on the native endpoint.

The token is a fieldgate device token (`fgd_...`), looked up like a bearer token (cached, behind
the per-address failure throttle). It travels in the path, so the path is a secret: the access
log is off (gateway/server.py), the request counter is labelled by the route template, and
anything that logs a request's path writes it through `loggable_path`.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from fastapi import APIRouter, Path, Request, Response

from devices.thingsboard import parse_thingsboard
from gateway.api.deps import RuntimeDep, read_body
from gateway.api.writes import ingest_payload
from gateway.auth import device_writer, token_principal
from gateway.errors import BadRequest

router = APIRouter(tags=["thingsboard"])

# The token segment of this API's path (under any prefix or mount), for `loggable_path`.
_TOKEN_IN_PATH: Final = re.compile(r"(/api/v1/)[^/]+(/telemetry/?)$")


def loggable_path(path: str) -> str:
    """`path` with the device token of a ThingsBoard-style post written as `***`
    (`/api/v1/***/telemetry`); any other path as it is."""
    return _TOKEN_IN_PATH.sub(r"\1***\2", path)


@router.post(
    "/{device_token}/telemetry",
    response_class=Response,
    responses={200: {"description": "Committed; an empty body", "content": None}},
)
async def post_thingsboard_telemetry(
    device_token: Annotated[
        str, Path(description="the device's token (`fgd_...`), ThingsBoard's access token")
    ],
    request: Request,
    runtime: RuntimeDep,
) -> Response:
    """ThingsBoard's telemetry upload: `{"temperature": 42}`, `{"ts": <epoch ms>, "values":
    {...}}` or an array of either; 200 with an empty body once committed (also when some
    readings were rejected), 400 when no reading was valid."""
    address = request.client.host if request.client else None
    principal = await token_principal(runtime, device_token, address)
    device_id = principal.device_id or ""  # (an operator or admin token is refused below)
    device_writer(principal, device_id)
    body = await read_body(request, runtime.settings.max_body_bytes)
    result = await ingest_payload(runtime, device_id, body, parse_thingsboard)
    if not result.valid:
        rejected = [r.as_dict() for r in result.rejected]
        raise BadRequest(
            "no valid readings in the payload" if rejected else "the payload holds no messages",
            code="no_valid_readings",
            details=rejected,
        )
    return Response(status_code=200)
