"""``edgec keys init``, ``publish`` and ``repo ls|refresh`` as an operator runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import DIGITS, run_edgec


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--name",
        "digits",
        "--target",
        "x86-64-cpu",
        "--target",
        "jetson-orin-nano",
        "--format",
        "onnx",
        "--precision",
        "fp32",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    return sorted(out.iterdir())


@pytest.fixture
def passphrase(monkeypatch):
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", "correct horse")


def test_init_publish_list(tmp_path, bundles, passphrase):
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init = run_edgec("keys", "init", "--repo", repo, "--keys", keys, "--threshold", "root=2")
    assert init.returncode == 0, init.stderr
    assert len(list(keys.glob("root-*.key"))) == 2
    assert sorted(p.name for p in (tmp_path / "repo-online-keys").iterdir()) == [
        "director-1.key",
        "snapshot-1.key",
        "timestamp-1.key",
    ]
    published = run_edgec("publish", *bundles, "--repo", repo, "--keys", keys)
    assert published.returncode == 0, published.stderr
    listed = run_edgec("repo", "ls", "--repo", repo, "--json")
    assert listed.returncode == 0
    releases = {(r["name"], r["version"], r["profile"]) for r in listed.json()}
    assert releases == {("digits", "1.0.0", "x86-64-cpu"), ("digits", "1.0.0", "jetson-orin-nano")}
    before = json.loads((repo / "metadata" / "timestamp.json").read_text())["signed"]["version"]
    assert run_edgec("repo", "refresh", "--repo", repo).returncode == 0  # online keys only
    after = json.loads((repo / "metadata" / "timestamp.json").read_text())["signed"]["version"]
    assert after == before + 1
    rotated = run_edgec("keys", "rotate", "root", "--repo", repo, "--keys", keys)
    assert rotated.returncode == 0, rotated.stderr
    assert (repo / "metadata" / "2.root.json").is_file()
    assert len(list((keys / "retired").rglob("root-*.key"))) == 2


def test_keys_default_to_the_config_dir_and_a_second_repository_needs_its_own(tmp_path, passphrase):
    first = run_edgec("keys", "init", "--repo", tmp_path / "one")
    assert first.returncode == 0, first.stderr
    default = Path(os.environ["XDG_CONFIG_HOME"]) / "edgec" / "keys"
    assert sorted(p.name for p in default.iterdir()) == ["root-1.key", "targets-1.key"]
    second = run_edgec("keys", "init", "--repo", tmp_path / "two")
    assert second.returncode == 2
    assert "already holds keys" in second.stderr
    assert "--keys" in second.stderr
    assert not (tmp_path / "two" / "metadata").exists()
    own = run_edgec("keys", "init", "--repo", tmp_path / "two", "--keys", tmp_path / "two-keys")
    assert own.returncode == 0, own.stderr


def test_refusals_exit_2_and_change_nothing(tmp_path, bundles, passphrase, monkeypatch):
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert run_edgec("keys", "init", "--repo", repo, "--keys", keys).returncode == 0
    snapshot = sorted(os.listdir(repo / "metadata"))
    again = run_edgec("keys", "init", "--repo", repo, "--keys", tmp_path / "other-keys")
    assert again.returncode == 2
    assert "already holds a repository" in again.stderr
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", "wrong")
    wrong = run_edgec("publish", bundles[0], "--repo", repo, "--keys", keys)
    assert wrong.returncode == 2
    assert "wrong passphrase" in wrong.stderr
    monkeypatch.delenv("EDGEC_KEY_PASSPHRASE")
    missing = run_edgec("repo", "refresh", "--repo", repo)
    assert missing.returncode == 2
    assert "EDGEC_KEY_PASSPHRASE" in missing.stderr
    assert sorted(os.listdir(repo / "metadata")) == snapshot
    bad = run_edgec("keys", "init", "--repo", tmp_path / "other", "--threshold", "admin=2")
    assert bad.returncode == 2
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", "correct horse")
    inside = run_edgec("keys", "init", "--repo", tmp_path / "r3", "--keys", tmp_path / "r3" / "keys")
    assert inside.returncode == 2
    assert "overlap" in inside.stderr


def test_a_damaged_bundle_is_not_published(tmp_path, bundles, passphrase):
    import shutil

    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert run_edgec("keys", "init", "--repo", repo, "--keys", keys).returncode == 0
    copy = tmp_path / "bundle"
    shutil.copytree(bundles[0], copy)
    (copy / "model.onnx").write_bytes(b"not the model")
    result = run_edgec("publish", copy, "--repo", repo, "--keys", keys)
    assert result.returncode == 2
    assert "damaged" in result.stderr
    assert json.loads((repo / "metadata" / "1.targets.json").read_text())["signed"]["targets"] == {}
