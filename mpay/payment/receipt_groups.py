"""Group-signed receipts: one PS signature for the receipts of a reactor turn (issue 7).

Group commit shares one fsync among the transfers of a ledger batch; this
shares one Ed25519 signature among their receipts, the largest single cost
left in the reactor (some 30 us a transfer).  The receipts committed together
are the leaves of a Merkle tree, the PS signs the tree's root once, and each
receipt carries what proves it is a leaf of that signed tree: its position,
its salt and the sibling hashes up to the root.  Proving a receipt costs its
holder one signature check and a few hashes, as before; the PS signs once for
up to ``MAX_TREE_LEAVES`` receipts.  A turn with one receipt signs it alone
(``v1``), so a quiet PS answers exactly as it always did.

The tree is RFC 9162's (section 2.1): SHA-256, leaves and interior nodes
hashed under different prefixes (no interior node can pass for a leaf), any
number of leaves, the inclusion proof checked as its section 2.1.3.2 says.
Two choices of our own:

- Each leaf is salted with 16 random bytes that only its own receipt shows.
  A receipt's path holds its neighbours' hashes, and a neighbour may be the
  payer's copy of a concealed transfer whose payee holds the other copy: a
  phone number is few enough guesses to find by hashing every one, so without
  the salt the payee could recover whom RFC 3323 hides.
- The signed message is the tree size and the root, under a purpose label of
  its own, so no v1 receipt signature can pass for a tree's and a root cannot
  be claimed for a tree of another size.

Wire form: ``v2 <body>; salt=<s>; leaf=<index>/<size>; path=<hashes>;
sig=<signature>``, each value base64url (path: the sibling hashes
concatenated, leaf side first).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Callable, Sequence

from twisted.logger import Logger
from twisted.python.failure import Failure

from mpay.auth.crypto import decode_b64, encode_b64, sign

TREE_PURPOSE = b"mpay-receipt-tree-v2"
MAX_TREE_LEAVES = 16
"""Receipts under one signature: 16 take the signature's cost per receipt to a
sixteenth and keep the path at 4 hashes (172 characters of the header), so a
notice stays well inside one UDP datagram."""
SALT_BYTES = 16
HASH_BYTES = 32
MAX_PATH_HASHES = (MAX_TREE_LEAVES - 1).bit_length()  # a verifier accepts no deeper tree
_LEAF, _NODE = b"\x00", b"\x01"
_SIZE = struct.Struct(">H")
assert MAX_TREE_LEAVES <= 0xFFFF
_sha256 = hashlib.sha256


def leaf_hash(salt: bytes, body: bytes) -> bytes:
    return _sha256(_LEAF + salt + body).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return _sha256(_NODE + left + right).digest()


def tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """(root, each leaf's inclusion path, leaf side first) of RFC 9162's tree over *leaves*."""
    n = len(leaves)
    assert n >= 1
    if n == 1:
        return leaves[0], [[]]
    split = 1 << ((n - 1).bit_length() - 1)   # the largest power of two below n
    left, left_paths = tree(leaves[:split])
    right, right_paths = tree(leaves[split:])
    for path in left_paths:
        path.append(right)
    for path in right_paths:
        path.append(left)
    return _node(left, right), left_paths + right_paths


def root_from_path(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root that *path* proves *leaf* (at *index* of *size*) is under; ValueError if it
    proves none (RFC 9162, 2.1.3.2)."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ValueError("inclusion path too long")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion path too short")
    return r


def signed_message(size: int, root: bytes) -> bytes:
    return _SIZE.pack(size) + root


def group_sign(ps_key: Any, bodies: Sequence[bytes]) -> list[str]:
    """The v2 header values of *bodies* (2 to MAX_TREE_LEAVES), under one signature."""
    size = len(bodies)
    assert 2 <= size <= MAX_TREE_LEAVES, size
    salts = os.urandom(SALT_BYTES * size)
    salt_of = [salts[i * SALT_BYTES:(i + 1) * SALT_BYTES] for i in range(size)]
    root, paths = tree([leaf_hash(salt, body) for salt, body in zip(salt_of, bodies)])
    signature = encode_b64(sign(ps_key, TREE_PURPOSE, signed_message(size, root)))
    return [f"v2 {encode_b64(body)}; salt={encode_b64(salt_of[i])}; leaf={i}/{size}; "
            f"path={encode_b64(b''.join(paths[i]))}; sig={signature}"
            for i, body in enumerate(bodies)]


_V2_FIELDS = ("salt", "leaf", "path", "sig")


def parse_v2(rest: str, max_body_chars: int) -> tuple[bytes, bytes, bytes]:
    """(receipt body, signed message, signature) of a v2 value after its version word;
    the signature is not checked here.  ValueError (DecodeError among them) if it is not one."""
    encoded, *fields = rest.split("; ")
    named = dict(field.partition("=")[::2] for field in fields)
    if tuple(named) != _V2_FIELDS or len(fields) != len(_V2_FIELDS):
        raise ValueError("not a v2 receipt")
    body = decode_b64(encoded.strip(), max_body_chars)
    salt = decode_b64(named["salt"], 64)
    index_text, _, size_text = named["leaf"].partition("/")
    if not all(text.isascii() and text.isdigit() and len(text) <= 5 and str(int(text)) == text
               for text in (index_text, size_text)):
        raise ValueError("bad leaf position")        # digits, canonical: no sign, no 0 first
    index, size = int(index_text), int(size_text)
    if not 2 <= size <= MAX_TREE_LEAVES or len(salt) != SALT_BYTES:
        raise ValueError("bad receipt tree")
    hashes = decode_b64(named["path"], 4 * HASH_BYTES * MAX_PATH_HASHES // 3 + 4)
    if len(hashes) % HASH_BYTES or len(hashes) > HASH_BYTES * MAX_PATH_HASHES:
        raise ValueError("bad inclusion path")
    path = [hashes[i:i + HASH_BYTES] for i in range(0, len(hashes), HASH_BYTES)]
    root = root_from_path(index, size, leaf_hash(salt, body), path)
    return body, signed_message(size, root), decode_b64(named["sig"], 128)


class ReceiptSigner:
    """``sign(bodies, then, failed)``: *then* gets their header values once the turn's group
    is signed (*failed* a Failure, if it could not be).

    What is asked during one reactor turn (the deliveries of one ledger batch)
    is signed together at the start of the next, in trees of at most
    ``MAX_TREE_LEAVES``; a lone receipt is signed as v1 by *sign_one*.
    """

    log = Logger()

    def __init__(self, reactor: Any, ps_key: Any, sign_one: Callable[[Any, bytes], str],
                 max_leaves: int = MAX_TREE_LEAVES):
        assert 1 <= max_leaves <= MAX_TREE_LEAVES
        self.reactor, self.ps_key, self.sign_one = reactor, ps_key, sign_one
        self.max_leaves = max_leaves
        self._asked: list[tuple[Sequence[bytes], Callable[[list[str]], None],
                                Callable[[Failure], None]]] = []
        self.groups = self.receipts = 0      # signatures made, receipts signed (the manhole)

    def sign(self, bodies: Sequence[bytes], then: Callable[[list[str]], None],
             failed: Callable[[Failure], None]) -> None:
        assert bodies
        if not self._asked:
            self.reactor.callLater(0, self.flush)
        self._asked.append((bodies, then, failed))

    def flush(self) -> None:
        asked, self._asked = self._asked, []
        flat = [body for bodies, _, _ in asked for body in bodies]
        try:
            signed: list[str] = []
            for start in range(0, len(flat), self.max_leaves):
                group = flat[start:start + self.max_leaves]
                signed += (group_sign(self.ps_key, group) if len(group) > 1
                           else [self.sign_one(self.ps_key, group[0])])
                self.groups += 1
        except Exception:
            failure = Failure()
            self.log.failure("ps: a group of {count} receipts was not signed", failure,
                             count=len(flat))
            for _, _, failed in asked:
                failed(failure)
            return
        assert len(signed) == len(flat)
        self.receipts += len(flat)
        at = 0
        for bodies, then, failed in asked:
            try:
                then(signed[at:at + len(bodies)])
            except Exception:
                failed(Failure())
            at += len(bodies)
