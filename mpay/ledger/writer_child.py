"""The ledger writer process's entry point (``python -m mpay.ledger.writer_child``).

Its own module so that ``-m`` does not run a module the ``mpay.ledger`` package
has already imported; the loop is ``writer_process.serve``.
"""

import socket

from mpay.ledger.writer_process import serve

if __name__ == "__main__":
    serve(socket.socket(fileno=0))
