"""Key files: K_PS rings, master keys, the AS's signing key, pinned public keys.

Secrets are written atomically with mode 0600 and refused when group or others
could read them: a key file with loose permissions is a key already leaked.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mpay.auth.crypto import (
    KEY_BYTES, CryptoError, DecodeError, KeyRing, public_key_from_text, public_key_to_text,
)

SECRET_FILE_MODE = 0o600
MAX_KEY_FILE_BYTES = 64 * 1024

class KeyFileError(CryptoError):
    """A key file that is missing, malformed or readable by others."""




def write_secret_file(path: str, data: bytes) -> None:
    """Write *data* atomically with mode 0600: never a moment when it is world-readable."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_secret_file(path: str) -> bytes:
    """Contents of a secret file; refused when group or others may read it (as ssh does)."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_mode & 0o077:
                raise KeyFileError(f"{path}: readable by group or others; chmod 600 it")
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes")
    return data


def keyring_to_text(ring: KeyRing) -> str:
    lines = ["# mpay key ring: one base64 key a line; the first seals, all open."]
    lines += [f"{base64.b64encode(k.secret).decode()}  # id {k.key_id.hex()}" for k in ring.keys()]
    return "\n".join(lines) + "\n"


def keyring_from_text(text: str, origin: str = "key ring") -> KeyRing:
    """Parse the key-ring form (``openssl rand -base64 32`` makes one line)."""
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{origin}:{lineno}: not base64") from None
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"{origin}:{lineno}: key is {len(key)} bytes, not {KEY_BYTES}")
        keys.append(key)
    try:
        return KeyRing(keys)
    except ValueError as exc:
        raise KeyFileError(f"{origin}: {exc}") from None


def save_keyring(path: str, ring: KeyRing) -> None:
    write_secret_file(path, keyring_to_text(ring).encode("ascii"))


def load_keyring(path: str) -> KeyRing:
    try:
        text = read_secret_file(path).decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not ASCII") from None
    return keyring_from_text(text, path)


def save_signing_key(path: str, key: Ed25519PrivateKey) -> None:
    """PKCS#8 PEM, the form ``openssl genpkey -algorithm ed25519`` writes."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_secret_file(path, pem)


def load_signing_key(path: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_secret_file(path), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def save_public_key(path: str, key: Ed25519PublicKey) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(public_key_to_text(key) + "\n")


def load_public_key(path: str) -> Ed25519PublicKey:
    try:
        with open(path, encoding="ascii") as handle:
            return public_key_from_text(handle.read(MAX_KEY_FILE_BYTES))
    except (OSError, UnicodeDecodeError, DecodeError) as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def ensure_keyring(path: str, create: bool = True) -> KeyRing:
    """Load the ring at *path*; create a fresh one first if it is missing and *create*."""
    if not os.path.exists(path):
        if not create:
            raise KeyFileError(f"{path}: missing (it must be the same file on every server sharing it)")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_keyring(path, KeyRing.generate())
    return load_keyring(path)


def ensure_signing_key(path: str) -> Ed25519PrivateKey:
    """The AS's long-term key, created on first start with its public half at PATH.pub."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_signing_key(path, Ed25519PrivateKey.generate())
    key = load_signing_key(path)
    public_path = path.rsplit(".", 1)[0] + ".pub" if path.endswith(".pem") else path + ".pub"
    if not os.path.exists(public_path):
        save_public_key(public_path, key.public_key())
    return key
