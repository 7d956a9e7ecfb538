"""nginx for the tests: ``localfleet.nginx``, and a mark that skips a test without it."""

from __future__ import annotations

import pytest

from localfleet.nginx import NGINX, Nginx, Request, running_nginx

__all__ = ["NGINX", "Nginx", "Request", "needs_nginx", "running_nginx"]

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
