"""The signature process's records and its loop (the child side of signatures.py), sans-IO.

Kept apart from the Twisted side so the child imports only this and the
crypto (a tenth of a second to start, not a fifth).

Both directions are fixed-size records, so framing is slicing::

    job:    seq (4, big-endian) | public key (32) | signature (64) | digest (32)
    answer: seq (4) | 1 if the signature verifies, else 0 (1)

The child writes one answer with seq ``READY_SEQ`` when it can take jobs.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import struct

from mpay.auth.crypto import ED25519_PUBLIC_BYTES, ED25519_SIGNATURE_BYTES
from mpay.payment import receipt as receipts

# The request digest's size (SHA-256), not imported from tickets.py: that would bring
# libphonenumber into the child's start (signatures.py checks the two agree).
DIGEST_BYTES = hashlib.sha256().digest_size

JOB = struct.Struct(f">I{ED25519_PUBLIC_BYTES}s{ED25519_SIGNATURE_BYTES}s{DIGEST_BYTES}s")
ANSWER = struct.Struct(">IB")
READY_SEQ = 0xFFFFFFFF
READ_BYTES = 256 * 1024


def verifies(public: bytes, digest: bytes, signature: bytes) -> bool:
    try:
        receipts.verify_request(public, digest, signature)
    except receipts.ReceiptError:
        return False
    return True


def answer_jobs(data: bytes) -> tuple[bytes, bytes]:
    """The child's work: (answers to the whole jobs in *data*, the part-job left over)."""
    whole = len(data) - len(data) % JOB.size
    answers = b"".join(ANSWER.pack(seq, verifies(public, digest, signature))
                       for seq, public, signature, digest in JOB.iter_unpack(data[:whole]))
    return answers, data[whole:]


def serve(sock: socket.socket) -> None:
    """The child's loop: blocking reads, one write of answers per read, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the PS stops it, by closing the socket
    sock.sendall(ANSWER.pack(READY_SEQ, 1))
    left = b""
    while True:
        data = sock.recv(READ_BYTES)
        if not data:
            return
        answers, left = answer_jobs(left + data)
        if answers:
            sock.sendall(answers)


if __name__ == "__main__":
    serve(socket.socket(fileno=0))
