"""An SSH manhole into the live process, for operators (loopback, off by default).

A Python prompt inside a payment server is powerful, so it only starts with a
host key and at least one real credential source: an OpenSSH
``authorized_keys`` file, or a file of ``user:BCRYPT_HASH`` lines.  There is
no default password and no telnet.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import strports
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import checkers, portal
from zope.interface import implementer

from twisted.conch.checkers import IAuthorizedKeysDB


class ManholeConfigError(ValueError):
    """The manhole was asked for without what it needs to be safe."""


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Every key in one OpenSSH authorized_keys file may log in, as any user name."""

    def __init__(self, path: str):
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> Iterable[keys.Key]:
        with open(self.path, "rb") as handle:
            for line in handle:
                line = line.strip()
                if line and not line.startswith(b"#"):
                    try:
                        yield keys.Key.fromString(line)
                    except keys.BadKeyError:
                        continue


def _bcrypt_check(username: bytes, password: bytes, stored: bytes) -> bytes:
    """FilePasswordDB's hash hook: hash the offered password with the stored salt."""
    try:
        return bcrypt.hashpw(password, stored)
    except ValueError:
        return b""  # not a bcrypt hash: never matches


def ensure_host_key(path: str) -> keys.Key:
    """Load the SSH host key, creating an Ed25519 one (mode 0600) on first start."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
    return keys.Key.fromFile(path)


def manhole_service(listen: str, host_key: str, authorized_keys: str, passwords: str,
                    namespace: dict[str, Any], reactor=None):
    """The manhole as one service; *namespace* holds the live objects operators inspect."""
    credential_checkers = []
    if authorized_keys:
        credential_checkers.append(SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys)))
    if passwords:
        credential_checkers.append(checkers.FilePasswordDB(passwords, hash=_bcrypt_check, cache=False))
    if not credential_checkers:
        raise ManholeConfigError("[manhole] listen is set but neither authorized_keys nor passwords is")
    key = ensure_host_key(host_key)

    def chained_protocol():
        return insults.ServerProtocol(manhole.ColoredManhole, namespace)

    realm = manhole_ssh.TerminalRealm()
    realm.chainedProtocolFactory = chained_protocol
    factory = manhole_ssh.ConchFactory(portal.Portal(realm, credential_checkers))
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    svc = strports.service(listen, factory, reactor=reactor)
    svc.setName("manhole")
    return svc
