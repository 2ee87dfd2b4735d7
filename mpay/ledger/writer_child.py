"""The ledger writer process (``python -m mpay.ledger.writer_child``): the writer thread's
loop, ``GroupCommitWriter._run``, fed from the PS's socket instead of its reactor.

The writer's queue is the socket (None or EOF: its stop); what the thread
would hand the reactor goes back as frames.  One thread.
Its own module so that ``-m`` does not run a module the ``mpay.ledger``
package has already imported.
"""

from __future__ import annotations

import collections
import queue
import signal
import socket
import sys
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
        self.writer: GroupCommitWriter | None = None

    def _send(self, message: Any) -> None:
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


class _SocketQueue:
    """The writer's queue, read straight off the socket: ``get`` waits for a frame,
    ``get_nowait`` takes what has arrived.  One thread, so no GIL hand-offs inside
    the child either (a reader thread beside the loop cost both a share)."""

    def __init__(self, sock: socket.socket, frames: Frames, early: list):
        self.sock, self.frames = sock, frames
        self.items: collections.deque = collections.deque()
        self._add(early)

    def _add(self, messages: list) -> None:
        items = self.items
        for ops in messages:
            if ops is None:
                items.append(_STOP)
                return
            items.extend((None, None, name, args) for name, args in ops)

    def _read(self, flags: int) -> None:
        try:
            data = self.sock.recv(READ_BYTES, flags)
        except BlockingIOError:
            return
        if not data:                        # the PS is gone: commit what came, then stop
            self.items.append(_STOP)
            return
        self._add(self.frames.feed(data))

    def get(self) -> Any:
        while not self.items:
            self._read(0)
        return self.items.popleft()

    def get_nowait(self) -> Any:
        if not self.items:
            self._read(socket.MSG_DONTWAIT)
            if not self.items:
                raise queue.Empty
        return self.items.popleft()


def serve(sock: socket.socket) -> None:
    """The child: read the setup, then operations until None or EOF; commit as the thread does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the PS stops it, by the None frame
    frames = Frames()
    setup = None
    while setup is None:
        data = sock.recv(READ_BYTES)
        if not data:
            return
        messages = frames.feed(data)
        if messages:
            setup, early = messages[0], messages[1:]
    portable_store, max_batch, commit_delay_s = setup
    courier = _Courier(sock)
    writer = GroupCommitWriter(rebuilt(portable_store), courier, max_batch=max_batch,
                               max_pending=sys.maxsize, commit_delay_s=commit_delay_s)
    courier.writer = writer
    writer._queue = _SocketQueue(sock, frames, early)     # type: ignore[assignment]
    writer._run()


if __name__ == "__main__":
    serve(socket.socket(fileno=0))
