"""The mypyc-compiled modules: the Makefile builds what mpay.compiled names, never stale."""

import importlib
import importlib.machinery
import os
import re
import subprocess
import sys

from twisted.trial import unittest

from mpay import compiled


class CompiledTests(unittest.TestCase):
    def test_the_makefile_compiles_the_modules_named_in_mpay_compiled(self):
        with open(os.path.join(compiled.ROOT, "Makefile")) as makefile:
            text = makefile.read().replace("\\\n", " ")       # continued lines joined
        listed = re.search(r"^COMPILED := (.*)$", text, re.M).group(1).split()
        self.assertEqual(listed, [os.path.relpath(compiled.source_of(m), compiled.ROOT)
                                  for m in compiled.MODULES])

    def test_no_extension_is_older_than_its_source(self):
        self.assertEqual(compiled.stale(), [])

    def test_an_edited_source_makes_its_extension_stale(self):
        root, module = self.mktemp(), compiled.MODULES[0]
        source = compiled.source_of(module, root)
        os.makedirs(os.path.dirname(source))
        extension = source[:-3] + importlib.machinery.EXTENSION_SUFFIXES[0]
        for path, mtime in ((source, 100), (extension, 200)):
            with open(path, "w"):
                pass
            os.utime(path, (mtime, mtime))
        self.assertEqual(compiled.stale(root), [], "built after the source")
        os.utime(source, (300, 300))
        self.assertEqual(compiled.stale(root), [module])

    def test_an_extension_left_from_another_build_is_stale(self):
        root = self.mktemp()
        os.makedirs(os.path.join(root, "mpay", "sip"))
        for name in ("gone.py", "gone" + importlib.machinery.EXTENSION_SUFFIXES[0]):
            with open(os.path.join(root, "mpay", "sip", name), "w"):
                pass
        self.assertEqual(compiled.stale(root), ["mpay.sip.gone"], "not in MODULES: it would run")

    def test_status_says_how_each_module_runs(self):
        for module, how in compiled.status().items():
            self.assertEqual(how, "compiled" if module in compiled.extensions() else "interpreted")


class InterpretedTests(unittest.TestCase):
    """The suite runs compiled when built; the suites of the compiled modules run here on the
    sources (the transfer flow over UDP only)."""

    SUITES = ("tests.test_sip_message", "tests.test_sip_fuzz", "tests.test_sip_rfc4475",
              "tests.test_transaction", "tests.test_tickets", "tests.test_crypto",
              "tests.test_bodies", "tests.test_linger", "tests.test_receipt_groups",
              "tests.test_e164", "tests.test_endpoint", "tests.test_timewheel",
              "tests.test_transfer_flow.TransferTests",
              "tests.test_compiled.SourcesTests")

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_the_sip_suites_pass_on_the_sources(self):
        env = dict(os.environ, MPAY_INTERPRETED="1", PYTHONPATH=compiled.ROOT)
        done = subprocess.run([sys.executable, "-m", "twisted.trial", *self.SUITES],
                              cwd=self.mktemp_dir(), env=env,
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-2000:])
        self.assertIn("PASSED", done.stdout)


class SourcesTests(unittest.TestCase):
    """Run by InterpretedTests: there every compiled module must be its source."""

    def test_each_module_runs_from_its_source_when_asked(self):
        if not os.environ.get("MPAY_INTERPRETED"):
            self.assertFalse(compiled.interpreted_by_request())
            return
        self.assertEqual(set(compiled.status().values()), {"interpreted"})
        importlib.import_module("mpay.sip.message")       # first: parser.py needs it
        for module in compiled.MODULES:
            self.assertEqual(importlib.import_module(module).__file__, compiled.source_of(module))
