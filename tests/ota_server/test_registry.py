"""The fleet registry on SQLite and on a real PostgreSQL, through the same code."""

from __future__ import annotations

import pytest

from edgec.errors import UserInputError
from ota_server.registry import MIGRATIONS, DeviceExistsError, Registry, verify_password


def test_add_list_show_update(db_url):
    registry = Registry.open(db_url)
    device, password = registry.add_device("pi-01", "lab", "canary", "raspberry-pi-4")
    registry.add_device("pi-02", "lab", "main", "raspberry-pi-4")
    registry.add_device("jet-01", "yard", "main", "jetson-orin-nano")
    assert device.status == "new"
    assert [d.id for d in registry.devices(fleet="lab")] == ["pi-01", "pi-02"]
    assert [d.id for d in registry.devices(group="main")] == ["jet-01", "pi-02"]
    registry.update(
        "pi-01",
        last_seen="2026-11-29T05:00:00+00:00",
        installed_release="digits/1.0.0",
        status="serving",
        telemetry={"p95_ms": 3.1, "drift": "ok"},
    )
    shown = registry.get("pi-01")
    assert (shown.installed_release, shown.status) == ("digits/1.0.0", "serving")
    assert shown.telemetry == {"drift": "ok", "p95_ms": 3.1}
    stored = registry.password_hash("pi-01")
    assert password not in stored
    assert stored.startswith("$7$")
    assert verify_password(password, stored)
    assert not verify_password(password + "x", stored)


def test_duplicate_and_unknown_devices(db_url):
    registry = Registry.open(db_url)
    registry.add_device("pi-01", "lab", "canary", "raspberry-pi-4")
    with pytest.raises(DeviceExistsError):
        registry.add_device("pi-01", "lab", "main", "raspberry-pi-4")
    with pytest.raises(UserInputError, match="no device"):
        registry.get("pi-99")


def test_migrations_run_once_and_data_survives_a_reopen(db_url):
    first = Registry.open(db_url)
    assert first.schema_version() == len(MIGRATIONS)
    first.add_device("pi-01", "lab", "canary", "raspberry-pi-4")
    first.engine.dispose()
    again = Registry.open(db_url)  # a server restart: nothing re-applied, nothing lost
    assert again.schema_version() == len(MIGRATIONS)
    assert again.get("pi-01").group == "canary"
    again.engine.dispose()


def test_unreachable_database_is_a_clear_error():
    with pytest.raises(UserInputError, match="cannot open the fleet database"):
        Registry.open("postgresql+psycopg://nobody@127.0.0.1:9/nothing")


def test_cli_devices_add_and_fleet_ls(tmp_path, db_url):
    import json
    import tomllib

    from tests.conftest import run_edgec

    config = tmp_path / "pi-01.agent.toml"
    added = run_edgec(
        "devices",
        "add",
        "pi-01",
        "--profile",
        "raspberry-pi-4",
        "--group",
        "canary",
        "--fleet",
        "lab",
        "--broker",
        "10.0.0.2:8883",
        "--out",
        config,
        "--db",
        db_url,
    )
    assert added.returncode == 0, added.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    settings = tomllib.loads(config.read_text())
    assert (settings["device"], settings["profile"], settings["mqtt"]["port"]) == (
        "pi-01",
        "raspberry-pi-4",
        8883,
    )
    registry = Registry.open(db_url)
    assert verify_password(settings["mqtt"]["password"], registry.password_hash("pi-01"))
    registry.engine.dispose()
    listed = run_edgec("fleet", "ls", "--json", "--db", db_url)
    assert [d["id"] for d in json.loads(listed.stdout)] == ["pi-01"]
    table = run_edgec("fleet", "ls", "--db", db_url)
    assert "pi-01" in table.stdout
    assert "canary" in table.stdout
    again = run_edgec(
        "devices",
        "add",
        "pi-01",
        "--profile",
        "raspberry-pi-4",
        "--group",
        "canary",
        "--out",
        tmp_path / "other.toml",
        "--db",
        db_url,
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr
    unknown = run_edgec(
        "devices",
        "add",
        "pi-02",
        "--profile",
        "raspberry-pi-9",
        "--group",
        "g",
        "--out",
        tmp_path / "x.toml",
        "--db",
        db_url,
    )
    assert unknown.returncode == 2
    assert "known profiles" in unknown.stderr
    assert not (tmp_path / "x.toml").exists()
