"""HTTP: the repository with Range requests (for fleets behind a CDN) and the operator API.

``/v1/repo/<path>`` serves the image repository (metadata/, targets/) to anyone: everything
in it is signed. The operator API needs a bearer token; each token has a role: a viewer
reads, an operator also starts rollouts, an admin does everything. Errors are JSON
``{"error": ...}`` with a 4xx status; malformed input never produces a 500.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from edgec.director import Action, SignedDirectorDocument
from edgec.errors import UserInputError
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts, RolloutSpec

__all__ = ["HttpApi", "Role", "openapi"]

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the operator API."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    schema = {"schema": {"$ref": "#/components/schemas/Error"}}
    error = {"description": "error", "content": {"application/json": schema}}
    rollout_body = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RolloutRequest"}}}
    }
    ok = {"200": {"description": "ok"}, "401": error, "403": error}
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
                "AssignRequest": {
                    "type": "object",
                    "properties": {
                        "release": {"type": "string"},
                        "action": {"type": "string", "enum": ["install", "rollback"]},
                    },
                    "required": ["release"],
                },
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
                    "responses": {**ok, "400": error, "404": error},
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
                    "responses": {**ok, "404": error, "409": error},
                }
            },
            "/v1/rollouts": {
                "get": {"security": bearer, "summary": "rollouts (viewer)", "responses": ok},
                "post": {
                    "security": bearer,
                    "summary": "start a rollout (operator)",
                    "requestBody": rollout_body,
                    "responses": {**ok, "201": {"description": "created"}, "400": error},
                },
            },
        },
    }


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
    ) -> None:
        self.repository = repository
        self.registry = registry
        self._assign = assign  # the server's: sign and publish a director document
        self._rollouts = rollouts
        # tokens are kept as sha256 digests (a config file holds only those), compared in constant time
        self._tokens = {hashlib.sha256(t.encode()).hexdigest(): role for t, role in tokens.items()}
        self._tokens.update(token_digests or {})
        self._server: ThreadingHTTPServer | None = None

    # -- auth -----------------------------------------------------------------------------
    def _who(self, header: str | None, needed: Role) -> tuple[str, Role]:
        if not header or not header.startswith("Bearer "):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing bearer token (Authorization: Bearer TOKEN)")
        digest = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).hexdigest()
        role = next((r for d, r in self._tokens.items() if hmac.compare_digest(d, digest)), None)
        if role is None:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "unknown token")
        if role < needed:
            message = f"a {role.name.lower()} token cannot do this; it needs {needed.name.lower()}"
            raise ApiError(HTTPStatus.FORBIDDEN, message)
        return digest[:12], role

    # -- routes ---------------------------------------------------------------------------
    def route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """``headers`` with lower-case names."""
        if method == "GET" and path == "/openapi.json":
            return self._json(HTTPStatus.OK, openapi())
        if method in ("GET", "HEAD") and path.startswith("/v1/repo/"):
            return self._repo_file(path.removeprefix("/v1/repo/"), headers.get("range"))
        routes: dict[tuple[str, str], tuple[Role, Callable[..., Any]]] = {
            ("GET", "/v1/devices"): (Role.VIEWER, lambda: [d.as_dict() for d in self.registry.devices()]),
            ("GET", "/v1/releases"): (Role.VIEWER, lambda: [r.__dict__ for r in self.repository.releases()]),
            ("GET", "/v1/rollouts"): (Role.VIEWER, lambda: self._scheduler().list()),
        }
        auth = headers.get("authorization")
        if (method, path) in routes:
            needed, handler = routes[(method, path)]
            self._who(auth, needed)
            return self._json(HTTPStatus.OK, handler())
        if method == "GET" and path.startswith("/v1/devices/"):
            self._who(auth, Role.VIEWER)
            try:
                device = self.registry.get(path.removeprefix("/v1/devices/"))
                return self._json(HTTPStatus.OK, device.as_dict())
            except UserInputError as e:
                raise ApiError(HTTPStatus.NOT_FOUND, str(e)) from e
        if method == "POST" and path.startswith("/v1/devices/") and path.endswith("/assign"):
            self._who(auth, Role.OPERATOR)
            return self._assign_release(path.removeprefix("/v1/devices/").removesuffix("/assign"), body)
        if method == "POST" and path == "/v1/rollouts":
            who, _ = self._who(auth, Role.OPERATOR)
            return self._start_rollout(body, who)
        if path.startswith("/v1/rollouts/"):
            return self._steer_rollout(method, path.removeprefix("/v1/rollouts/").split("/"), auth)
        raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")

    @staticmethod
    def _body(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}") from e

    def _assign_release(self, device_id: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        request = self._body(body)
        action = request.get("action", "install") if isinstance(request, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("release"), str):
            raise ApiError(
                HTTPStatus.BAD_REQUEST, 'expected {"release": "NAME:VERSION", "action": "install"}'
            )
        if action not in {a.value for a in Action}:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"action must be install or rollback, not {action!r}")
        if self._assign is None:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "this server cannot sign director documents")
        try:
            document = self._assign(device_id, request["release"], Action(action))
        except UserInputError as e:
            status = HTTPStatus.NOT_FOUND if "no device" in str(e) else HTTPStatus.BAD_REQUEST
            raise ApiError(status, str(e)) from e
        return self._json(HTTPStatus.OK, document.model_dump(mode="json"))

    def _scheduler(self) -> Rollouts:
        if self._rollouts is None:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "this server does not run rollouts")
        return self._rollouts

    def _start_rollout(self, body: bytes, who: str) -> tuple[int, dict[str, str], bytes]:
        request = self._body(body)
        try:
            spec = RolloutSpec.model_validate(request)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            shape = '{"release": "NAME:VERSION", "group": "GROUP", "waves": ["5%", "100%"], ...}'
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{where}: {first['msg']} (expected {shape})") from e
        try:
            created = self._scheduler().start(spec, who)
        except UserInputError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(e)) from e
        return self._json(HTTPStatus.CREATED, created)

    def _steer_rollout(
        self, method: str, parts: list[str], auth: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        rollouts = self._scheduler()
        actions = {
            "pause": rollouts.pause,
            "resume": rollouts.resume,
            "abort": rollouts.abort,
            "rollback": rollouts.rollback,
        }
        try:
            if method == "GET" and len(parts) == 1:
                self._who(auth, Role.VIEWER)
                return self._json(HTTPStatus.OK, rollouts.status(parts[0]))
            if method == "POST" and len(parts) == 2 and parts[1] in actions:
                self._who(auth, Role.OPERATOR)
                return self._json(HTTPStatus.OK, actions[parts[1]](parts[0]))
        except UserInputError as e:
            status = HTTPStatus.NOT_FOUND if str(e).startswith("no rollout") else HTTPStatus.CONFLICT
            raise ApiError(status, str(e)) from e
        raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} /v1/rollouts/{'/'.join(parts)}")

    def _repo_file(self, relative: str, range_header: str | None) -> tuple[int, dict[str, str], bytes]:
        root = self.repository.folder.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file() or root / "keys" in path.parents:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such file {relative}")
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        if range_header:
            match = _RANGE.match(range_header.strip())
            if not match or (not match[1] and not match[2]):
                raise ApiError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"bad Range {range_header!r}")
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # the last N bytes
                start = max(size - int(match[2]), 0)
            if start > end or start >= size:
                outside = f"Range {range_header!r} outside 0-{size - 1}"
                raise ApiError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, outside)
            status = HTTPStatus.PARTIAL_CONTENT
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return status, headers, data

    @staticmethod
    def _json(status: HTTPStatus, value: Any) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(value, indent=2).encode()

    # -- serving --------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving in a background thread; returns the port."""
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug(format, *args)

            def _handle(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY_BYTES:
                        too_big = f"body over {MAX_BODY_BYTES} bytes"
                        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_big)
                    body = self.rfile.read(length) if length else b""
                    path = self.path.split("?")[0]
                    status, headers, data = api.route(
                        self.command, path, {k.lower(): v for k, v in self.headers.items()}, body
                    )
                except ApiError as e:
                    status, headers, data = api._json(e.status, {"error": str(e)})
                except ValueError as e:
                    status, headers, data = api._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
                except Exception as e:  # a bug of ours: say so, keep serving
                    logger.exception("%s %s failed", self.command, self.path)
                    error = {"error": f"internal error: {type(e).__name__}: {e}"}
                    status, headers, data = api._json(HTTPStatus.INTERNAL_SERVER_ERROR, error)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
