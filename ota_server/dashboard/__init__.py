"""The operator's web dashboard, served by the operator API's app under ``/ui``.

Server-rendered pages (Jinja2 templates in ``templates/``) of the fleet, releases, rollouts
with their waves, abort rules and cohort figures, and devices; plots of the telemetry
history per release and per device (``series.py``, drawn by the vendored uPlot); live
updates by polling; sign-in with the API's tokens or JWTs into a cookie session
(``sessions.py``), and an operator's rollout actions (``pages.py``).
"""

from ota_server.dashboard.pages import Dashboard
from ota_server.dashboard.sessions import SessionStore

__all__ = ["Dashboard", "SessionStore"]
