"""A shadow run started by hand on the agent's local API, for a field test: ``/v2/shadow``.

::

    POST   /v2/shadow   {"bundle": PATH, "duration_s": S | "requests": N, "sample": 0.1}   202
    GET    /v2/shadow   the current or last run: its figures and ``state`` (running, done)
    DELETE /v2/shadow   stop the current run; its figures

``POST`` checks that the two models fit in memory at once (``agent.memory.shadow_fits``, on
the peaks their manifests record; with ``memory`` settings), loads the bundle folder at
``PATH`` (``agent.runtime.load_bundle``, which checks every file against the manifest first)
with one intra-op thread, self-tests it on its ``golden.npz``, and attaches an
``agent.shadow.ShadowRun`` of it beside the model being served to the agent's ``ShadowTap``;
the answer names the run's ``id``. A relative ``PATH`` is taken
under the shadow root, an absolute one must lie under it (``edgec.names.resolve_inside``,
symlinks followed): nothing outside that folder is ever opened. The run's CPU budget, window
and queue are the agent's (``[install] shadow_*``); the request picks its length and sample.
When the run ends (its plan met, or stopped) it is detached and the candidate closed; its
figures stay for ``GET`` until the next run starts.

One run at a time, whoever started it: while a run is attached (this API's or a director
document's) or a ``POST`` is loading, another ``POST`` is a 409. A bad request is a 400, a
body over ``MAX_BODY_BYTES`` a 413, a bundle that does not load, does not fit in memory
beside the serving model, fails its self-test or cannot be judged against it a 422, no
model being served a 503; each with a one-line ``{"error": ...}``.

Like the rest of the local API, ``/v2/shadow`` asks for no token: the API listens on loopback
unless ``[http] host`` says otherwise, and it runs only bundles already on the device, under
the shadow root (``[http] shadow_root``, by default ``field-tests/`` in the state folder).
The requests are handled off the event loop (loading takes seconds), so serving goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent._http_messages import HttpError, Response, error_response
from agent._v2 import json_response
from agent.memory import MemorySettingsView, available_memory, shadow_fits
from agent.runtime import RuntimeModel, load_bundle, self_test
from agent.shadow import ShadowBusyError, ShadowPlan, ShadowRun, ShadowTap
from agent.slot import LoadedModel, ModelSlot
from edgec.errors import EdgecError, OptionError, PathOutsideRootError
from edgec.manifest import read_manifest
from edgec.names import resolve_inside

__all__ = ["MAX_BODY_BYTES", "ShadowControl"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 10  # a POST body: a path and three numbers
MAX_PATH_CHARS = 4096
MAX_DURATION_S = 30 * 86400.0  # a month: longer is a mistake
MAX_REQUESTS = 1_000_000_000
_FIELDS = ("bundle", "duration_s", "requests", "sample")


def _one_thread(folder: Path) -> RuntimeModel:
    """The candidate with one intra-op thread: its work stays on the run's worker, where its
    CPU budget counts it (``agent.shadow``)."""
    return load_bundle(folder, threads=1)


@dataclass
class _Started:
    """A run this API started, and the thread that ends it."""

    id: str
    bundle: Path
    run: ShadowRun
    stop: threading.Event = field(default_factory=threading.Event)
    ender: threading.Thread | None = None


class ShadowControl:
    """The ``/v2/shadow`` endpoint over ``tap``, beside the model ``slot`` serves.

    ``root``: the folder bundles must lie under. ``load``: the candidate's loader (None: the
    bundle's own runtime, one thread; it must check the files against the manifest).
    ``memory``: where the fit check reads the available memory and the headroom it keeps
    (``agent.config.InstallSettings``; None: no check).
    ``cpu_budget``, ``window_s``, ``queue``: the plan's, as ``agent.shadow.ShadowPlan``.
    """

    def __init__(
        self,
        tap: ShadowTap,
        slot: ModelSlot,
        root: Path,
        *,
        load: Callable[[Path], RuntimeModel] | None = None,
        memory: MemorySettingsView | None = None,
        cpu_budget: float = 0.5,
        window_s: float = 10.0,
        queue: int = 8,
    ) -> None:
        self.tap = tap
        self.slot = slot
        self.root = root
        self._load = load or _one_thread
        self._memory = memory
        # bad settings fail here, not on the first POST
        self._plan = ShadowPlan(duration_s=1.0, cpu_budget=cpu_budget, window_s=window_s, queue=queue)
        self._lock = threading.Lock()
        self._starting = False
        self._last: _Started | None = None

    # -- the endpoint ------------------------------------------------------------------------
    def request(self, method: str, body: bytes | bytearray) -> Response:
        """The answer to ``method /v2/shadow``; never raises."""
        try:
            if method == "POST":
                return self._start(body)
            if method == "DELETE":
                return self._stop()
            return self._show()
        except HttpError as e:
            return error_response(e.status, str(e))
        except Exception as e:  # a bug: answered, and logged
            logger.exception("the shadow endpoint failed on %s", method)
            return error_response(500, f"internal error: {type(e).__name__}")

    def close(self) -> None:
        """Stop the run this API started, if it is still running (the server is stopping)."""
        started = self._last
        if started is not None:
            self._end(started)

    # -- POST --------------------------------------------------------------------------------
    def _start(self, body: bytes | bytearray) -> Response:
        folder, plan = self._parse(body)
        with self._lock:
            if self._starting:
                raise HttpError(409, "another shadow run is being started: wait for it, then stop it first")
            if self.tap.run is not None:
                raise HttpError(409, f"a shadow run of {self.tap.run.release} is in progress: stop it first")
            self._starting = True
        try:
            started = self._attach(folder, plan)
        finally:
            with self._lock:
                self._starting = False
        logger.info("shadow run %s of %s beside %s started by hand", started.id, folder, started.run.serving)
        return json_response(
            202,
            {
                "id": started.id,
                "bundle": str(folder),
                "release": started.run.release,
                "serving": started.run.serving,
                "plan": {name: getattr(plan, name) for name in ("duration_s", "requests", "sample")},
            },
        )

    def _parse(self, body: bytes | bytearray) -> tuple[Path, ShadowPlan]:
        if len(body) > MAX_BODY_BYTES:
            raise HttpError(
                413, f"the body is {len(body)} bytes; a shadow request takes at most {MAX_BODY_BYTES}"
            )
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise HttpError(400, f"the body is not JSON: {str(e).splitlines()[0][:200]}") from None
        if not isinstance(document, dict):
            raise HttpError(400, 'the body must be a JSON object like {"bundle": PATH, "duration_s": 600}')
        unknown = sorted(str(k)[:64] for k in document if k not in _FIELDS)
        if unknown:
            raise HttpError(400, f"unknown field {unknown[0]!r}; the fields are {', '.join(_FIELDS)}")
        bundle = document.get("bundle")
        if not isinstance(bundle, str) or not bundle or len(bundle) > MAX_PATH_CHARS or "\0" in bundle:
            raise HttpError(
                400, f"bundle must be the path of a bundle folder (at most {MAX_PATH_CHARS} characters)"
            )
        duration_s = _number(document, "duration_s", MAX_DURATION_S)
        requests = _number(document, "requests", MAX_REQUESTS, whole=True)
        sample = _number(document, "sample", 1.0)
        try:
            plan = dataclasses.replace(
                self._plan,
                duration_s=duration_s,
                requests=None if requests is None else int(requests),
                sample=0.1 if sample is None else sample,
            )
        except OptionError as e:
            raise HttpError(400, str(e)) from None
        return self._folder(bundle), plan

    def _folder(self, bundle: str) -> Path:
        try:
            folder = resolve_inside(self.root, bundle)
        except PathOutsideRootError:
            raise HttpError(
                400,
                f"bundle {bundle[:200]!r} is not under the shadow root {self.root}: put field tests there",
            ) from None
        except (OSError, ValueError) as e:
            raise HttpError(400, f"bundle {bundle[:200]!r}: {e}") from None
        if not folder.is_dir():
            raise HttpError(400, f"bundle {bundle[:200]!r}: no such folder under {self.root}")
        return folder

    def _attach(self, folder: Path, plan: ShadowPlan) -> _Started:
        serving = self.slot.model
        if serving is None:
            raise HttpError(503, "no model is being served: a shadow run needs one to compare with")
        self._check_fit(folder, serving)
        try:
            candidate = self._load(folder)
        except EdgecError as e:
            raise HttpError(422, f"cannot load {folder}: {e}") from None
        try:
            result = self_test(candidate, folder / "golden.npz")
            if not result.passed:
                raise HttpError(422, f"{folder} failed its self-test: {result.reason}")
            try:
                run = ShadowRun(candidate, serving.manifest, plan)
                if run.isolated:
                    candidate.close()  # its child process holds it now: one copy in memory, not two
            except EdgecError as e:  # ShadowMismatchError
                raise HttpError(422, str(e)) from None
            try:
                self.tap.attach(run)
            except ShadowBusyError as e:
                run.close()
                raise HttpError(409, str(e)) from None
        except BaseException:
            candidate.close()
            raise
        started = _Started(uuid.uuid4().hex[:12], folder, run)
        started.ender = threading.Thread(
            target=self._ended, args=(started, candidate), name=f"shadow {started.id}", daemon=True
        )
        self._last = started
        started.ender.start()
        return started

    def _check_fit(self, folder: Path, serving: LoadedModel) -> None:
        """422 when the candidate would not fit in memory beside the serving model."""
        settings = self._memory
        if settings is None:
            return
        try:
            memory = read_manifest(folder).memory
        except EdgecError as e:
            raise HttpError(422, f"cannot load {folder}: {e}") from None
        serving_memory = serving.manifest.memory
        fits, reason = shadow_fits(
            memory.peak_bytes if memory else None,
            serving_memory.peak_bytes if serving_memory else None,
            available_memory(settings.meminfo_path, settings.cgroup_root),
            settings.memory_headroom_bytes,
        )
        if not fits:
            raise HttpError(422, f"{folder} cannot run in shadow here: {reason}")

    def _ended(self, started: _Started, candidate: LoadedModel) -> None:
        """Wait for the run to end (plan met or stopped), then detach it and close the candidate."""
        try:
            started.run.wait(started.stop)
        finally:
            self.tap.detach(started.run)
            started.run.close()
            candidate.close()

    # -- GET, DELETE --------------------------------------------------------------------------
    def _show(self) -> Response:
        started = self._last
        if started is None:
            raise HttpError(404, "no shadow run was started here: POST /v2/shadow starts one")
        return json_response(200, self._document(started))

    def _stop(self) -> Response:
        started = self._last
        if started is None:
            raise HttpError(404, "no shadow run was started here: nothing to stop")
        self._end(started)
        return json_response(200, self._document(started))

    @staticmethod
    def _end(started: _Started) -> None:
        started.stop.set()
        started.run.close()
        if started.ender is not None and started.ender is not threading.current_thread():
            started.ender.join(10.0)

    @staticmethod
    def _document(started: _Started) -> dict[str, Any]:
        figures = started.run.figures()
        state = "done" if figures.done else "running"
        return {"id": started.id, "bundle": str(started.bundle), "state": state, **figures.as_dict()}


def _number(document: dict[str, Any], name: str, most: float, whole: bool = False) -> float | None:
    """``document[name]``: absent (None), or a number in (0, ``most``]; 400 otherwise."""
    value = document.get(name)
    if value is None:
        return None
    kind = "a whole number" if whole else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
    ):
        raise HttpError(400, f"{name} must be {kind}, got {json.dumps(value)[:50]}")
    if not 0 < value <= most:
        raise HttpError(400, f"{name} must be {kind} in (0, {most:g}], got {value}")
    return float(value)
