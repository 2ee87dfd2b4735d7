"""The hot modules compiled to C with mypyc, beside their sources (issue 7).

The SIP parser, header values, URIs and the message model, the ticket and
the authenticator are most of the Python a credit transfer runs, and they
are plain typed Python, with no class built on an interpreted one; mypyc turns
each into an extension module that CPython imports in place of the ``.py``
(an extension wins over a source file in the same directory).  The ``.py``
stays the one source and the fallback: without a C compiler, or after
``make clean``, the same code runs interpreted, and every test passes on
both.

An extension older than its source would run code that is not in the
checkout; ``stale()`` finds one, the server refuses to start on it and the
test suite to run, and ``make`` builds again when a source changes.
``MPAY_INTERPRETED=1`` in the environment runs the sources though built (a
traceback with line numbers; the suite runs the SIP and ticket tests so too).

    python -m mpay.compiled build     # what make runs: compile MODULES in place
    python -m mpay.compiled clean     # back to pure Python
    python -m mpay.compiled status    # which modules run compiled
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Any

# In the order of the Makefile's COMPILED list (tests/test_compiled.py holds them equal).
MODULES = ("mpay.auth.crypto", "mpay.auth.tickets", "mpay.auth.verifier", "mpay.payment.body",
           "mpay.sip.headers", "mpay.sip.message", "mpay.sip.parser", "mpay.sip.uri",
           "mpay.sip.useragent", "mpay.sip.transaction", "mpay.sip.server_transaction",
           "mpay.sip.client_transaction", "mpay.sip.linger", "mpay.sip.timing", "mpay.e164",
           "mpay.payment.transfer_flow", "mpay.payment.receipt_groups", "mpay.payment.receipt",
           "mpay.payment.transfer", "mpay.sip.endpoint", "mpay.timewheel")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build")
# mypyc's shared runtime for the group, at the top of the checkout: <hash>__mypyc.*.so
_GROUP_GLOB = "*__mypyc" + importlib.machinery.EXTENSION_SUFFIXES[0]


def source_of(module: str, root: str = ROOT) -> str:
    return os.path.join(root, *module.split(".")) + ".py"


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds MODULES as their ``.py``, ahead of the extension beside it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(name, source_of(name))


def prefer_sources() -> None:
    """From now on MODULES import interpreted (before anything imported them)."""
    assert not any(module in sys.modules for module in MODULES), "already imported"
    if not interpreted_by_request():
        sys.meta_path.insert(0, _SourcesFirst())


def interpreted_by_request() -> bool:
    return any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path)


def extensions(root: str = ROOT) -> dict[str, str]:
    """Every extension module under mpay/ (all of them mypyc's): module name -> path."""
    found = {}
    suffixes = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)
    for path in glob.glob(os.path.join(root, "mpay", "**", "*.*"), recursive=True):
        suffix = next((s for s in suffixes if path.endswith(s)), None)
        if suffix is not None:
            found[os.path.relpath(path, root)[:-len(suffix)].replace(os.sep, ".")] = path
    return found


def stale(root: str = ROOT) -> list[str]:
    """Modules whose extension was built before their source last changed, or is left
    from a build of other MODULES: either would run in place of the checkout's source."""
    if interpreted_by_request():
        return []
    return sorted(module for module, path in extensions(root).items()
                  if module not in MODULES or not os.path.exists(source_of(module, root))
                  or os.path.getmtime(path) < os.path.getmtime(source_of(module, root)))


def refusal() -> str | None:
    """What the server and the test suite say when an extension is stale, else None."""
    modules = stale()
    if not modules:
        return None
    return (f"compiled modules that are not the checkout's source: {', '.join(modules)}; "
            "run make (or python -m mpay.compiled build, or clean to run them interpreted)")


def status() -> dict[str, str]:
    """Each module: "compiled" or "interpreted", as an import would find it now."""
    found = {}
    for module in MODULES:
        spec = importlib.util.find_spec(module)
        loader = spec.loader if spec is not None else None
        found[module] = ("compiled" if isinstance(loader, importlib.machinery.ExtensionFileLoader)
                         else "interpreted")
    return found


def clean() -> None:
    for path in extensions().values():
        os.remove(path)
    for group in glob.glob(os.path.join(ROOT, _GROUP_GLOB)):
        os.remove(group)
    shutil.rmtree(BUILD_DIR, ignore_errors=True)


def build() -> bool:
    """Compile MODULES in place; on any failure leave none compiled (the sources run)."""
    clean()
    command = [sys.executable, "-m", "mypyc", "--ignore-missing-imports",
               "--follow-imports=silent", *map(source_of, MODULES)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        why = (((done.stdout + done.stderr)[-2000:] or f"exit status {done.returncode}")
               if done.returncode else "")
    except OSError as exc:
        why = str(exc)
    if why or stale() or any(how != "compiled" for how in status().values()):
        clean()
        sys.stderr.write(f"mypyc did not build; the modules run interpreted:\n{why}\n")
        return False
    return True


def main(argv: list[str]) -> int:
    action = argv[0] if argv else "status"
    if action == "build":
        build()
    elif action == "clean":
        clean()
    elif action != "status":
        sys.stderr.write(__doc__ or "")
        return 2
    for module, how in status().items():
        sys.stdout.write(f"{module}: {how}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
