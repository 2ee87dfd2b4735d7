"""The ledger writer process's wire: frames both ways, and what may cross in them.

A frame is a 4-byte length and a pickle, between a PS and the child it
started (nothing else can write to the socket).  The PS sends the setup
(how to open the store), then one frame of operations per reactor turn, then
None to stop; the child sends ``(OPEN, ok, why, first)``, one ``(DONE,
results, retries, redos)`` per committed group (results in the order of the
operations), and ``(EXITED,)``.
"""

from __future__ import annotations

import functools
import pickle
import struct
from typing import Any

from mpay.ledger.api import LedgerError
from mpay.ledger.writer import OpenStore

FRAME = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 20          # a frame is one turn's operations or one group's results
READ_BYTES = 256 * 1024
OPEN, DONE, EXITED = "open", "done", "exited"


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(data) <= MAX_FRAME_BYTES, len(data)
    return FRAME.pack(len(data)) + data


class Frames:
    """Whole frames out of a byte stream, as they complete."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        out, at = [], 0
        while len(buffer) - at >= FRAME.size:
            (size,) = FRAME.unpack_from(buffer, at)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {size} bytes")
            if len(buffer) - at - FRAME.size < size:
                break
            start = at + FRAME.size
            out.append(pickle.loads(buffer[start:start + size]))
            at = start + size
        del buffer[:at]
        return out


def portable(open_store: OpenStore) -> tuple:
    """*open_store* as the child can rebuild it.  ``store_opener`` gives a partial of a
    store's ``open`` classmethod, which Twisted's method pickling (twisted.persisted)
    cannot pickle: it goes as (class, method name, args, keywords)."""
    func = getattr(open_store, "func", None)
    owner = getattr(func, "__self__", None)
    if isinstance(owner, type):
        return (owner, func.__name__, open_store.args, open_store.keywords)
    return (open_store,)


def rebuilt(portable_store: tuple) -> OpenStore:
    if len(portable_store) == 1:
        return portable_store[0]
    owner, name, args, keywords = portable_store
    return functools.partial(getattr(owner, name), *args, **keywords)


def sendable(result: object) -> object:
    """A result that crosses the socket: an exception that would not pickle (or not unpickle,
    which would break the PS's end of the link) goes as its text."""
    if isinstance(result, BaseException):
        try:
            pickle.loads(pickle.dumps(result))
        except Exception:
            return LedgerError(f"{type(result).__name__}: {result}")
    return result


