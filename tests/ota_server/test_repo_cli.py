"""``edgec keys init``, ``publish`` and ``repo ls|refresh`` as an operator runs them."""

from __future__ import annotations

import json
import os

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
    repo = tmp_path / "repo"
    assert run_edgec("keys", "init", "--repo", repo, "--threshold", "root=2").returncode == 0
    assert len(list((repo / "keys").glob("root-*.pem"))) == 2
    published = run_edgec("publish", *bundles, "--repo", repo)
    assert published.returncode == 0, published.stderr
    listed = run_edgec("repo", "ls", "--repo", repo, "--json")
    assert listed.returncode == 0
    releases = {(r["name"], r["version"], r["profile"]) for r in listed.json()}
    assert releases == {("digits", "1.0.0", "x86-64-cpu"), ("digits", "1.0.0", "jetson-orin-nano")}
    before = json.loads((repo / "metadata" / "timestamp.json").read_text())["signed"]["version"]
    assert run_edgec("repo", "refresh", "--repo", repo).returncode == 0
    after = json.loads((repo / "metadata" / "timestamp.json").read_text())["signed"]["version"]
    assert after == before + 1
    rotated = run_edgec("keys", "rotate", "root", "--repo", repo)
    assert rotated.returncode == 0, rotated.stderr
    assert (repo / "metadata" / "2.root.json").is_file()
    assert len(list((repo / "keys" / "retired").rglob("root-*.pem"))) == 2


def test_refusals_exit_2_and_change_nothing(tmp_path, bundles, passphrase, monkeypatch):
    repo = tmp_path / "repo"
    assert run_edgec("keys", "init", "--repo", repo).returncode == 0
    snapshot = sorted(os.listdir(repo / "metadata"))
    again = run_edgec("keys", "init", "--repo", repo)
    assert again.returncode == 2
    assert "already holds a repository" in again.stderr
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", "wrong")
    wrong = run_edgec("publish", bundles[0], "--repo", repo)
    assert wrong.returncode == 2
    assert "wrong passphrase" in wrong.stderr
    monkeypatch.delenv("EDGEC_KEY_PASSPHRASE")
    missing = run_edgec("repo", "refresh", "--repo", repo)
    assert missing.returncode == 2
    assert "EDGEC_KEY_PASSPHRASE" in missing.stderr
    assert sorted(os.listdir(repo / "metadata")) == snapshot
    bad = run_edgec("keys", "init", "--repo", tmp_path / "other", "--threshold", "admin=2")
    assert bad.returncode == 2


def test_a_damaged_bundle_is_not_published(tmp_path, bundles, passphrase):
    import shutil

    repo = tmp_path / "repo"
    assert run_edgec("keys", "init", "--repo", repo).returncode == 0
    copy = tmp_path / "bundle"
    shutil.copytree(bundles[0], copy)
    (copy / "model.onnx").write_bytes(b"not the model")
    result = run_edgec("publish", copy, "--repo", repo)
    assert result.returncode == 2
    assert "damaged" in result.stderr
    assert json.loads((repo / "metadata" / "1.targets.json").read_text())["signed"]["targets"] == {}
