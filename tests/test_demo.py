"""`make demo` walks its whole story against a running server (so it cannot rot)."""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mpay.cli.demo import demo

from tests.flow import MpayFixture


class DemoTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_demo_enrols_pays_charges_and_audits(self):
        mpay = MpayFixture(self)
        yield mpay.start()
        # The demo reads the listeners from the config: give it the ports the fixture got.
        cfg = mpay.config
        cfg["as"]["listen"] = f"udp:{mpay.address('as')[1]}:interface=127.0.0.1"
        cfg["ps"]["listen"] = f"udp:{mpay.address('ps')[1]}:interface=127.0.0.1"
        lines = []
        yield demo(reactor, cfg, state_dir=mpay.dir, out=lines.append)
        text = "\n".join(lines)
        self.assertIn("payee was told by +886912345678", text)
        self.assertIn("the payee saw: anonymous", text)
        self.assertIn("merchant got 200 OK, from <sip:anonymous@anonymous.invalid>", text)
        self.assertIn("the same OTCN again: 404 Unknown OTCN", text)
        self.assertIn("balances: consumer 6000, payee 2800, merchant 1200", text)
        self.assertIn("consumer's phone: pay 100 per second to +886223334444? yes", text)
        self.assertIn('Credit Exhausted', text)
        self.assertIn("balances: consumer 0, payee 2800, merchant 7200", text)
        self.assertIn("audit OK", text)
