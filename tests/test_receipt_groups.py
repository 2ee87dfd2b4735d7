"""Group-signed receipts: the tree, the v2 wire form, the turn-at-a-time signer (issue 7)."""

import hashlib

from hypothesis import given, settings, strategies as st
from twisted.internet import task
from twisted.trial import unittest

from mpay.auth import crypto
from mpay.payment import receipt as receipts
from mpay.payment import receipt_groups as groups
from mpay.payment.receipt import Receipt, ReceiptError, verify_receipt
from mpay.payment.transfer import ANONYMOUS

FUZZ = settings(max_examples=200, deadline=None)
PAYER, PAYEE = "+886912345678", "+886987654321"


def receipt(journal_id: int, payer: str = PAYER, amount: int = 100) -> Receipt:
    return Receipt(journal_id, payer, PAYEE, amount, "TWD", 1795582265.5, "A" * 43)


def leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(b"leaf %d" % i).digest() for i in range(n)]


class TreeTests(unittest.TestCase):
    @FUZZ
    @given(st.integers(1, 40))
    def test_every_leaf_proves_the_root_and_no_other_position(self, n):
        hashed = leaves(n)
        root, paths = groups.tree(hashed)
        self.assertEqual(len(paths), n)
        for index, (leaf, path) in enumerate(zip(hashed, paths)):
            self.assertEqual(groups.root_from_path(index, n, leaf, path), root)
            self.assertLessEqual(len(path), (n - 1).bit_length())
            for other in {0, index - 1, index + 1, n - 1} - {index}:
                if 0 <= other < n:
                    try:
                        self.assertNotEqual(groups.root_from_path(other, n, leaf, path), root)
                    except ValueError:
                        pass        # a path of the wrong length for that position

    def test_known_shape_of_three(self):
        a, b, c = leaves(3)
        node = lambda left, right: hashlib.sha256(b"\x01" + left + right).digest()  # noqa: E731
        root, paths = groups.tree([a, b, c])
        self.assertEqual(root, node(node(a, b), c), "RFC 9162: split at the largest power of 2")
        self.assertEqual(paths, [[b, c], [a, c], [node(a, b)]])

    def test_paths_too_long_too_short_or_outside_are_refused(self):
        hashed = leaves(5)
        root, paths = groups.tree(hashed)
        self.assertRaises(ValueError, groups.root_from_path, 0, 5, hashed[0], paths[0][:-1])
        self.assertRaises(ValueError, groups.root_from_path, 0, 5, hashed[0],
                          paths[0] + [hashed[1]])
        self.assertRaises(ValueError, groups.root_from_path, 5, 5, hashed[0], paths[0])

    def test_a_leaf_is_never_an_interior_node(self):
        a, b = leaves(2)
        root, _ = groups.tree([a, b])
        self.assertNotEqual(groups.leaf_hash(b"", a + b), root)
        self.assertNotEqual(groups.leaf_hash(b"", b"\x01" + a + b), root)


class WireTests(unittest.TestCase):
    def setUp(self):
        self.key = crypto.generate_signing_key()
        self.public = self.key.public_key()

    def test_each_receipt_of_a_group_verifies_to_itself(self):
        for size in (2, 3, 7, groups.MAX_TREE_LEAVES):
            asked = [receipt(i) for i in range(size)]
            signed = groups.group_sign(self.key, [r.encode() for r in asked])
            self.assertEqual([verify_receipt(self.public, value) for value in signed], asked)
            self.assertTrue(all(value.startswith("v2 ") for value in signed))
            self.assertEqual(len({value.rpartition("sig=")[2] for value in signed}), 1,
                             "one signature for the group")

    def test_tampering_with_any_part_is_refused(self):
        signed = groups.group_sign(self.key, [receipt(1).encode(), receipt(2).encode(),
                                              receipt(3).encode()])
        value = signed[1]
        other = signed[2]
        body, salt = value.split("; ")[0][3:], value.split("; ")[1]
        forged = [
            value.replace(body, crypto.encode_b64(receipt(2, amount=1).encode())),
            value.replace(salt, other.split("; ")[1]),           # another leaf's salt
            value.replace("leaf=1/3", "leaf=2/3"),
            value.replace("leaf=1/3", "leaf=1/4"),
            value.replace("leaf=1/3", "leaf=01/3"),
            value.replace("; path=", "; path=A"),
            value.split("; path=")[0] + "; path=" + other.split("; path=")[1],
            value.replace("; sig=", "; sig=x; sig="),
            value.replace("v2 ", "v1 "),
            value.replace("; salt=", "; nonce="),
        ]
        for bad in forged:
            self.assertRaises(ReceiptError, verify_receipt, self.public, bad)
        other_key = crypto.generate_signing_key().public_key()
        self.assertRaises(ReceiptError, verify_receipt, other_key, value)

    def test_a_signature_under_the_v1_purpose_cannot_pass_for_a_trees(self):
        """The purposes differ: the PS's v1 signature over the bytes a tree signs is no
        v2 signature, so a lone receipt's signature can never stand for a group."""
        bodies = [receipt(1).encode(), receipt(2).encode()]
        (value, _) = groups.group_sign(self.key, bodies)
        body, signed, _ = groups.parse_v2(value[3:], receipts.MAX_RECEIPT_CHARS)
        v1_sig = crypto.encode_b64(crypto.sign(self.key, receipts.RECEIPT_PURPOSE, signed))
        forged = value.rpartition("sig=")[0] + "sig=" + v1_sig
        self.assertRaises(ReceiptError, verify_receipt, self.public, forged)
        self.assertEqual(verify_receipt(self.public, value).journal_id, 1)

    def test_a_concealed_payer_cannot_be_recovered_from_the_payees_path(self):
        """Two copies of one transfer, side by side: the payee's path holds the payer's
        copy's hash, salted with bytes only the payer's receipt shows."""
        mine = receipt(9)
        payee_copy = mine._replace(payer=ANONYMOUS)
        payer_value, payee_value = groups.group_sign(self.key, [mine.encode(),
                                                                payee_copy.encode()])
        sibling = crypto.decode_b64(payee_value.split("; path=")[1].split(";")[0], 200)
        unsalted = {groups.leaf_hash(b"", receipt(9, payer=f"+88691234{n:04d}").encode())
                    for n in range(5000, 6000)}
        self.assertNotIn(sibling, unsalted, "a guess of the payer's number confirms nothing")
        payer_salt = crypto.decode_b64(payer_value.split("; ")[1][5:], 64)
        self.assertEqual(sibling, groups.leaf_hash(payer_salt, mine.encode()))
        self.assertEqual(verify_receipt(self.public, payee_value).payer, ANONYMOUS)

    @FUZZ
    @given(st.text(max_size=400))
    def test_any_text_is_a_receipt_or_a_receipt_error(self, text):
        for value in (text, "v2 " + text, "v2 eyJ9; salt=" + text):
            try:
                verify_receipt(self.public, value)
            except ReceiptError:
                pass


class SignerTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.key = crypto.generate_signing_key()
        self.signer = receipts.receipt_signer(self.clock, self.key)
        self.got: list = []
        self.failures: list = []

    def ask(self, *asked: Receipt) -> None:
        self.signer.sign([r.encode() for r in asked], self.got.append, self.failures.append)

    def test_a_turns_receipts_share_one_signature_at_the_next_turn(self):
        self.ask(receipt(1))
        self.ask(receipt(2), receipt(2, payer=ANONYMOUS))
        self.ask(receipt(3))
        self.assertEqual(self.got, [], "nothing is signed during the turn that asks")
        self.clock.advance(0)
        self.assertEqual([len(values) for values in self.got], [1, 2, 1])
        self.assertEqual((self.signer.groups, self.signer.receipts), (1, 4))
        verified = [verify_receipt(self.key.public_key(), v) for vs in self.got for v in vs]
        self.assertEqual([r.journal_id for r in verified], [1, 2, 2, 3])
        self.assertEqual(verified[2].payer, ANONYMOUS)

    def test_a_lone_receipt_is_signed_as_before(self):
        self.ask(receipt(1))
        self.clock.advance(0)
        (value,) = self.got[0]
        self.assertEqual(value, receipts.sign_receipt(self.key, receipt(1)), "Ed25519 is "
                         "deterministic: the same bytes a v1 signer always sent")

    def test_more_than_a_tree_holds_is_signed_in_several(self):
        for i in range(groups.MAX_TREE_LEAVES + 3):
            self.ask(receipt(i))
        self.clock.advance(0)
        self.assertEqual(self.signer.groups, 2)
        values = [vs[0] for vs in self.got]
        self.assertTrue(all(v.startswith("v2 ") for v in values[:groups.MAX_TREE_LEAVES]))
        self.assertIn("leaf=2/3;", values[-1])
        self.assertEqual([verify_receipt(self.key.public_key(), v).journal_id for v in values],
                         list(range(groups.MAX_TREE_LEAVES + 3)))

    def test_a_failing_continuation_does_not_hold_up_the_others(self):
        def boom(values):
            raise RuntimeError("a bug in one transfer")
        self.signer.sign([receipt(1).encode()], boom, self.failures.append)
        self.ask(receipt(2))
        self.clock.advance(0)
        self.assertEqual(len(self.got), 1)
        [failure] = self.failures
        self.assertTrue(failure.check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)

    def test_a_group_that_cannot_be_signed_fails_every_ask(self):
        self.signer.ps_key = None                      # no key: signing raises
        self.ask(receipt(1), receipt(2))
        self.ask(receipt(3))
        self.clock.advance(0)
        self.assertEqual(self.got, [])
        self.assertEqual(len(self.failures), 2)
        self.assertEqual(len(self.flushLoggedErrors()), 1, "said once, in the log")
        self.signer.ps_key = self.key
        self.ask(receipt(4))
        self.clock.advance(0)
        self.assertEqual(len(self.got), 1, "the next turn signs again")
