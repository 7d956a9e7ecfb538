"""Fuzzing budget for the property-based tests in this folder.

``make test`` runs each fuzz test with a bounded number of generated inputs (the ``ci``
profile); ``make fuzz`` runs the ``fuzz`` profile, at least 10,000 inputs per target.
``EDGEC_FUZZ_EXAMPLES`` overrides the count. No deadline: the machine may be busy.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=_SUPPRESSED)
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=_SUPPRESSED)
settings.load_profile(os.environ.get("EDGEC_FUZZ_PROFILE", "ci"))
if os.environ.get("EDGEC_FUZZ_EXAMPLES"):
    settings.register_profile(
        "custom",
        parent=settings.get_profile(os.environ.get("EDGEC_FUZZ_PROFILE", "ci")),
        max_examples=int(os.environ["EDGEC_FUZZ_EXAMPLES"]),
    )
    settings.load_profile("custom")
