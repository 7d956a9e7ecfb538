"""Mosquitto configuration from the registry: no anonymous access, a password per device, an
ACL that confines every device to its own topics, client ids bound to usernames, and a TLS
listener with a generated CA.

Binding the client id to the username (``use_username_as_clientid``) is what stops one login
from taking over another's connection: MQTT lets a new connection with a client id already
connected replace the old one, and a clean session with it discards the old persistent session
and everything queued for it. With the binding, each login's connection and session are its
own. ACL patterns (``%c``, ``%u``) cannot do this: they guard topics, and the takeover happens
at CONNECT, before any topic is touched. On EMQX the same binding is ``mqtt.use_username_as_clientid
= true``; its ACL placeholders are ``${username}`` and ``${clientid}``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgec.errors import UserInputError
from edgec.topics import PREFIX, device_topics, fetch_request, fetch_response
from ota_server.logins import SERVER_USER, is_server_login, server_logins
from ota_server.registry import Device, Registry, hash_password

__all__ = ["SERVER_USER", "BrokerFiles", "replica_logins", "write_broker_config", "write_tls"]


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    server_password: str
    ca_cert: Path


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def _acl(devices: list[Device], servers: list[str]) -> str:
    lines = []
    for login in servers:  # shared subscriptions ($share/GROUP/edgec/...) are checked as edgec/...
        lines += [f"user {login}", f"topic readwrite {PREFIX}/#", ""]
    for device in devices:
        topics = device_topics(device.fleet, device.id)
        lines += [
            f"user {device.id}",
            f"topic read {topics['desired']}",
            f"topic write {topics['state']}",
            f"topic write {topics['telemetry']}",
            f"topic write {topics['events']}",
            f"topic write {fetch_request(device.fleet, device.id)}",
            f"topic read {fetch_response(device.fleet, device.id)}",
            "",
        ]
    return "\n".join(lines)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def write_tls(folder: Path, hosts: list[str]) -> Path:
    """A CA and a server certificate for ``hosts`` (names or IP addresses), both ECDSA P-256."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("edgec fleet CA"))
        .issuer_name(_name("edgec fleet CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(folder / "ca.crt", ca.public_bytes(pem).decode())
    _write(folder / "server.crt", cert.public_bytes(pem).decode())
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(folder / "server.key", private.decode(), 0o600)
    ca_private = ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(folder / "ca.key", ca_private.decode(), 0o600)
    return folder / "ca.crt"


def replica_logins(devices: list[Device], server_replicas: int) -> list[str]:
    """The broker logins of ``server_replicas`` server replicas; ``UserInputError`` when a device
    holds one of them as its id (its login, client id and session would be a server's)."""
    taken = [d.id for d in devices if is_server_login(d.id)]
    if taken:
        raise UserInputError(
            f"device id {taken[0]!r} is a server replica's login; re-add that device under another id"
        )
    try:
        return server_logins(server_replicas)
    except ValueError as e:
        raise UserInputError(str(e)) from None


def write_broker_config(
    registry: Registry,
    folder: Path,
    *,
    port: int = 1883,
    tls_port: int = 8883,
    bind: str = "127.0.0.1",
    hosts: list[str] | None = None,
    run_as: str = "mosquitto",
    server_replicas: int = 1,
) -> BrokerFiles:
    """Write ``mosquitto.conf``, ``passwords``, ``acl`` and TLS files into ``folder``.

    The secrets are 0600: Mosquitto started as root drops to ``run_as``, which must own them
    (``chown -R mosquitto DIR``), or ``run_as`` is the user that runs it. ``server_replicas``
    server processes get a login each (``ota_server.logins``), sharing one secret.
    """
    devices = registry.devices()
    servers = replica_logins(devices, server_replicas)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    server_password = secrets.token_urlsafe(24)
    passwords = [f"{login}:{hash_password(server_password)}" for login in servers]
    passwords += [f"{d.id}:{registry.password_hash(d.id)}" for d in devices]
    _write(folder / "passwords", "\n".join(passwords) + "\n", 0o600)
    _write(folder / "server.secret", server_password + "\n", 0o600)
    _write(folder / "acl", _acl(devices, servers), 0o600)
    ca = write_tls(folder, hosts or [bind, "localhost"])
    config = "\n".join(
        [
            "# written by edgec broker config: regenerate after adding devices",
            f"user {run_as}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {folder / 'passwords'}",
            f"acl_file {folder / 'acl'}",
            "persistence true",
            f"persistence_location {folder / 'data'}/",
            "max_packet_size 1048576",
            "set_tcp_nodelay true",  # chunked fetches are request/response: no 40 ms delayed-ACK stalls
            # the server's one session takes every device's reports: Mosquitto's default queue
            # of 1,000 messages per client drops reports when a thousand devices answer a wave
            "max_queued_messages 200000",
            # a server acknowledges a report once it is in the registry (batched): the default
            # of 20 unacknowledged messages in flight per client would throttle it
            "max_inflight_messages 1000",
            # a connection's client id is its username: no login takes over another's
            # connection or persistent session (the server's is "edgec-server")
            f"listener {port} {bind}",
            "use_username_as_clientid true",
            f"listener {tls_port} {bind}",
            "use_username_as_clientid true",
            f"cafile {ca}",
            f"certfile {folder / 'server.crt'}",
            f"keyfile {folder / 'server.key'}",
            "",
        ]
    )
    _write(folder / "mosquitto.conf", config)
    return BrokerFiles(config=folder / "mosquitto.conf", server_password=server_password, ca_cert=ca)
