"""HTTP: the repository with Range requests (for fleets behind a CDN) and the operator API.

``/v1/repo/<path>`` serves the image repository (metadata/, targets/) to anyone: everything
in it is signed. The operator API needs a bearer token; each token has a role: a viewer
reads, an operator also starts rollouts, an admin does everything.

A request is resolved and its token checked from the head alone; a body is read only
after that, for the routes that take one (``ota_server._http_server`` enforces the
transport limits). Bodies are JSON bounded in size and depth, numbers finite, and checked
against typed models. Every refusal is a 4xx with a one-line JSON ``{"error": ...}``;
errors are mapped by type (``NotFoundError`` is a 404); a bug of ours is a 500 that names
only an error id the server's log has.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgec._bounded_json import JsonInputError, loads
from edgec.director import Action, SignedDirectorDocument
from edgec.errors import ConflictError, NotFoundError, UserInputError
from edgec.rollout_spec import RolloutSpec
from ota_server import _http_server
from ota_server._http_server import ApiLimits, HttpError, Response
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts
from ota_server.served import served_file

__all__ = ["ApiLimits", "AssignRequest", "HttpApi", "Role", "openapi"]

logger = logging.getLogger(__name__)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


class AssignRequest(BaseModel):
    """``POST /v1/devices/{id}/assign``: run this release."""

    model_config = ConfigDict(extra="forbid")

    release: Annotated[str, Field(min_length=1, max_length=256)]  # NAME:VERSION
    action: Action = Action.INSTALL

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, value: Any) -> Any:
        if not isinstance(value, str) or value not in {a.value for a in Action}:
            shown = repr(value) if isinstance(value, str) else f"a JSON {type(value).__name__}"
            raise ValueError(f"action must be install or rollback, not {shown[:40]}")
        return value


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the operator API."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    schema = {"schema": {"$ref": "#/components/schemas/Error"}}
    error = {"description": "error", "content": {"application/json": schema}}
    rollout_body = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RolloutRequest"}}}
    }
    ok = {"200": {"description": "ok"}, "401": error, "403": error}
    body_errors = {"400": error, "411": error, "413": error}
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgec OTA server", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "AssignRequest": AssignRequest.model_json_schema(),
                "RolloutRequest": RolloutSpec.model_json_schema(),
            },
        },
        "paths": {
            "/v1/repo/{path}": {
                "get": {
                    "summary": "repository file (Range supported)",
                    "responses": {
                        "200": {"description": "file"},
                        "206": {"description": "part"},
                        "404": error,
                    },
                }
            },
            "/v1/devices": {
                "get": {
                    "security": bearer,
                    "summary": "devices (viewer)",
                    "responses": {"200": {"description": "devices"}, "401": error, "403": error},
                }
            },
            "/v1/devices/{id}": {
                "get": {
                    "security": bearer,
                    "summary": "one device (viewer)",
                    "responses": {"200": {"description": "device"}, "404": error},
                }
            },
            "/v1/devices/{id}/assign": {
                "post": {
                    "security": bearer,
                    "summary": "sign and publish a director document: run this release (operator)",
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/AssignRequest"}}
                        }
                    },
                    "responses": {**ok, **body_errors, "404": error},
                }
            },
            "/v1/releases": {
                "get": {
                    "security": bearer,
                    "summary": "published releases (viewer)",
                    "responses": {"200": {"description": "releases"}},
                }
            },
            "/v1/rollouts/{id}": {
                "get": {
                    "security": bearer,
                    "summary": "waves, abort rules with canary and control figures, devices (viewer)",
                    "responses": {**ok, "404": error},
                }
            },
            "/v1/rollouts/{id}/{action}": {
                "post": {
                    "security": bearer,
                    "summary": "pause, resume, abort or rollback (operator)",
                    "responses": {**ok, "404": error, "409": error, "411": error},
                }
            },
            "/v1/rollouts": {
                "get": {"security": bearer, "summary": "rollouts (viewer)", "responses": ok},
                "post": {
                    "security": bearer,
                    "summary": "start a rollout (operator)",
                    "requestBody": rollout_body,
                    "responses": {**ok, **body_errors, "201": {"description": "created"}},
                },
            },
        },
    }


Params = dict[str, str]
Call = Callable[[Params, dict[str, str], bytes, str], Response]  # params, headers, body, who


@dataclass(frozen=True)
class _Endpoint:
    role: Role | None  # None: no token needed
    call: Call
    wants_body: bool = False


@dataclass(frozen=True)
class _Prepared:
    endpoint: _Endpoint
    params: Params
    headers: dict[str, str]
    who: str

    @property
    def wants_body(self) -> bool:
        return self.endpoint.wants_body

    def run(self, body: bytes) -> Response:
        return self.endpoint.call(self.params, self.headers, body, self.who)


class HttpApi:
    def __init__(
        self,
        repository: ImageRepository,
        registry: Registry,
        tokens: Mapping[str, Role],
        token_digests: Mapping[str, Role] | None = None,
        *,
        assign: Callable[..., SignedDirectorDocument] | None = None,
        rollouts: Rollouts | None = None,
        limits: ApiLimits | None = None,
    ) -> None:
        self.repository = repository
        self.registry = registry
        self._assign = assign  # the server's: sign and publish a director document
        self._rollouts = rollouts
        self.limits = limits or ApiLimits()
        # tokens are kept as sha256 digests (a config file holds only those), compared in constant time
        self._tokens = {hashlib.sha256(t.encode()).hexdigest(): role for t, role in tokens.items()}
        self._tokens.update(token_digests or {})
        self._server: ThreadingHTTPServer | None = None
        self._routes: list[tuple[re.Pattern[str], dict[str, _Endpoint]]] = [
            (re.compile(r"/openapi\.json"), {"GET": _Endpoint(None, self._openapi)}),
            (
                re.compile(r"/v1/repo/(?P<path>.+)"),
                {"GET": _Endpoint(None, self._repo), "HEAD": _Endpoint(None, self._repo)},
            ),
            (re.compile(r"/v1/devices"), {"GET": _Endpoint(Role.VIEWER, self._devices)}),
            (re.compile(r"/v1/devices/(?P<id>[^/]+)"), {"GET": _Endpoint(Role.VIEWER, self._device)}),
            (
                re.compile(r"/v1/devices/(?P<id>[^/]+)/assign"),
                {"POST": _Endpoint(Role.OPERATOR, self._assign_release, wants_body=True)},
            ),
            (re.compile(r"/v1/releases"), {"GET": _Endpoint(Role.VIEWER, self._releases)}),
            (
                re.compile(r"/v1/rollouts"),
                {
                    "GET": _Endpoint(Role.VIEWER, self._list_rollouts),
                    "POST": _Endpoint(Role.OPERATOR, self._start_rollout, wants_body=True),
                },
            ),
            (re.compile(r"/v1/rollouts/(?P<id>[^/]+)"), {"GET": _Endpoint(Role.VIEWER, self._rollout)}),
            (
                re.compile(r"/v1/rollouts/(?P<id>[^/]+)/(?P<action>pause|resume|abort|rollback)"),
                # a body, if any, is read (Content-Length needed) and ignored
                {"POST": _Endpoint(Role.OPERATOR, self._steer_rollout, wants_body=True)},
            ),
        ]

    # -- auth -----------------------------------------------------------------------------
    def _who(self, header: str | None, needed: Role) -> tuple[str, Role]:
        if not header or not header.startswith("Bearer "):
            raise HttpError(HTTPStatus.UNAUTHORIZED, "missing bearer token (Authorization: Bearer TOKEN)")
        digest = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).hexdigest()
        role = next((r for d, r in self._tokens.items() if hmac.compare_digest(d, digest)), None)
        if role is None:
            raise HttpError(HTTPStatus.UNAUTHORIZED, "unknown token")
        if role < needed:
            message = f"a {role.name.lower()} token cannot do this; it needs {needed.name.lower()}"
            raise HttpError(HTTPStatus.FORBIDDEN, message)
        return digest[:12], role

    # -- routing --------------------------------------------------------------------------
    def prepare(self, method: str, path: str, headers: dict[str, str]) -> _Prepared:
        """The endpoint for ``method path``, its token checked; nothing of the body is read.
        ``headers`` with lower-case names. Raises ``HttpError`` (404, 405, 401, 403)."""
        for pattern, methods in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            endpoint = methods.get(method)
            if endpoint is None:
                error = HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method[:20]} is not allowed here")
                error.headers["Allow"] = ", ".join(methods)
                raise error
            who = "anonymous"
            if endpoint.role is not None:
                who, _ = self._who(headers.get("authorization"), endpoint.role)
            return _Prepared(endpoint, match.groupdict(), headers, who)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no route {method[:20]} {path[:200]}")

    def _json_body(self, body: bytes) -> Any:
        try:
            return loads(body, max_bytes=self.limits.max_body_bytes, max_depth=self.limits.max_json_depth)
        except JsonInputError as e:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body is {e}") from None

    def _model(self, model: type[BaseModel], body: bytes, shape: str) -> Any:
        try:
            return model.model_validate(self._json_body(body))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{where}: {first['msg']} (expected {shape})") from None

    # -- endpoints ------------------------------------------------------------------------
    def _openapi(self, _p: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        return self._json(HTTPStatus.OK, openapi())

    def _repo(self, params: Params, headers: dict[str, str], _b: bytes, _who: str) -> Response:
        try:
            return self._repo_file(params["path"], headers.get("range"))
        except ValueError as e:  # a Range or path the filesystem cannot take
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad repository request") from e

    def _devices(self, _p: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        return self._json(HTTPStatus.OK, [d.as_dict() for d in self.registry.devices()])

    def _device(self, params: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        try:
            return self._json(HTTPStatus.OK, self.registry.get(params["id"]).as_dict())
        except UserInputError as e:
            raise _refusal(e) from None

    def _releases(self, _p: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        return self._json(HTTPStatus.OK, [r.__dict__ for r in self.repository.releases()])

    def _assign_release(self, params: Params, _h: dict[str, str], body: bytes, _who: str) -> Response:
        request = self._model(AssignRequest, body, '{"release": "NAME:VERSION", "action": "install"}')
        if self._assign is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "this server cannot sign director documents")
        try:
            document = self._assign(params["id"], request.release, request.action)
        except UserInputError as e:
            raise _refusal(e) from None
        return self._json(HTTPStatus.OK, document.model_dump(mode="json"))

    def _scheduler(self) -> Rollouts:
        if self._rollouts is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "this server does not run rollouts")
        return self._rollouts

    def _list_rollouts(self, _p: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        return self._json(HTTPStatus.OK, self._scheduler().list())

    def _start_rollout(self, _p: Params, _h: dict[str, str], body: bytes, who: str) -> Response:
        shape = '{"release": "NAME:VERSION", "group": "GROUP", "waves": ["5%", "100%"], ...}'
        spec = self._model(RolloutSpec, body, shape)
        try:
            created = self._scheduler().start(spec, who)
        except UserInputError as e:
            raise _refusal(e) from None
        return self._json(HTTPStatus.CREATED, created)

    def _rollout(self, params: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        try:
            return self._json(HTTPStatus.OK, self._scheduler().status(params["id"]))
        except UserInputError as e:
            raise _refusal(e) from None

    def _steer_rollout(self, params: Params, _h: dict[str, str], _b: bytes, _who: str) -> Response:
        rollouts = self._scheduler()
        steer = {
            "pause": rollouts.pause,
            "resume": rollouts.resume,
            "abort": rollouts.abort,
            "rollback": rollouts.rollback,
        }[params["action"]]
        try:
            return self._json(HTTPStatus.OK, steer(params["id"]))
        except UserInputError as e:
            raise _refusal(e) from None

    def _repo_file(self, relative: str, range_header: str | None) -> tuple[int, dict[str, str], bytes]:
        path = served_file(self.repository.folder, relative)  # the allowlist MQTT fetch uses too
        if path is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file {relative[:200]!r}")
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        if range_header:
            match = _RANGE.match(range_header.strip())
            if not match or (not match[1] and not match[2]):
                raise HttpError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"bad Range {range_header!r}")
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # the last N bytes
                start = max(size - int(match[2]), 0)
            if start > end or start >= size:
                outside = f"Range {range_header!r} outside 0-{size - 1}"
                raise HttpError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, outside)
            status = HTTPStatus.PARTIAL_CONTENT
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return status, headers, data

    # -- answers --------------------------------------------------------------------------
    @staticmethod
    def _json(status: HTTPStatus, value: Any) -> Response:
        try:
            data = json.dumps(value, indent=2, allow_nan=False)
        except ValueError:  # a NaN or infinity an older version stored: shown as null
            data = json.dumps(_finite(value), indent=2, allow_nan=False)
        return status, {"Content-Type": "application/json"}, data.encode()

    def error(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> Response:
        code, answer_headers, data = self._json(status, {"error": message})
        return code, {**answer_headers, **(headers or {})}, data

    # -- serving --------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving in a background thread; returns the port."""
        self._server = _http_server.serve(self, self.limits, host, port)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _refusal(error: UserInputError) -> HttpError:
    """The answer to a request the library refused, chosen by the error's type, never by its
    text: a device or rollout that is not there is 404, one whose state does not allow the
    request 409, any other bad input 400."""
    for kind, status in ((NotFoundError, HTTPStatus.NOT_FOUND), (ConflictError, HTTPStatus.CONFLICT)):
        if isinstance(error, kind):
            return HttpError(status, str(error))
    return HttpError(HTTPStatus.BAD_REQUEST, str(error))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
