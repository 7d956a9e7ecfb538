"""The dashboard's routes: server-rendered pages, their live data, and an operator's actions.

Pages (``/ui/...``) are rendered on the server from the same registry, repository and
rollout store the API reads, so they show something without script; ``dashboard.js`` then
polls ``/ui/data/...`` every two seconds and redraws the tables, the wave progress and the
plots (uPlot, vendored). Everything behind ``/ui`` needs a session (``sessions.py``): a
viewer looks; an operator may also pause, resume, abort or roll back a rollout from its page
(``POST /ui/rollouts/{id}/{action}`` with the page's CSRF token) — the same store calls as
``POST /v1/rollouts/{id}/{action}``, refused the same way.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from edgec.errors import NotFoundError, UserInputError
from ota_server._asgi_app import refusal
from ota_server.audit import AuditAction, AuditLog
from ota_server.audit import refused as audit_refused
from ota_server.auth import Authenticator, AuthError, ForbiddenError, Principal, Role
from ota_server.dashboard.series import series
from ota_server.dashboard.sessions import COOKIE, CSRF_HEADER, Session, SessionStore
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts

__all__ = ["Dashboard"]

HERE = Path(__file__).parent
MAX_FORM_BYTES = 16 * 1024  # the sign-in form: a token or a JWT
DEFAULT_HISTORY_S = 15 * 60  # what the fleet and device plots show
ACTIONS = ("pause", "resume", "abort", "rollback")


class Dashboard:
    def __init__(
        self,
        authenticator: Authenticator,
        registry: Registry,
        repository: ImageRepository,
        rollouts: Rollouts | None,
        *,
        sessions: SessionStore | None = None,
        audit: AuditLog | None = None,
        secure_cookie: bool = False,
    ) -> None:
        self.authenticator = authenticator
        self.registry = registry
        self.repository = repository
        self.rollouts = rollouts
        self.sessions = sessions or SessionStore(registry)  # in the registry: every replica honours them
        self.audit = audit
        self.secure_cookie = secure_cookie  # set when the server is reached over HTTPS (a proxy)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True)
        )

    # -- mounting -------------------------------------------------------------------------------
    def mount(self, app: Any) -> None:
        """Add the dashboard's routes and its static files to a FastAPI ``app``."""
        app.include_router(self.router())
        app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    def router(self) -> APIRouter:
        r = APIRouter(include_in_schema=False)
        r.add_api_route("/ui", self._home, methods=["GET"])
        r.add_api_route("/ui/", self._home, methods=["GET"])
        r.add_api_route("/ui/login", self._login_page, methods=["GET"])
        r.add_api_route("/ui/login", self._login, methods=["POST"])
        r.add_api_route("/ui/logout", self._logout, methods=["POST"])
        r.add_api_route("/ui/fleet", self._fleet_page, methods=["GET"])
        r.add_api_route("/ui/devices/{device_id}", self._device_page, methods=["GET"])
        r.add_api_route("/ui/releases", self._releases_page, methods=["GET"])
        r.add_api_route("/ui/rollouts", self._rollouts_page, methods=["GET"])
        r.add_api_route("/ui/audit", self._audit_page, methods=["GET"])
        r.add_api_route("/ui/rollouts/{rollout_id}", self._rollout_page, methods=["GET"])
        r.add_api_route("/ui/rollouts/{rollout_id}/{action}", self._steer, methods=["POST"])
        r.add_api_route("/ui/data/fleet", self._fleet_data, methods=["GET"])
        r.add_api_route("/ui/data/rollouts/{rollout_id}", self._rollout_data, methods=["GET"])
        r.add_api_route("/ui/data/telemetry", self._telemetry_data, methods=["GET"])
        return r

    # -- sessions -------------------------------------------------------------------------------
    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def _page_or_login(self, request: Request) -> Session | RedirectResponse:
        session = self._session(request)
        if session is None:
            target = urllib.parse.quote(request.url.path, safe="/")
            return RedirectResponse(f"/ui/login?next={target}", status_code=303)
        return session

    def _data_session(self, request: Request) -> Session:
        session = self._session(request)
        if session is None:
            raise AuthError("not signed in (or the session expired): sign in at /ui/login")
        return session

    def _render(self, name: str, session: Session | None, status: int = 200, **values: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(
            session=session,
            operator=session is not None and session.principal.role >= Role.OPERATOR,
            **values,
        )
        headers = {
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        }
        return HTMLResponse(html, status_code=status, headers=headers)

    def _home(self, request: Request) -> Response:
        return RedirectResponse("/ui/fleet", status_code=303)

    def _login_page(self, request: Request, next: str = "/ui/fleet") -> Response:
        return self._render("login.html", None, next=_local(next), error=None)

    async def _login(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return self._render("login.html", None, 413, next="/ui/fleet", error="the form is too large")
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        token = (form.get("token") or [""])[0].strip()
        target = _local((form.get("next") or ["/ui/fleet"])[0])
        try:  # in a worker thread: a JWT check may fetch the issuer's keys
            principal = await run_in_threadpool(self.authenticator.principal, f"Bearer {token}", Role.VIEWER)
        except (AuthError, ForbiddenError) as e:
            return self._render("login.html", None, 401, next=target, error=str(e))
        sid, _ = self.sessions.create(principal, principal.expires_at)  # a JWT's session ends with it
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, sid, httponly=True, samesite="strict", secure=self.secure_cookie, path="/ui"
        )
        return response

    def _logout(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None and not session.csrf_ok(request.headers.get(CSRF_HEADER)):
            return JSONResponse({"error": "missing or wrong X-CSRF-Token"}, status_code=403)
        self.sessions.drop(request.cookies.get(COOKIE))
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # -- pages ----------------------------------------------------------------------------------
    def _fleet_page(self, request: Request) -> Response:
        session = self._page_or_login(request)
        if not isinstance(session, Session):
            return session
        return self._render("fleet.html", session, devices=self._devices(), rollouts=self._rollout_list())

    def _device_page(self, request: Request, device_id: str) -> Response:
        session = self._page_or_login(request)
        if not isinstance(session, Session):
            return session
        try:
            device = self.registry.get(device_id).as_dict()
        except NotFoundError:
            return self._render("missing.html", session, 404, what=f"device {device_id[:64]}")
        return self._render("device.html", session, device=device)

    def _releases_page(self, request: Request) -> Response:
        session = self._page_or_login(request)
        if not isinstance(session, Session):
            return session
        releases = [r.__dict__ for r in self.repository.releases()]
        return self._render("releases.html", session, releases=releases)

    def _rollouts_page(self, request: Request) -> Response:
        session = self._page_or_login(request)
        if not isinstance(session, Session):
            return session
        return self._render("rollouts.html", session, rollouts=self._rollout_list())

    def _rollout_page(self, request: Request, rollout_id: str) -> Response:
        session = self._page_or_login(request)
        if not isinstance(session, Session):
            return session
        try:
            status = self._rollout_status(rollout_id)
        except UserInputError:
            return self._render("missing.html", session, 404, what=f"rollout {rollout_id[:64]}")
        return self._render("rollout.html", session, rollout=status, actions=ACTIONS)

    def _audit_page(self, request: Request) -> Response:
        """The newest 200 entries of the audit log and whether its chain is intact."""
        session = self._page_or_login(request)
        if not isinstance(session, Session):
            return session
        if self.audit is None:
            return self._render("missing.html", session, 404, what="audit log on this server")
        entries = self.audit.entries(limit=200, newest=True)
        report = self.audit.verify()
        return self._render("audit.html", session, entries=list(reversed(entries)), report=report)

    # -- live data ------------------------------------------------------------------------------
    def _fleet_data(self, request: Request) -> Response:
        self._data_session(request)
        return JSONResponse({"devices": self._devices(), "rollouts": self._rollout_list()})

    def _rollout_data(self, request: Request, rollout_id: str) -> Response:
        self._data_session(request)
        try:
            return JSONResponse(self._rollout_status(rollout_id))
        except UserInputError as e:
            raise refusal(e) from None

    def _telemetry_data(
        self,
        request: Request,
        device: str | None = None,
        group: str | None = None,
        since_s: float = DEFAULT_HISTORY_S,
        bucket_s: float = 5.0,
    ) -> Response:
        """Plots' data: the telemetry of one device, of a group, or of the whole fleet, over the
        last ``since_s`` seconds (at most a day), per release."""
        self._data_session(request)
        since_s = min(max(since_s, 10.0), 86_400.0)
        bucket_s = min(max(bucket_s, 1.0), 3600.0)
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=since_s)).isoformat(timespec="seconds")
        devices = [d.id for d in self.registry.devices() if group is None or d.group == group]
        if device is not None:
            devices = [d for d in devices if d == device]
        windows = [w for ws in self.registry.windows(devices, since).values() for w in ws]
        return JSONResponse(series(windows, bucket_s, now=dt.datetime.now(dt.UTC).timestamp()))

    # -- actions --------------------------------------------------------------------------------
    def _steer(self, request: Request, rollout_id: str, action: str) -> Response:
        session = self._data_session(request)
        if action not in ACTIONS:
            raise refusal(NotFoundError(f"no action {action[:20]!r}: use one of {', '.join(ACTIONS)}"))
        if not session.csrf_ok(request.headers.get(CSRF_HEADER)):
            return JSONResponse({"error": "missing or wrong X-CSRF-Token: reload the page"}, status_code=403)
        if session.principal.role < Role.OPERATOR:
            raise ForbiddenError(f"a {session.principal.role.name.lower()} cannot {action} a rollout")
        rollouts = self._store()
        steer = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}
        params = {"rollout": rollout_id, "from": "dashboard"}
        who = session.principal
        try:
            status = rollouts.rollback(rollout_id) if action == "rollback" else steer[action](rollout_id)
        except UserInputError as e:
            self._record(who, action, params, audit_refused(str(e)))
            raise refusal(e) from None
        self._record(who, action, params, "ok")
        return JSONResponse(status)

    def _record(self, who: Principal, action: str, params: dict[str, Any], outcome: str) -> None:
        if self.audit is not None:
            self.audit.record(
                who.name, who.role, who.via, AuditAction(f"rollout.{action}"), params=params, outcome=outcome
            )

    # -- reading --------------------------------------------------------------------------------
    def _store(self) -> Rollouts:
        if self.rollouts is None:
            raise refusal(NotFoundError("this server does not run rollouts"))
        return self.rollouts

    def _devices(self) -> list[dict[str, Any]]:
        return [d.as_dict() for d in self.registry.devices()]

    def _rollout_list(self) -> list[dict[str, Any]]:
        return [] if self.rollouts is None else self.rollouts.list()

    def _rollout_status(self, rollout_id: str) -> dict[str, Any]:
        return self._store().status(rollout_id)


def _local(target: str) -> str:
    """Where to go after signing in: a dashboard page of this server, never another site."""
    parsed = urllib.parse.urlsplit(target)
    if parsed.scheme or parsed.netloc or not parsed.path.startswith("/ui/") or "\\" in target:
        return "/ui/fleet"
    return parsed.path
