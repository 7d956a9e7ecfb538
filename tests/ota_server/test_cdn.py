"""``ota_server.cdn``: the nginx config that serves the image repository as a CDN's origin.

The config is checked by a real nginx: it serves exactly what ``ota_server.served`` allows
(the server's allowlist) and refuses the rest, answers Range requests, and sets the cache
headers a CDN follows. Inputs that would make a bad config are refused before any text."""

from __future__ import annotations

import hashlib
import http.client
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from edgec.errors import OptionError
from ota_server.cdn import nginx_config, nginx_server
from ota_server.served import served_file
from tests._nginx import NGINX, needs_nginx, running_nginx
from tests.conftest import run_edgec

BLOB = bytes(range(256)) * 400  # 102,400 bytes
SHA = hashlib.sha256(BLOB).hexdigest()
TARGET = f"targets/digits/1.0.0/x86-64-cpu/{SHA}.model.onnx"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository folder as ``ImageRepository`` lays it out, with what lies beside and in it
    that must never be served."""
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    for name in ("1.root.json", "2.root.json", "3.snapshot.json", "3.targets.json", "timestamp.json"):
        (repo / "metadata" / name).write_text(f'{{"signed": "{name}"}}')
    (repo / "metadata" / "root.json").write_text("{}")  # a name the client never asks for
    (repo / "metadata" / ".1.root.json.tmp").write_text("{}")  # an atomic write's temp file
    blob = repo / TARGET
    blob.parent.mkdir(parents=True)
    blob.write_bytes(BLOB)
    (blob.parent / ".hidden").write_text("x")
    (repo / "targets" / ".git").mkdir()
    (repo / "targets" / ".git" / "config").write_text("x")
    (repo / "director.pub.json").write_text("{}")
    (repo / "targets" / "outside").symlink_to(repo / "director.pub.json")
    (repo / "targets" / "inside").symlink_to(blob)
    online = tmp_path / "repo-online-keys"
    online.mkdir()
    (online / "snapshot-1.key").write_text("secret")
    return repo


def _get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None):
    """``method path`` sent as written (no client-side normalization of ``..`` or ``%2e``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"x" if method in ("POST", "PUT") else None, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


SERVED = [
    "metadata/1.root.json",
    "metadata/2.root.json",
    "metadata/3.snapshot.json",
    "metadata/3.targets.json",
    "metadata/timestamp.json",
    TARGET,
]
REFUSED = [
    "",
    "metadata/",
    "metadata/root.json",
    "metadata/.1.root.json.tmp",
    "metadata/4.root.json",
    "targets/",
    "targets/digits/1.0.0/x86-64-cpu/",
    "targets/digits/1.0.0/x86-64-cpu",
    "targets/digits/1.0.0/x86-64-cpu/.hidden",
    "targets/.git/config",
    "director.pub.json",
    "../repo-online-keys/snapshot-1.key",
    "%2e%2e/repo-online-keys/snapshot-1.key",
    "targets/../../repo-online-keys/snapshot-1.key",
    "metadata/..%2f..%2frepo-online-keys/snapshot-1.key",
    "targets/%2e%2e/director.pub.json",
    "targets/digits%00/x",
    "targets/digits/%01",
]


@needs_nginx
def test_nginx_serves_exactly_what_the_servers_allowlist_serves(repo, tmp_path):
    with running_nginx(repo, tmp_path / "nginx") as nginx:
        for relative in SERVED:
            assert served_file(repo, relative) is not None  # the server serves it: so must nginx
            status, _headers, body = _get(nginx.port, "/v1/repo/" + relative)
            assert status == 200, relative
            assert body == (repo / relative).read_bytes()
        for relative in REFUSED:
            assert served_file(repo, unquote(relative)) is None, relative
            status, _, body = _get(nginx.port, "/v1/repo/" + relative)
            assert status in (400, 404), (relative, status)
            assert b"secret" not in body
        for outside in ("/repo-online-keys/snapshot-1.key", "/director.pub.json", "/", "/v1/", "/nginx.conf"):
            assert _get(nginx.port, outside)[0] == 404, outside


@needs_nginx
def test_symlinks_in_the_served_folders_are_not_followed(repo, tmp_path):
    assert served_file(repo, "targets/outside") is None
    with running_nginx(repo, tmp_path / "nginx") as nginx:
        assert _get(nginx.port, "/v1/repo/targets/outside")[0] == 404
        # stricter than the server, which follows a link that stays in targets/: a CDN origin
        # has no links (publish copies), so none is followed
        assert _get(nginx.port, "/v1/repo/targets/inside")[0] == 404


@needs_nginx
def test_a_range_request_gets_206_with_exactly_those_bytes(repo, tmp_path):
    with running_nginx(repo, tmp_path / "nginx") as nginx:
        status, headers, body = _get(nginx.port, "/v1/repo/" + TARGET, headers={"Range": "bytes=1000-1999"})
        assert status == 206
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(BLOB)}"
        assert body == BLOB[1000:2000]
        status, headers, body = _get(nginx.port, "/v1/repo/" + TARGET, headers={"Range": "bytes=102000-"})
        assert (status, body) == (206, BLOB[102000:])
        status, _, _ = _get(nginx.port, "/v1/repo/" + TARGET, headers={"Range": f"bytes={len(BLOB)}-"})
        assert status == 416


