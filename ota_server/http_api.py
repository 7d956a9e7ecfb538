"""HTTP: the repository with Range requests (for fleets behind a CDN) and the operator API.

``/v1/repo/<path>`` serves the image repository (metadata/, targets/) to anyone: everything
in it is signed. The operator API needs a bearer credential (``ota_server.auth``); each has a
role: a viewer reads, an operator also assigns releases and steers rollouts, an admin does
everything. The routes that act are handed the caller (a ``Principal``).

FastAPI serves it, on uvicorn (``ota_server._asgi_server``: head and write deadlines, the
connection cap, JSON protocol errors). A request is resolved and its caller checked from the
head alone; a body is read only after that, bounded in size, time and depth, then checked
against the route's pydantic model (``ota_server._asgi_app``). Every refusal is a 4xx with a
one-line JSON ``{"error": ...}``; a bug of ours is a 500 that names only an error id the
server's log has. The OpenAPI document is generated, at /openapi.json; Swagger UI at /docs
works offline (its files are in ``ota_server/static/vendor``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgec.director import Action, ShadowRequest, SignedDirectorDocument
from edgec.errors import UserInputError
from edgec.rollout_spec import RolloutSpec
from ota_server._asgi_app import ErrorBody, HttpError, needs, new_app, refusal
from ota_server._asgi_server import ApiLimits, ServerThread
from ota_server.audit import AuditAction, AuditLog
from ota_server.audit import failed as audit_failed
from ota_server.audit import refused as audit_refused
from ota_server.auth import Authenticator, Principal, Role, StaticToken
from ota_server.dashboard import Dashboard
from ota_server.metrics import CONTENT_TYPE as METRICS_TYPE
from ota_server.metrics import ServerMetrics
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts
from ota_server.served import served_file

__all__ = ["ApiLimits", "AssignRequest", "HttpApi", "Role"]

logger = logging.getLogger(__name__)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ASSIGN_SHAPE = '{"release": "NAME:VERSION", "action": "install"}'
_ROLLOUT_SHAPE = '{"release": "NAME:VERSION", "group": "GROUP", "waves": ["5%", "100%"], ...}'


class AssignRequest(BaseModel):
    """``POST /v1/devices/{id}/assign``: run this release."""

    model_config = ConfigDict(extra="forbid")

    release: Annotated[str, Field(min_length=1, max_length=256)]  # NAME:VERSION
    action: Action = Action.INSTALL
    shadow: ShadowRequest | None = None  # action shadow: for how long, on what share of requests

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, value: Any) -> Any:
        if not isinstance(value, str) or value not in {a.value for a in Action}:
            shown = repr(value) if isinstance(value, str) else f"a JSON {type(value).__name__}"
            raise ValueError(f"action must be install, rollback or shadow, not {shown[:40]}")
        return value

    @model_validator(mode="after")
    def _shadow_with_its_action(self) -> AssignRequest:
        if (self.action is Action.SHADOW) != (self.shadow is not None):
            raise ValueError('action shadow goes with "shadow": {"duration_s": 600}, and only it does')
        return self


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": HTTPStatus(s).phrase} for s in statuses}


_READ = _errors(401, 403)
_BODY = _errors(400, 401, 403, 408, 411, 413)
Viewer = Annotated[Principal, Depends(needs(Role.VIEWER))]
Operator = Annotated[Principal, Depends(needs(Role.OPERATOR))]


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
        authenticator: Authenticator | None = None,
        metrics: ServerMetrics | None = None,
        dashboard: bool = True,
        secure_cookie: bool = False,
        audit: AuditLog | None = None,
        replicas: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        """``tokens`` (plain token → role) and ``token_digests`` (sha256 hex → role) make the
        authenticator when none is given; ``assign`` signs and publishes a director document
        (the server's), ``rollouts`` runs rollouts: without them those routes answer 503.
        ``metrics``: served at /metrics (to a viewer); ``dashboard``: the web pages under /ui;
        ``audit``: every action (assign, rollouts) recorded with who asked and how it ended;
        ``replicas``: the server replicas sharing the registry (``ota_server.cluster``)."""
        self.repository = repository
        self.registry = registry
        self._assign = assign
        self._rollouts = rollouts
        self.limits = limits or ApiLimits()
        if authenticator is None:
            named = [StaticToken(d[:12], d, role) for d, role in (token_digests or {}).items()]
            authenticator = Authenticator(tokens, static=named)
        self.authenticator = authenticator
        self.metrics = metrics
        self.audit = audit
        self._replicas = replicas
        self.dashboard = (
            Dashboard(authenticator, registry, repository, rollouts, audit=audit, secure_cookie=secure_cookie)
            if dashboard
            else None
        )
        self.app = self._new_app()
        self._server: ServerThread | None = None

    def _new_app(self) -> FastAPI:
        app = new_app(self.authenticator, self.limits, "edgec OTA server")
        route = app.add_api_route
        viewer = [Depends(needs(Role.VIEWER))]
        repo_errors = _errors(400, 404, 416)
        for method in ("GET", "HEAD"):  # one route each: one OpenAPI operation each
            route(
                "/v1/repo/{path:path}",
                self._repo,
                methods=[method],
                name=f"repo_{method}",
                responses=repo_errors,
            )
        route("/v1/devices", self._devices, methods=["GET"], dependencies=viewer, responses=_READ)
        one_device = {**_READ, **_errors(404)}
        route(
            "/v1/devices/{device_id}",
            self._device,
            methods=["GET"],
            dependencies=viewer,
            responses=one_device,
        )
        route(
            "/v1/devices/{device_id}/assign",
            self._assign_release,
            methods=["POST"],
            response_model=None,  # the signed document as it was signed, documented below
            responses={200: {"model": SignedDirectorDocument}, **_BODY, **_errors(404, 503)},
            openapi_extra={"x-expected": _ASSIGN_SHAPE},
        )
        route("/v1/releases", self._releases, methods=["GET"], dependencies=viewer, responses=_READ)
        route("/v1/rollouts", self._list_rollouts, methods=["GET"], dependencies=viewer, responses=_READ)
        route(
            "/v1/rollouts",
            self._start_rollout,
            methods=["POST"],
            status_code=HTTPStatus.CREATED,
            responses={**_BODY, **_errors(503)},
            openapi_extra={"x-expected": _ROLLOUT_SHAPE},
        )
        one_rollout = {**_READ, **_errors(404)}
        route(
            "/v1/rollouts/{rollout_id}",
            self._rollout,
            methods=["GET"],
            dependencies=viewer,
            responses=one_rollout,
        )
        for action in ("pause", "resume", "abort", "rollback"):
            route(
                f"/v1/rollouts/{{rollout_id}}/{action}",
                self._steer(action),
                methods=["POST"],
                name=f"{action}_rollout",
                responses={**_BODY, **_errors(404, 409, 503)},
            )
        if self._replicas is not None:
            route("/v1/replicas", self._replicas, methods=["GET"], dependencies=viewer, responses=_READ)
        if self.metrics is not None:
            route(
                "/metrics",
                self._metrics,
                methods=["GET"],
                dependencies=viewer,
                responses=_READ,
                response_class=PlainTextResponse,
            )
        if self.dashboard is not None:
            self.dashboard.mount(app)
        return app

    def _metrics(self) -> Response:
        """The server's Prometheus metrics, text format 0.0.4 (viewer: scrape with a token)."""
        assert self.metrics is not None
        return Response(self.metrics.render(), media_type=METRICS_TYPE)

    # -- the repository -----------------------------------------------------------------------
    def _repo(self, path: str, request: Request) -> Response:
        """A repository file (metadata/ or targets/); ``Range: bytes=`` answers 206 (or 416)."""
        try:
            status, headers, data = self._repo_file(path, request.headers.get("range"))
        except ValueError as e:  # a Range or path the filesystem cannot take
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad repository request") from e
        return Response(data, status_code=status, headers=headers)

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
        if self.metrics is not None and relative.startswith("targets/"):
            self.metrics.fetched("http", len(data))
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return status, headers, data

    # -- devices and releases (viewer) --------------------------------------------------------
    def _devices(self) -> list[dict[str, Any]]:
        """Every device: id, fleet, group, profile, status, releases, last report (viewer)."""
        return [d.as_dict() for d in self.registry.devices()]

    def _device(self, device_id: str) -> dict[str, Any]:
        """One device (viewer)."""
        try:
            return self.registry.get(device_id).as_dict()
        except UserInputError as e:
            raise refusal(e) from None

    def _releases(self) -> list[dict[str, Any]]:
        """Published releases: one row per bundle: name, version, profile, format (viewer)."""
        return [dict(r.__dict__) for r in self.repository.releases()]

    # -- acting (operator) --------------------------------------------------------------------
    def _assign_release(self, device_id: str, body: AssignRequest, who: Operator) -> dict[str, Any]:
        """Sign and publish a director document: the device runs this release (operator)."""
        if self._assign is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "this server cannot sign director documents")
        params = {"device": device_id, "release": body.release, "action": body.action.value}
        with self._audited(who, AuditAction.DEVICE_ASSIGN, params):
            asked = {"shadow": body.shadow} if body.shadow else {}  # an assign from before shadows
            document = self._assign(device_id, body.release, body.action, **asked)
        return document.model_dump(mode="json")

    def _scheduler(self) -> Rollouts:
        if self._rollouts is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "this server does not run rollouts")
        return self._rollouts

    def _list_rollouts(self) -> list[dict[str, Any]]:
        """Every rollout (viewer)."""
        return self._scheduler().list()

    def _start_rollout(self, body: RolloutSpec, who: Operator) -> dict[str, Any]:
        """Start a rollout: a release to a group, in waves, judged by its abort rules (operator)."""
        params = body.model_dump(mode="json", exclude_none=True)
        with self._audited(who, AuditAction.ROLLOUT_START, params) as done:
            started = self._scheduler().start(body, who.name)
            done["rollout"] = started["id"]
        return started

    def _rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout: waves, abort rules with canary and control figures, devices (viewer)."""
        try:
            return self._scheduler().status(rollout_id)
        except UserInputError as e:
            raise refusal(e) from None

    def _steer(self, action: str) -> Callable[[str, Principal], dict[str, Any]]:
        def steer(rollout_id: str, who: Operator) -> dict[str, Any]:
            rollouts = self._scheduler()
            act = {
                "pause": rollouts.pause,
                "resume": rollouts.resume,
                "abort": rollouts.abort,
                "rollback": rollouts.rollback,
            }[action]
            with self._audited(who, AuditAction(f"rollout.{action}"), {"rollout": rollout_id}):
                answer = act(rollout_id)
            return answer

        steer.__doc__ = f"{action.capitalize()} a rollout (operator; a body, if any, is read and ignored)."
        return steer

    @contextlib.contextmanager
    def _audited(
        self, who: Principal, action: AuditAction, params: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        """Run an action: refused as a 4xx by the error's type, and recorded in the audit log
        with who asked, the parameters (the block may add to them) and how it ended."""
        outcome = "ok"
        try:
            yield params
        except UserInputError as e:
            outcome = audit_refused(str(e))
            raise refusal(e) from None
        except HttpError as e:
            outcome = audit_refused(str(e))
            raise
        except Exception as e:
            outcome = audit_failed(type(e).__name__)
            raise
        finally:
            logger.info("%s (%s) %s %s: %s", who.name, who.via, action.value, params, outcome)
            if self.audit is not None:
                self.audit.record(who.name, who.role, who.via, action, params=params, outcome=outcome)

    # -- serving ------------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving in a background thread; returns the port (port 0: a free one)."""
        self._server = ServerThread(self.app, self.limits, host, port)
        return self._server.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
