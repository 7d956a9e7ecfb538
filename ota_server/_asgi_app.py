"""The operator API's FastAPI plumbing: who may call a route, bounded bodies, JSON errors.

FastAPI reads a route's body before it runs any dependency, and reads it whole, unbounded,
through a ``json.loads`` that recurses once per nesting level. Routes here are ``_Route``s
instead, which from the head alone, before any body is read:

- check the bearer credential through ``Authenticator.principal`` (401, 403) for a route
  that depends on ``needs(Role.X)``; the ``Principal`` is then the dependency's value;
- for a POST, require a ``Content-Length`` (411; chunked bodies are refused), within
  ``max_body_bytes`` (413), then read it within ``body_timeout_s``, no part more than
  ``idle_timeout_s`` late (408), counting as it comes, and parse it with
  ``edgec._bounded_json`` (depth, size, finite numbers: 400) before FastAPI validates it
  against the route's pydantic model (400, "expected ...").

Every refusal is a 4xx with a one-line JSON ``{"error": ...}``: FastAPI's validation errors,
unknown routes (404), wrong methods (405 with ``Allow``), credentials (401 with
``WWW-Authenticate: Bearer``, 403), and the library's refusals by type (``refusal``:
``NotFoundError`` 404, ``ConflictError`` 409, other ``UserInputError`` 400). A bug of ours is
logged with an id and answered 500 naming only that id (``_Bugs``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgec._bounded_json import JsonInputError, loads
from edgec.errors import ConflictError, EdgecError, NotFoundError, UserInputError
from ota_server._asgi_server import ApiLimits
from ota_server.auth import Authenticator, AuthError, ForbiddenError, Principal, Role

__all__ = ["ErrorBody", "HttpError", "Json", "needs", "new_app", "refusal"]

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_VENDOR = "/static/vendor"
_BEARER = HTTPBearer(scheme_name="bearer", auto_error=False, description="an API token, or a JWT")


class ErrorBody(BaseModel):
    """Every refusal's body."""

    error: str


