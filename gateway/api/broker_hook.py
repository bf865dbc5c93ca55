"""The broker's questions over HTTP, in EMQX's HTTP authentication and authorization format: may
this client connect, may it publish or subscribe to this topic (the rules: gateway/broker/hook.py).

The broker proves itself with FIELDGATE_BROKER_HOOK_SECRET as its bearer token (without that
setting the endpoints answer 404). A question's fields (`username`, `password`, `clientid`,
`topic`, `action`) come as EMQX can send them: a JSON body (its default), a form-encoded body
(`Content-Type: application/x-www-form-urlencoded` in its headers), or the query string (its
`method = get`, which puts the body there; fields in a POST's URL count too, the body's first).
An answer is 200 with `{"result": "allow" | "deny"}` (and `"is_superuser": false` to an
authentication): EMQX takes any other status as "ignore" and asks its next source.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.api.deps import JSON, RuntimeDep, read_body
from gateway.api.schemas import ErrorOut
from gateway.broker.hook import BrokerHook
from gateway.errors import NotFound, Unauthorized

router = APIRouter(prefix="/broker", tags=["broker"])

Q = TypeVar("Q", bound="_Question")

_FORM = "application/x-www-form-urlencoded"


class BrokerSecret(HTTPBearer):
    """The broker hook, if the request carries the broker's secret: 404 when the hook is off,
    401 without the secret. A subclass of HTTPBearer for the scheme it declares in the OpenAPI
    document."""

    async def __call__(self, request: Request) -> BrokerHook:  # type: ignore[override]
        hook: BrokerHook | None = request.app.state.runtime.broker_hook
        if hook is None:
            raise NotFound("the broker hook is off (FIELDGATE_BROKER_HOOK_SECRET is not set)")
        scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
        if not (scheme.lower() == "bearer" and secret and hook.is_broker(secret)):
            raise Unauthorized("the broker hook needs Authorization: Bearer <broker hook secret>")
        return hook


HookAuth = Annotated[
    BrokerHook,
    Depends(
        BrokerSecret(
            auto_error=False,
            scheme_name="brokerHookSecret",
            description="FIELDGATE_BROKER_HOOK_SECRET: `Authorization: Bearer <secret>`.",
        )
    ),
]


class _Question(BaseModel):
    # Fields EMQX may send besides these (peerhost, qos, ...) are ignored. A field the client
    # did not give (no username) comes as "", as EMQX renders it.
    model_config = ConfigDict(extra="ignore")

    username: str = Field(default="", description="`${username}`")
    clientid: str = Field(default="", description="`${clientid}`")


class Authentication(_Question):
    """May this client connect?"""

    password: str = Field(default="", description="`${password}`")


class Authorization(_Question):
    """May this client publish to or subscribe to this topic?"""

    topic: str = Field(default="", description="`${topic}`: a topic name, or a filter")
    action: str = Field(default="", description="`${action}`: publish or subscribe")


class AuthenticationResult(BaseModel):
    result: Literal["allow", "deny"]
    is_superuser: bool = Field(description="always false: devices and the gateway have rules")


class AuthorizationResult(BaseModel):
    result: Literal["allow", "deny"]


async def _ask(request: Request, model: type[Q], limit: int) -> Q:
    """The question's fields from the query string and the body (JSON or form-encoded), or
    the errors FastAPI would raise: 400 invalid_json, 422 invalid_body, 400 invalid_parameter."""
    fields: dict[str, Any] = dict(request.query_params)
    where = "query"
    body = await read_body(request, limit) if request.method == "POST" else b""
    if body.strip():
        where = "body"
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        parsed = _form(body) if content_type == _FORM else _json(body)
        if not isinstance(parsed, dict):
            raise _invalid("dict_type", "the body must be an object")
        fields.update(parsed)
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**err, "loc": (where, *err["loc"])} for err in errors]
        ) from None


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _invalid("json_invalid", "the body is not valid JSON") from None


def _form(body: bytes) -> dict[str, str]:
    try:
        return dict(parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise _invalid("value_error", "the body is not a form (percent-encoded UTF-8)") from None


def _invalid(kind: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body",), "msg": message}])


def _doc(model: type[BaseModel], method: str) -> dict[str, Any]:
    """OpenAPI for a question read by `_ask`: a JSON or form body (POST), query fields (GET)."""
    schema = model.model_json_schema()
    if method == "get":
        return {
            "parameters": [
                {"name": name, "in": "query", "required": False, "schema": field}
                for name, field in schema["properties"].items()
            ]
        }
    content = {"application/json": {"schema": schema}, _FORM: {"schema": schema}}
    return {"requestBody": {"required": False, "content": content}}  # or in the query string


_OFF: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "the hook is off (not_found)"}
}


async def _authenticate(request: Request, hook: BrokerHook, limit: int) -> JSON:
    question = await _ask(request, Authentication, limit)
    allowed = await hook.authenticate(question.username, question.password, question.clientid)
    return JSON({"result": "allow" if allowed else "deny", "is_superuser": False})


async def _authorize(request: Request, hook: BrokerHook, limit: int) -> JSON:
    question = await _ask(request, Authorization, limit)
    allowed = await hook.authorize(question.username, question.action, question.topic)
    return JSON({"result": "allow" if allowed else "deny"})


@router.post(
    "/authenticate",
    response_model=AuthenticationResult,
    responses=_OFF,
    openapi_extra=_doc(Authentication, "post"),
)
async def authenticate(request: Request, hook: HookAuth, runtime: RuntimeDep) -> JSON:
    """May a client connect: a device with its token, or the gateway (EMQX HTTP authentication)."""
    return await _authenticate(request, hook, runtime.settings.max_request_body_bytes)


@router.get(
    "/authenticate",
    response_model=AuthenticationResult,
    responses=_OFF,
    openapi_extra=_doc(Authentication, "get"),
)
async def authenticate_by_query(request: Request, hook: HookAuth, runtime: RuntimeDep) -> JSON:
    """The same question in the query string (EMQX's `method = get`; the password is in the URL)."""
    return await _authenticate(request, hook, runtime.settings.max_request_body_bytes)


@router.post(
    "/authorize",
    response_model=AuthorizationResult,
    responses=_OFF,
    openapi_extra=_doc(Authorization, "post"),
)
async def authorize(request: Request, hook: HookAuth, runtime: RuntimeDep) -> JSON:
    """May a client publish to or subscribe to a topic (EMQX HTTP authorization)."""
    return await _authorize(request, hook, runtime.settings.max_request_body_bytes)


@router.get(
    "/authorize",
    response_model=AuthorizationResult,
    responses=_OFF,
    openapi_extra=_doc(Authorization, "get"),
)
async def authorize_by_query(request: Request, hook: HookAuth, runtime: RuntimeDep) -> JSON:
    """The same question in the query string (EMQX's `method = get`)."""
    return await _authorize(request, hook, runtime.settings.max_request_body_bytes)
