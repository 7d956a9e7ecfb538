"""Signing keys on disk: Ed25519, the private half sealed under a passphrase, mode 0600.

A key file is one small JSON document::

    {"edgec_key": 1, "keytype": "ed25519", "public": "<hex>",
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<base64>"},
     "aead": {"name": "aes-256-gcm", "nonce": "<base64>"},
     "ciphertext": "<base64 of the raw 32-byte private key and the GCM tag>"}

scrypt is memory-hard: with the default cost (n=2**17, r=8, p=1) every passphrase guess needs
128 MiB and 0.3-0.7 s of one core (about 1.5 guesses/s per core), where the PKCS#8 files edgec
wrote before (PBKDF2-HMAC-SHA256, 2,048 iterations) allowed about 2,500
(``bench/bench_kdf.py``, ``bench/results/kdf.md``). Everything but the ciphertext is the
AEAD's associated data, so the public key and the KDF parameters cannot be swapped without
the file failing to open.
The public half is readable without the passphrase (``read_public``).

Old PKCS#8 PEM files still open (``load_signer``), so a repository of the old layout can be
moved to the new one (``ImageRepository.migrate``).

The passphrase comes from the caller (the CLI reads ``EDGEC_KEY_PASSPHRASE``, a file, or a
prompt); the library never asks for it itself.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from securesystemslib.signer import CryptoSigner, SSlibKey

from edgec._atomic import atomic_write
from edgec.errors import UserInputError

__all__ = [
    "DEFAULT_KDF",
    "KEY_SUFFIX",
    "TEST_KDF",
    "TEST_KDF_ENV",
    "ScryptCost",
    "SigningKeyError",
    "default_offline_folder",
    "generate",
    "kdf_for_new_keys",
    "load_private",
    "load_signer",
    "read_kdf",
    "read_public",
    "seal",
    "write_sealed",
]

logger = logging.getLogger(__name__)

KEY_SUFFIX = ".key"
FORMAT_VERSION = 1
MAX_KEY_FILE_BYTES = 64 * 1024
# For the test-suite only: keys made while this is set use TEST_KDF, which a laptop breaks in
# minutes. Never set it where real keys are made.
TEST_KDF_ENV = "EDGEC_TEST_WEAK_KDF"


class SigningKeyError(UserInputError):
    """A key file is missing, unreadable, or the passphrase does not open it."""


@dataclass(frozen=True)
class ScryptCost:
    """scrypt's cost parameters; a guess needs ``128 * n * r`` bytes of memory."""

    n: int
    r: int
    p: int

    @property
    def memory_bytes(self) -> int:
        return 128 * self.n * self.r

    def check(self) -> None:
        """Bounds on what a key file may ask for (a hostile file must not take the machine)."""
        if self.n < 2 or self.n & (self.n - 1) or self.n > 2**22:
            raise SigningKeyError(f"scrypt n={self.n} is not a power of two between 2 and 2**22")
        if not (1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise SigningKeyError(f"scrypt r={self.r}, p={self.p} outside 1..32 and 1..16")


# The cost the threat model states: 128 MiB and 0.3-0.7 s of one core per guess.
DEFAULT_KDF = ScryptCost(n=2**17, r=8, p=1)
TEST_KDF = ScryptCost(n=2**10, r=8, p=1)


def kdf_for_new_keys() -> ScryptCost:
    """``DEFAULT_KDF``, or ``TEST_KDF`` when the test-suite set ``EDGEC_TEST_WEAK_KDF``."""
    return TEST_KDF if os.environ.get(TEST_KDF_ENV) else DEFAULT_KDF


def default_offline_folder() -> Path:
    """Where ``edgec keys init`` puts the offline keys unless told: the user's config dir."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edgec" / "keys"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a string")
    return base64.b64decode(text, validate=True)


def _associated(document: dict[str, Any]) -> bytes:
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _derive(passphrase: bytes, salt: bytes, cost: ScryptCost) -> bytes:
    return Scrypt(salt=salt, length=32, n=cost.n, r=cost.r, p=cost.p).derive(passphrase)


def seal(private: Ed25519PrivateKey, passphrase: bytes, cost: ScryptCost) -> bytes:
    """The key file's bytes for ``private``."""
    if not passphrase:
        raise SigningKeyError("an empty passphrase would leave the private key unprotected; set one")
    cost.check()
    salt, nonce = os.urandom(16), os.urandom(12)
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    document: dict[str, Any] = {
        "edgec_key": FORMAT_VERSION,
        "keytype": "ed25519",
        "public": public.hex(),
        "kdf": {"name": "scrypt", "n": cost.n, "r": cost.r, "p": cost.p, "salt": _b64(salt)},
        "aead": {"name": "aes-256-gcm", "nonce": _b64(nonce)},
    }
    sealed = AESGCM(_derive(passphrase, salt, cost)).encrypt(nonce, raw, _associated(document))
    document["ciphertext"] = _b64(sealed)
    return (json.dumps(document, indent=2) + "\n").encode()


def write_sealed(
    path: Path, private: Ed25519PrivateKey, passphrase: bytes, cost: ScryptCost | None = None
) -> None:
    """``private`` sealed into ``path`` (mode 0600, written atomically); ``cost`` defaults
    to ``kdf_for_new_keys()``."""
    data = seal(private, passphrase, cost or kdf_for_new_keys())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o600)