class HttpError(EdgecError):
    """An answer with a 4xx status and a one-line message (at most 300 characters)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        line = (message.splitlines() or [""])[0]
        super().__init__(line if len(line) <= 300 else line[:299] + "…")
        self.status = status
        self.headers = dict(headers or {})


class Json(JSONResponse):
    """JSON as the API has always written it: indented; a NaN or infinity an older version
    stored is shown as null, never an invalid document or a crash."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, indent=2, allow_nan=False).encode()
        except ValueError:
            return json.dumps(_finite(content), indent=2, allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- who may call a route -----------------------------------------------------------------
class _Needs:
    """The dependency ``needs(role)`` makes: its value is the caller, checked by ``_Route``
    from the head before anything else (so before the body is read)."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def __call__(
        self,
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    ) -> Principal:
        principal = getattr(request.state, "principal", None)
        if not isinstance(principal, Principal):  # _Route sets it before any dependency runs
            raise RuntimeError(f"{request.url.path[:200]} needs a caller but its route did not check one")
        return principal


_NEEDS = {role: _Needs(role) for role in Role}


def needs(role: Role) -> _Needs:
    """Use as ``who: Annotated[Principal, Depends(needs(Role.OPERATOR))]``."""
    return _NEEDS[role]


def _needed_role(dependant: Dependant) -> Role | None:
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, _Needs):
            return dependency.call.role
        role = _needed_role(dependency)
        if role is not None:
            return role
    return None


# -- bounded bodies -------------------------------------------------------------------------
class _ReadRequest(Request):
    """A request whose body ``_Route`` already read and parsed, within the limits."""

    def __init__(self, scope: Scope, body: bytes, value: Any) -> None:
        super().__init__(scope)
        self._read, self._value = body, value

    async def body(self) -> bytes:
        return self._read

    async def json(self) -> Any:
        return self._value


def _declared_length(request: Request) -> int:
    """The body's length from the head: 411 without one (or chunked), 413 over the limit.
    (h11 has already refused a length that is not one non-negative integer.)"""
    limits: ApiLimits = request.app.state.limits
    if "transfer-encoding" in request.headers:
        raise HttpError(
            HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not accepted: send Content-Length"
        )
    value = request.headers.get("content-length")
    if value is None:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "this request needs a Content-Length header")
    length = int(value)
    if length > limits.max_body_bytes:
        message = f"body of {length:,} bytes is over {limits.max_body_bytes:,}"
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)
    return length


async def _read_body(request: Request, length: int) -> bytes:
    """The body, counted as it comes; whole within ``body_timeout_s``, and no wait for the
    next part longer than ``idle_timeout_s``."""
    limits: ApiLimits = request.app.state.limits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s

    def next_wait() -> float:
        return min(deadline, loop.time() + limits.idle_timeout_s)

    body = bytearray()
    try:
        async with asyncio.timeout_at(next_wait()) as timer:
            async for chunk in request.stream():  # "100 Continue" goes out on the first read
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body is over the limit")
                timer.reschedule(next_wait())
    except TimeoutError:
        message = (
            f"the request body did not arrive within {limits.body_timeout_s:g} s"
            f" (or stalled for {limits.idle_timeout_s:g} s)"
        )
        raise HttpError(HTTPStatus.REQUEST_TIMEOUT, message) from None
    except ClientDisconnect:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes") from None
    request.state.body_read = True
    return bytes(body)


def _json_scope(scope: Scope) -> Scope:
    """The scope with ``Content-Type: application/json``: the body is JSON whatever the
    client called it (as the API has always read it)."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class _Route(APIRoute):
    """A route that checks the caller and reads a bounded body before FastAPI's handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        role = _needed_role(self.dependant)
        takes_body = "POST" in (self.methods or ())
        parses_body = self.body_field is not None

        async def checked(request: Request) -> Response:
            if role is not None:
                authenticator: Authenticator = request.app.state.authenticator
                header = request.headers.get("authorization")
                # in a worker thread: a credential check may be slow (a JWT's keys to fetch)
                request.state.principal = await run_in_threadpool(authenticator.principal, header, role)
            if not takes_body:
                return await handle(request)
            body = await _read_body(request, _declared_length(request))
            if not parses_body:  # read (the connection stays usable) and ignored
                return await handle(request)
            limits: ApiLimits = request.app.state.limits
            try:
                value = loads(body, max_bytes=limits.max_body_bytes, max_depth=limits.max_json_depth)
            except JsonInputError as e:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"body is {e}") from None
            return await handle(_ReadRequest(_json_scope(request.scope), body, value))

        return checked


# -- answers --------------------------------------------------------------------------------
def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Json:
    """A refusal; the connection is closed if the client sent a body nobody read."""
    answer = Json({"error": message}, status_code=status, headers=headers)
    has_body = "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"
    if has_body and not getattr(request.state, "body_read", False):
        answer.headers["Connection"] = "close"
    return answer


async def _on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HttpError)
    return _error(request, error.status, str(error), error.headers)


def refusal(error: UserInputError) -> HttpError:
    """The answer to a request the library refused, chosen by the error's type, never by its
    text: a device or rollout that is not there is 404, one whose state does not allow the
    request 409, any other bad input 400."""
    for kind, status in ((NotFoundError, HTTPStatus.NOT_FOUND), (ConflictError, HTTPStatus.CONFLICT)):
        if isinstance(error, kind):
            return HttpError(status, str(error))
    return HttpError(HTTPStatus.BAD_REQUEST, str(error))


async def _on_auth_error(request: Request, error: Exception) -> Response:
    if isinstance(error, ForbiddenError):
        return _error(request, HTTPStatus.FORBIDDEN, str(error))
    return _error(request, HTTPStatus.UNAUTHORIZED, str(error), {"WWW-Authenticate": "Bearer"})


async def _on_invalid(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    where = ".".join(loc[1:] if loc[:1] in (["body"], ["path"], ["query"], ["header"]) else loc) or "body"
    route = request.scope.get("route")
    example = getattr(route, "openapi_extra", None) or {}
    expected = f" (expected {example['x-expected']})" if "x-expected" in example else ""
    return _error(request, HTTPStatus.BAD_REQUEST, str(HttpError(400, f"{where}: {first['msg']}{expected}")))


async def _on_http_exception(request: Request, error: Exception) -> Response:
    """Starlette's own refusals: no route (404), a method the path does not take (405)."""
    assert isinstance(error, HTTPException)
    method, path = request.method[:20], request.url.path[:200]
    if error.status_code == HTTPStatus.NOT_FOUND:
        return _error(request, HTTPStatus.NOT_FOUND, f"no route {method} {path}")
    if error.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        allowed = sorted(
            {
                m
                for r in request.app.routes
                if isinstance(r, APIRoute) and r.path_regex.fullmatch(path)
                for m in r.methods or ()
            }
        )
        headers = {"Allow": ", ".join(allowed)} if allowed else dict(error.headers or {})
        return _error(request, HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here", headers)
    status = error.status_code if 400 <= error.status_code < 500 else HTTPStatus.BAD_REQUEST
    return _error(request, status, str(HttpError(status, str(error.detail))), dict(error.headers or {}))


class _Bugs:
    """Outermost: an exception nothing else answered is a bug of ours. It is logged with an id
    and answered 500 naming only the id (no path, no message that could leak one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            error_id = secrets.token_hex(6)
            logger.exception("%s %s failed (error %s)", scope["method"][:20], scope["path"][:200], error_id)
            if started:
                return  # the answer is cut short; uvicorn closes the connection
            message = f"internal error {error_id}; the server's log has the details"
            answer = Json({"error": message}, status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
            answer.headers["Connection"] = "close"
            await answer(scope, receive, send)


# -- the app --------------------------------------------------------------------------------
def new_app(authenticator: Authenticator, limits: ApiLimits, title: str) -> FastAPI:
    """An empty API whose routes are ``_Route``s, with the error handlers above, the OpenAPI
    document at /openapi.json and Swagger UI at /docs, served from this package (no CDN)."""
    app = FastAPI(
        title=title,
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        redirect_slashes=False,
        default_response_class=Json,
    )
    app.router.route_class = _Route
    app.state.authenticator = authenticator
    app.state.limits = limits
    app.add_exception_handler(HttpError, _on_http_error)
    app.add_exception_handler(AuthError, _on_auth_error)
    app.add_exception_handler(ForbiddenError, _on_auth_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_middleware(_Bugs)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} API",
            swagger_js_url=f"{_VENDOR}/swagger-ui-bundle.js",
            swagger_css_url=f"{_VENDOR}/swagger-ui.css",
            swagger_favicon_url=f"{_VENDOR}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # its default asks validator.swagger.io
        )

    return app
