"""CPU per request of three ways to put bearer authentication in front of a FastAPI endpoint.

In-process (raw ASGI calls, no server, no database), one cached token, an endpoint that does
nothing else, so the difference between the rows is the authentication's own cost:

- `hand-made`: one dependency of ours that parses the header (fieldgate before issue 9);
- `HTTPBearer + ours`: `fastapi.security.HTTPBearer` as a sub-dependency of ours;
- `HTTPBearer subclass`: one dependency, a subclass of HTTPBearer (gateway/auth.py).

Each row: medians and minimums of `--rounds` rounds of `--requests` calls, rounds interleaved,
CPU time of this process (`time.process_time`).

    .venv/bin/python bench/auth_overhead.py
"""

import argparse
import asyncio
import statistics
import time
from typing import Annotated, Any

from cachetools import TTLCache
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Message

TOKEN = "tok"
_cache: TTLCache[str, str] = TTLCache(100_000, ttl=1e9)
_cache[TOKEN] = "principal"
_cache_dict: dict[str, tuple[float, str]] = {TOKEN: (time.monotonic() + 1e9, "principal")}


def _refuse() -> HTTPException:
    return HTTPException(401)


async def hand_made(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise _refuse()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _refuse()
    hit = _cache_dict.get(token.strip())
    if hit is None or hit[0] <= time.monotonic():
        raise _refuse()
    return hit[1]


_bearer = HTTPBearer(auto_error=False)


async def with_sub_dependency(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None:
        raise _refuse()
    try:
        return _cache[credentials.credentials]
    except KeyError:
        raise _refuse() from None


class BearerPrincipal(HTTPBearer):
    async def __call__(self, request: Request) -> str:  # type: ignore[override]
        credentials = await super().__call__(request)
        if credentials is None:
            raise _refuse()
        try:
            return _cache[credentials.credentials]
        except KeyError:
            raise _refuse() from None


subclass = BearerPrincipal(auto_error=False)


def app_with(dependency: Any) -> FastAPI:
    """An app of one route (each variant its own app: route matching costs the same)."""
    app = FastAPI()

    @app.post("/endpoint")
    async def endpoint(principal: Annotated[str, Depends(dependency)]) -> dict[str, str]:
        return {}

    return app


APPS = {
    "hand-made": app_with(hand_made),
    "HTTPBearer + ours": app_with(with_sub_dependency),
    "HTTPBearer subclass": app_with(subclass),
}


async def call(app: FastAPI) -> None:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/endpoint",
        "raw_path": b"/endpoint",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise RuntimeError(f"answered {statuses}")


async def main(rounds: int, requests: int) -> None:
    cpu_us: dict[str, list[float]] = {name: [] for name in APPS}
    for _ in range(rounds):
        for name, app in APPS.items():
            started = time.process_time()
            for _ in range(requests):
                await call(app)
            cpu_us[name].append((time.process_time() - started) / requests * 1e6)
    print(f"CPU us per request, {rounds} rounds of {requests} requests: median (min)")
    for name, values in cpu_us.items():
        print(f"  {name:<22} {statistics.median(values):6.1f} ({min(values):.1f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--requests", type=int, default=5_000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.requests))