def generate(path: Path, passphrase: bytes, cost: ScryptCost | None = None) -> CryptoSigner:
    """A new Ed25519 key, its private half sealed into ``path`` (see ``write_sealed``)."""
    private = Ed25519PrivateKey.generate()
    write_sealed(path, private, passphrase, cost)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise SigningKeyError(f"cannot read key {path}: {e.strerror}") from e
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"{path} is over {MAX_KEY_FILE_BYTES} bytes: not an edgec key")
    return data


def _document(path: Path, data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("edgec_key") != FORMAT_VERSION:
            raise ValueError("not an edgec key document")
        if document.get("keytype") != "ed25519" or document["kdf"].get("name") != "scrypt":
            raise ValueError("not an ed25519 key sealed with scrypt")
        if document["aead"].get("name") != "aes-256-gcm":
            raise ValueError("not sealed with aes-256-gcm")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise SigningKeyError(f"{path} is not an edgec key file ({e})") from e
    return document


def _cost(path: Path, document: dict[str, Any]) -> ScryptCost:
    kdf = document["kdf"]
    if not all(isinstance(kdf.get(k), int) for k in ("n", "r", "p")):
        raise SigningKeyError(f"{path}: the scrypt parameters are not integers")
    cost = ScryptCost(kdf["n"], kdf["r"], kdf["p"])
    cost.check()
    return cost


def read_kdf(path: Path) -> ScryptCost:
    """The KDF cost recorded in a key file (no passphrase needed)."""
    return _cost(path, _document(path, _read(path)))


def read_public(path: Path) -> SSlibKey:
    """The public half of a key file (no passphrase needed)."""
    document = _document(path, _read(path))
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(document["public"]))
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path}: the public key is malformed") from e
    return SSlibKey.from_crypto(public)


def _open_sealed(path: Path, data: bytes, passphrase: bytes) -> Ed25519PrivateKey:
    document = _document(path, data)
    cost = _cost(path, document)
    try:
        salt = _unb64(document["kdf"].get("salt"), "salt")
        nonce = _unb64(document["aead"].get("nonce"), "nonce")
        sealed = _unb64(document.get("ciphertext"), "ciphertext")
        public = bytes.fromhex(document["public"])
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path} is not an edgec key file ({e})") from e
    if cost.memory_bytes < DEFAULT_KDF.memory_bytes and not os.environ.get(TEST_KDF_ENV):
        logger.warning("%s was sealed with a weak KDF (scrypt n=%d): re-key it", path, cost.n)
    try:
        raw = AESGCM(_derive(passphrase, salt, cost)).decrypt(nonce, sealed, _associated(document))
        private = Ed25519PrivateKey.from_private_bytes(raw)
    except (InvalidTag, ValueError) as e:
        raise SigningKeyError(f"cannot open key {path}: wrong passphrase or a damaged file") from e
    mine = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if mine != public:
        raise SigningKeyError(f"key {path}: the private key does not match its public key")
    return private


def _open_pkcs8(path: Path, data: bytes, passphrase: bytes) -> Ed25519PrivateKey:
    """An old-layout PEM file (PBKDF2); read only to move it to the sealed format."""
    try:
        private = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"cannot open key {path}: wrong passphrase or not an edgec key") from e
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"key {path} is not an Ed25519 key")
    return private


def load_private(path: Path, passphrase: bytes) -> Ed25519PrivateKey:
    """The private key in a key file (sealed, or an old PKCS#8 PEM); ``SigningKeyError`` if
    the passphrase does not open it."""
    data = _read(path)
    if data.lstrip().startswith(b"-----BEGIN"):
        return _open_pkcs8(path, data, passphrase)
    return _open_sealed(path, data, passphrase)


def load_signer(path: Path, passphrase: bytes) -> CryptoSigner:
    private = load_private(path, passphrase)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
