"""``make demo``: a newcomer's first five minutes, against the server of ``make run``.

Enrols a consumer, a payee and a merchant through the simulated caller-ID
modem, tops the consumer up through the settlement account, then walks a
credit transfer, a concealed transfer and an anonymous event charge by OTCN,
printing each step, its outcome and the balances, and ends with the audit.
Charged-by-time sessions join when they land (issue 6).
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
