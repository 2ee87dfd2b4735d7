"""The manhole admits only configured credentials; its host key is private."""

import os
import stat

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.trial import unittest

from mpay.ops.manhole import AuthorizedKeysFile, ManholeConfigError, manhole_service


class ManholeTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.passwords = os.path.join(self.dir, "passwords")
        with open(self.passwords, "wb") as handle:
            handle.write(b"ops:" + bcrypt.hashpw(b"correct horse", bcrypt.gensalt(rounds=4)) + b"\n")
        self.host_key = os.path.join(self.dir, "host_key")

    def build(self, **kwargs):
        options = dict(listen="tcp:0:interface=127.0.0.1", host_key=self.host_key,
                       authorized_keys="", passwords=self.passwords, namespace={"answer": 42})
        options.update(kwargs)
        return manhole_service(**options)

    def test_refuses_to_start_without_credentials(self):
        self.assertRaises(ManholeConfigError, self.build, passwords="")

    def test_host_key_is_created_private(self):
        self.build()
        self.assertEqual(stat.S_IMODE(os.stat(self.host_key).st_mode), 0o600)
        self.assertIsInstance(keys.Key.fromFile(self.host_key), keys.Key)

    @defer.inlineCallbacks
    def test_bcrypt_password_admits_and_wrong_password_does_not(self):
        portal = self.build().factory.portal
        interface, avatar, logout = yield portal.login(UsernamePassword(b"ops", b"correct horse"),
                                                       None, IConchUser)
        self.assertIs(interface, IConchUser)
        logout()
        for user, password in ((b"ops", b"wrong"), (b"root", b"correct horse"), (b"ops", b"")):
            yield self.assertFailure(portal.login(UsernamePassword(user, password), None, IConchUser),
                                     UnauthorizedLogin)

    def test_authorized_keys_file_lists_its_keys(self):
        public = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path = os.path.join(self.dir, "authorized_keys")
        with open(path, "wb") as handle:
            handle.write(b"# operators\n" + public + b" ops@example\nnot a key\n")
        found = list(AuthorizedKeysFile(path).getAuthorizedKeys(b"anyone"))
        self.assertEqual([key.public().toString("OPENSSH") for key in found],
                         [keys.Key.fromString(public).toString("OPENSSH")])
