"""The ledger writer process (``python -m mpay.ledger.writer_child``): the writer thread's
loop, ``GroupCommitWriter._run``, fed from the PS's socket instead of its reactor.

A reader thread puts each frame's operations on the writer's queue (None or
EOF: its stop); what the thread would hand the reactor goes back as frames.
Its own module so that ``-m`` does not run a module the ``mpay.ledger``
package has already imported.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import Any, Callable

from twisted.python.failure import Failure

from mpay.ledger.writer import _STOP, GroupCommitWriter
from mpay.ledger.writer_wire import (
    DONE, EXITED, OPEN, READ_BYTES, Frames, frame, rebuilt, sendable,
)


class _Courier:
    """The child's stand-in for the reactor: what the writer thread would hand the reactor
    (``callFromThread``) goes to the parent as a frame instead."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.writer: GroupCommitWriter | None = None

    def _send(self, message: Any) -> None:
        with self.lock:
            self.sock.sendall(frame(message))

    def callFromThread(self, fn: Callable, *args: Any) -> None:
        writer = self.writer
        assert writer is not None
        if fn == writer._deliver:
            batch, results = args
            self._send((DONE, [sendable(r) for r in results], writer.retries, writer.careful_redos))
            writer.retries = writer.careful_redos = 0
        elif fn == writer._opened:
            result, first = args
            ok = not isinstance(result, Failure)
            self._send((OPEN, ok, "" if ok else result.getErrorMessage(), first))
        elif fn == writer._exited:
            self._send((EXITED,))
        else:                           # log.failure(...) of a writer that failed
            message, failure = args[0], args[1] if len(args) > 1 else None
            print(f"ledger writer: {message}", file=sys.stderr, flush=True)
            if isinstance(failure, Failure):
                print(failure.getTraceback(), file=sys.stderr, flush=True)


def serve(sock: socket.socket) -> None:
    """The child: read the setup, then operations until None or EOF; commit as the thread does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the PS stops it, by the None frame
    reader = Frames()
    setup = None
    while setup is None:
        data = sock.recv(READ_BYTES)
        if not data:
            return
        messages = reader.feed(data)
        if messages:
            setup, early = messages[0], messages[1:]
    portable_store, max_batch, commit_delay_s = setup
    open_store = rebuilt(portable_store)
    courier = _Courier(sock)
    writer = GroupCommitWriter(open_store, courier, max_batch=max_batch,
                               max_pending=sys.maxsize, commit_delay_s=commit_delay_s)
    courier.writer = writer
    queue = writer._queue

    def put(messages: list) -> bool:
        for ops in messages:
            if ops is None:
                queue.put(_STOP)
                return False
            for name, args in ops:
                queue.put((None, None, name, args))
        return True

    def read() -> None:
        going = put(early)
        while going:
            data = sock.recv(READ_BYTES)
            if not data:
                queue.put(_STOP)
                return
            going = put(reader.feed(data))

    threading.Thread(target=read, name="mpay-ledger-writer-reader", daemon=True).start()
    writer._run()


if __name__ == "__main__":
    serve(socket.socket(fileno=0))
