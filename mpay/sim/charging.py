"""The DMD's side of charging: a consumer asked to pay, a merchant charging, timed sessions.

Mixed into :class:`~mpay.sim.device.Device`, whose endpoint, state and
helpers it uses.  A consumer answers a charge request with 180 at once and
then the person's decision (``charge_policy``); a merchant charges a fixed
amount or opens a session at a rate and ends it with BYE; either side hears
the PS's BYE when the other hung up, the money ran out, or the PS restarted.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from mpay.payment import receipt as receipts
from mpay.sip.dialog import Dialog
from mpay.sip.message import Request
from mpay.sip.useragent import build_request


class ChargingSide:
    """Charge requests, charges and timed sessions; see the module docstring."""

    def _on_charge(self, txn: Any, request: Request) -> None:
        """A merchant asks this consumer to pay: 180 at once, then the person's answer."""
        try:
            asked = json.loads(request.body)
            if not isinstance(asked, dict):
                raise ValueError("not an object")
        except ValueError:
            txn.respond_with(400, "Bad Charge Request")
            return
        self.charge_requests.append(asked)
        txn.respond_with(180)
        decision = self.charge_policy(asked) if self.charge_policy is not None else 603

        def answer(status: int | None) -> None:
            if status is None or txn.final:
                return
            headers = []
            if 200 <= status < 300 and "rate" in asked:   # a timed session: a dialog to keep
                host, port = self.endpoint.sent_by
                headers.append(("Contact", f"<sip:{self.state.number}@{host}:{port}>"))
                self.sessions[request.call_id] = Dialog.as_uas(request, txn.to_tag, self.ps_addr)
            txn.respond_with(status, headers=headers)

        if isinstance(decision, defer.Deferred):
            decision.addCallback(answer).addErrback(lambda f: answer(603))
        else:
            answer(decision)

    @defer.inlineCallbacks
    def charge(self, target: str, amount: int | None = None, rate: int | None = None):
        """As a merchant: charge *target* (a number or an OTCN) an *amount*, or open a
        session at *rate* per second (ended by :meth:`end_session` or by the PS)."""
        from mpay.payment.receive import CHARGE_CONTENT_TYPE

        uri = f"sip:{target}@{self.domain}"
        body = {"amount": amount} if rate is None else {"rate": rate}
        request = self._request("RECEIVE", uri, to_uri=uri, body=json.dumps(body).encode(),
                                content_type=CHARGE_CONTENT_TYPE)
        response = yield self.endpoint.send_request(self.authenticate(request), self.ps_addr)
        if 200 <= response.status < 300:
            ack = build_request("ACK", uri, sent_by=self.endpoint.sent_by, from_uri=self.uri, to_uri=uri,
                                call_id=request.call_id, cseq=request.cseq[0],
                                from_tag=request.from_addr.tag, to_tag=response.to_addr.tag)
            if rate is not None:
                self.sessions[request.call_id] = Dialog.as_uac(request, response, self.ps_addr)
            self.endpoint.send(ack.to_bytes(), self.ps_addr)
        return response

    @defer.inlineCallbacks
    def end_session(self, call_id: str):
        """BYE: end a timed session (as merchant or consumer); the PS's 200 says the charge."""
        dialog = self.sessions.pop(call_id)
        request = dialog.request("BYE", self.endpoint.sent_by)
        response = yield self.endpoint.send_request(self.authenticate(request), self.ps_addr)
        self._expect(response, 200, "BYE")
        return self._session_ended(call_id, "me", response)

    def _on_bye(self, txn: Any, request: Request) -> None:
        """The PS ends a session: the other side hung up, the money ran out, or a restart."""
        if self.sessions.pop(request.call_id, None) is None:
            txn.respond_with(481, "No Such Session")
            return
        txn.respond_with(200)
        self._session_ended(request.call_id, "peer", request)

    def _session_ended(self, call_id: str, by: str, message: Any) -> dict:
        try:
            told = json.loads(message.body) if message.body else {}
        except ValueError:
            told = {}
        end = {"call_id": call_id, "by": by, "charged": told.get("charged"),
               "currency": told.get("currency"), "reason": message.headers.get("Reason"),
               "receipt": None}
        header = message.headers.get(receipts.RECEIPT_HEADER)
        if header and self.pinned_ps_key is not None:
            end["receipt"] = receipts.verify_receipt(self.pinned_ps_key, header)
        self.session_ends.append(end)
        if self.on_session_end is not None:
            self.on_session_end(end)
        self.log.info("dmd {number}: session ended by {by}, charged {charged}",
                      number=self.state.number, by=by, charged=end["charged"])
        return end
