"""The rollout spec is the wire contract's: an operator's laptop parses ``--bake 10m`` and checks
a spec without the server's packages or a database driver."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from edgec.errors import EXIT_BAD_INPUT, EXIT_SERVER, OptionError
from edgec.rollout_spec import RolloutSpec, parse_duration

SERVER_SIDE = ("ota_server", "sqlalchemy", "psycopg", "numpy")


def _run_cli(*args: str) -> tuple[int, set[str], str]:
    """Run ``edgec`` in a fresh interpreter; its exit code, the modules it loaded, its stderr."""
    probe = (
        "import contextlib, io, sys\nfrom cli import main\n"
        "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        f"    code = main({list(args)!r})\n"
        "print(code)\nprint(' '.join(sorted(sys.modules)))\nprint(err.getvalue(), end='')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    code, modules, stderr = out.stdout.split("\n", 2)
    return int(code), set(modules.split()), stderr


def test_rollout_start_loads_neither_the_server_nor_a_database():
    code, modules, stderr = _run_cli(
        "rollout", "start", "digits:2.0.0", "--group", "field", "--bake", "10m",
        "--device-timeout", "1h", "--server", "http://127.0.0.1:9", "--token", "t",
    )  # fmt: skip
    assert (code, "cannot reach the OTA server" in stderr) == (EXIT_SERVER, True), stderr  # it got as far
    assert "edgec.rollout_spec" in modules  # the durations were parsed
    assert not {m.split(".")[0] for m in modules} & set(SERVER_SIDE), sorted(modules)


def test_rollout_start_with_a_bad_duration_fails_before_any_request():
    code, _, stderr = _run_cli(
        "rollout", "start", "digits:2.0.0", "--group", "field", "--bake", "1.2.3m",
        "--server", "http://127.0.0.1:9", "--token", "t",
    )  # fmt: skip
    assert code == EXIT_BAD_INPUT, stderr
    assert "bad duration '1.2.3m'" in stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("30s", 30.0), (" 10m ", 600.0), ("1.5h", 5400.0)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10d", "-5m", "", "1.2.3", "."])
def test_bad_durations_are_option_errors(text):
    with pytest.raises(OptionError, match="bad duration"):
        parse_duration(text)


def test_a_typo_in_a_spec_fails():
    with pytest.raises(ValidationError, match="bake_secs"):
        RolloutSpec.model_validate({"release": "digits:2.0.0", "group": "g", "bake_secs": 60})
    with pytest.raises(ValidationError, match="bad abort rule"):
        RolloutSpec.model_validate({"release": "digits:2.0.0", "group": "g", "abort_if": ["p95>2"]})
