"""Signing keys on disk: Ed25519, private keys encrypted with a passphrase, mode 0600.

The passphrase comes from the caller (the CLI reads ``EDGEC_KEY_PASSPHRASE``, a file, or a
prompt); the library never asks for it itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from edgec.errors import UserInputError

__all__ = ["SigningKeyError", "generate", "load_signer"]

logger = logging.getLogger(__name__)


class SigningKeyError(UserInputError):
    """A key file is missing, unreadable, or the passphrase does not open it."""


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def generate(path: Path, passphrase: bytes) -> CryptoSigner:
    """A new Ed25519 key, its private half written encrypted to ``path`` (mode 0600)."""
    if not passphrase:
        raise SigningKeyError("an empty passphrase would leave the private key unprotected; set one")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, pem)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def load_signer(path: Path, passphrase: bytes) -> CryptoSigner:
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read key {path}: {e.strerror}") from e
    try:
        private = serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"cannot open key {path}: wrong passphrase or not an edgec key") from e
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"key {path} is not an Ed25519 key")
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
