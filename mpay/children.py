"""What the servers' helper processes (the signature process, the ledger writer) start with."""

from __future__ import annotations

import os
import sys


def child_env() -> dict[str, str]:
    """This process's environment, with the path it imported mpay from: the child imports
    mpay from wherever this process did (a checkout, a venv)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env