@needs_nginx
def test_cache_headers_targets_immutable_timestamp_revalidated_errors_not_stored(repo, tmp_path):
    with running_nginx(repo, tmp_path / "nginx") as nginx:
        assert "immutable" in _get(nginx.port, "/v1/repo/" + TARGET)[1]["Cache-Control"]
        assert _get(nginx.port, "/v1/repo/metadata/timestamp.json")[1]["Cache-Control"] == "no-cache"
        versioned = _get(nginx.port, "/v1/repo/metadata/1.root.json")[1]["Cache-Control"]
        assert versioned.startswith("public, max-age=")
        assert int(versioned.rsplit("=", 1)[1]) <= 300
        status, headers, _ = _get(nginx.port, "/v1/repo/metadata/4.root.json")  # a future root
        assert (status, headers.get("Cache-Control")) == (404, "no-store")


@needs_nginx
def test_only_get_and_head_are_answered(repo, tmp_path):
    with running_nginx(repo, tmp_path / "nginx") as nginx:
        assert _get(nginx.port, "/v1/repo/metadata/1.root.json", "HEAD")[0] == 200
        for method in ("POST", "PUT", "DELETE"):
            assert _get(nginx.port, "/v1/repo/metadata/1.root.json", method)[0] == 404, method
        assert (repo / "metadata" / "1.root.json").read_text() == '{"signed": "1.root.json"}'


@pytest.mark.parametrize("port", [0, 65536, -1, True])
def test_a_port_outside_1_to_65535_is_refused(repo, port):
    with pytest.raises(OptionError, match="port"):
        nginx_server(repo, port=port)


@pytest.mark.parametrize(
    "prefix", ["v1/repo/", "/v1/repo", "/v1/../", "/.git/", "/v1/./", "/a b/", "/$uri/", '/"/', "/x;/", "//"]
)
def test_a_prefix_that_is_not_plain_segments_is_refused(repo, prefix):
    with pytest.raises(OptionError, match="prefix"):
        nginx_server(repo, port=8080, prefix=prefix)


@pytest.mark.parametrize("listen", ["localhost", "1.2.3.4:80", "", "127.0.0.1; include /etc/passwd"])
def test_a_listen_address_that_is_not_an_ip_is_refused(repo, listen):
    with pytest.raises(OptionError, match="listen"):
        nginx_server(repo, port=8080, listen=listen)


@pytest.mark.parametrize("name", ["re$po", 're"po', "re;po", "re{po"])
def test_a_folder_name_nginx_would_read_as_syntax_is_refused(tmp_path, name):
    repo = tmp_path / name
    (repo / "metadata").mkdir(parents=True)
    (repo / "targets").mkdir()
    with pytest.raises(OptionError, match="character"):
        nginx_server(repo, port=8080)


def test_a_folder_that_is_not_a_repository_is_refused(tmp_path):
    with pytest.raises(OptionError, match="not an edgec repository"):
        nginx_server(tmp_path, port=8080)


def test_the_run_folder_may_not_lie_inside_the_repository(repo):
    with pytest.raises(OptionError, match="inside the repository"):
        nginx_config(repo, port=8080, run_dir=repo / "targets" / "nginx")


def test_an_ipv6_listen_address_is_bracketed(repo):
    assert "listen [::1]:8443;" in nginx_server(repo, port=8443, listen="::1")


@needs_nginx
def test_the_cli_config_passes_nginx_t(repo, tmp_path):
    out = tmp_path / "edgec-nginx.conf"
    run_dir = tmp_path / "run"
    result = run_edgec(
        "repo", "cdn-config", "--repo", repo, "--port", "18443", "--run-dir", run_dir, "--out", out
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert run_dir.is_dir()
    checked = subprocess.run(
        [str(NGINX), "-t", "-c", str(out), "-p", str(run_dir), "-e", str(run_dir / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    block = run_edgec(
        "repo", "cdn-config", "--repo", repo, "--port", "80", "--server-block", "--prefix", "/o/"
    )
    assert block.returncode == 0, block.stderr
    assert block.stdout.startswith("server {")
    assert 'location ~ "^/o/targets/' in block.stdout
    refused = run_edgec("repo", "cdn-config", "--repo", repo, "--port", "80", "--server-block", "--user", "x")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert "--server-block" in refused.stderr
