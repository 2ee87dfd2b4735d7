"""``make demo``: a newcomer's first five minutes, against the server of ``make run``.

Enrols a consumer, a payee and a merchant through the simulated caller-ID
modem, tops the consumer up through the settlement account, then walks a
credit transfer, a concealed transfer, an anonymous event charge by OTCN and
two sessions charged by time (one ended by the merchant's BYE, one by Timer C
when the consumer's money runs out), printing each step, its outcome and the
balances, and ends with the audit.
"""

from __future__ import annotations

import os
import sys
import uuid

from twisted.internet import defer, task

from mpay import config as mpay_config
from mpay.cli.dmd import DEFAULT_CONFIG, start_device
from mpay.ledger import store_opener
from mpay.sim.device import DeviceState

CONSUMER, PAYEE, MERCHANT = "+886912345678", "+886987654321", "+886223334444"
TOP_UP_MINOR = 10_000
SESSION_RATE_PER_S = 100          # the first timed session: ended by the merchant
SESSION_LENGTH_S = 1.5
EXHAUSTING_RATE_PER_S = 2_000     # the second: runs until the consumer's money is gone
POLL_S = 0.1
MAX_SESSION_WAIT_S = 30.0


@defer.inlineCallbacks
def demo(reactor, cfg: mpay_config.Config, state_dir: str = "var", out=print):
    def step(text: str) -> None:
        out(f"\n== {text}")

    store = store_opener(cfg["ledger"])(migrate=False)
    devices, stops = {}, []
    try:
        for role, number in (("consumer", CONSUMER), ("payee", PAYEE), ("merchant", MERCHANT)):
            step(f"enrol the {role} {number}: REGISTER, 401, REFER, the call, NOTIFY, 200")
            device, stop = start_device(reactor, cfg, DeviceState.new(number),
                                        os.path.join(state_dir, "dmd", f"{number}.json"), quiet=True)
            stops.append(stop)
            yield device.enroll()
            yield device.get_ticket()
            yield device.register()
            out("   enrolled, ticket issued, registered at the PS")
            devices[role] = device
        consumer, payee, merchant = devices["consumer"], devices["payee"], devices["merchant"]

        def balances():
            shown = [f"{name} {store.balance(number).balance}" for name, number in
                     (("consumer", CONSUMER), ("payee", PAYEE), ("merchant", MERCHANT))]
            out("   balances: " + ", ".join(shown) + f" ({cfg['ledger']['currency']} minor units)")

        step(f"top up the consumer with {TOP_UP_MINOR} through the settlement account")
        store.cash_in(CONSUMER, TOP_UP_MINOR, f"demo-{uuid.uuid4()}")
        balances()

        step("credit transfer: consumer pays the payee 2500 (MESSAGE, signed by the payer)")
        response, receipt = yield consumer.transfer(PAYEE, 2500)
        out(f"   {response.status} {response.reason}; receipt #{receipt.journal_id} verified; "
              f"payee was told by {payee.notices[-1]['from']}")
        balances()

        step("concealed transfer: 300, the payee must not learn who paid")
        response, receipt = yield consumer.transfer(PAYEE, 300, conceal=True)
        out(f"   {response.status} {response.reason}; the payee saw: {payee.notices[-1]['from']}")
        balances()

        step("anonymous event charge: the consumer shows an OTCN, the merchant charges 1200")
        grant = yield consumer.request_otcn(cap=5000)
        out(f"   OTCN {grant['display']} (single use, cap 5000)")
        consumer.charge_policy = lambda asked: (out(f"   consumer's phone: pay {asked['amount']} to "
                                                     f"{asked['merchant']}? yes") or 200)
        response = yield merchant.charge(grant["otcn"], 1200)
        out(f"   merchant got {response.status} {response.reason}, from "
              f"{response.headers.get('P-Asserted-Identity')}")
        response = yield merchant.charge(grant["otcn"], 1200)
        out(f"   the same OTCN again: {response.status} {response.reason}")
        balances()

        step(f"charged by time: a session at {SESSION_RATE_PER_S} per second, "
             f"the merchant hangs up after {SESSION_LENGTH_S} s")
        consumer.charge_policy = lambda asked: (out(
            f"   consumer's phone: pay {asked['rate']} per second to {asked['merchant']}? yes")
            or 200)
        response = yield merchant.charge(CONSUMER, rate=SESSION_RATE_PER_S)
        out(f"   merchant got {response.status} {response.reason}; the consumer's money is held")
        yield task.deferLater(reactor, SESSION_LENGTH_S, lambda: None)
        end = yield merchant.end_session(response.call_id)
        out(f"   BYE: charged {end['charged']} (rate x elapsed, rounded up to the minor unit); "
            f"receipt #{end['receipt'].journal_id} verified")
        balances()

        step(f"a session at {EXHAUSTING_RATE_PER_S} per second that the money runs out on")
        response = yield merchant.charge(CONSUMER, rate=EXHAUSTING_RATE_PER_S)
        out(f"   merchant got {response.status} {response.reason}; Timer C is armed for when "
            f"the consumer's money runs out")
        for _ in range(int(MAX_SESSION_WAIT_S / POLL_S)):
            if len(merchant.session_ends) > 1 and len(consumer.session_ends) > 1:
                break
            yield task.deferLater(reactor, POLL_S, lambda: None)
        end = merchant.session_ends[-1]
        out(f"   Timer C: the PS sent BYE to both sides ({end['reason']}); charged "
            f"{end['charged']}, exactly what was left")
        balances()

        step("audit: every balance recomputed from the journal")
        report = store.audit()
        out("   " + report.format().replace("\n", "\n   "))
        if not report.ok:
            raise SystemExit(1)
    finally:
        for stop in stops:
            yield stop()
        store.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    try:
        cfg = mpay_config.load(path)
        task.react(lambda reactor: demo(reactor, cfg, out=lambda text: print(text, flush=True)))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
