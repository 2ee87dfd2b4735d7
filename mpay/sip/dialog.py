"""A dialog as one side keeps it (RFC 3261 section 12), enough to send BYE.

The PS is a back-to-back user agent in a timed session: one dialog with the
merchant (opened by the merchant's RECEIVE) and one with the consumer
(opened by the PS's RECEIVE).  Either can end with a BYE from the PS, also
after a restart, so a dialog is plain data that round-trips through JSON and
is kept in the ledger's session row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from mpay.sip.headers import ParseError, parse_name_addr
from mpay.sip.message import Request, Response
from mpay.sip.peers import Relayed
from mpay.sip.stream import Flow, transport_of
from mpay.sip.useragent import build_request


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str
    remote_uri: str
    remote_target: str            # where in-dialog requests are addressed (the peer's Contact)
    peer: tuple[str, int]         # where they are sent (the peer's source address)
    local_cseq: int               # the last CSeq this side used

    @classmethod
    def as_uas(cls, request: Request, local_tag: str, peer: tuple[str, int]) -> Dialog:
        """The dialog a 2xx to *request* creates on our side (we answered it)."""
        return cls(request.call_id, local_tag, request.from_addr.tag or "",
                   request.to_addr.uri, request.from_addr.uri, _target(request, request.from_addr.uri),
                   peer, 0)

    @classmethod
    def as_uac(cls, request: Request, response: Response, peer: tuple[str, int]) -> Dialog:
        """The dialog *response* (a 2xx) creates for *request*, which we sent."""
        return cls(request.call_id, request.from_addr.tag or "", response.to_addr.tag or "",
                   request.from_addr.uri, request.to_addr.uri, _target(response, request.uri),
                   peer, request.cseq[0])

    def request(self, method: str, sent_by: tuple[str, int], **kwargs: Any) -> Request:
        """The next in-dialog request (CSeq one up, RFC 3261 12.2.1.1)."""
        self.local_cseq += 1
        return build_request(method, self.remote_target, sent_by=sent_by, from_uri=self.local_uri,
                             to_uri=self.remote_uri, call_id=self.call_id, cseq=self.local_cseq,
                             from_tag=self.local_tag, to_tag=self.remote_tag, **kwargs)

    def to_json(self) -> dict[str, Any]:
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        data["peer"] = [self.peer[0], self.peer[1], transport_of(self.peer)]
        if isinstance(self.peer, Relayed):
            data["peer"] += [self.peer.via, self.peer.local]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dialog:
        """A stored dialog; a stream peer comes back as a flow to be resolved when sent on."""
        values = dict(data)
        host, port, *rest = values["peer"]
        transport = rest[0] if rest else "UDP"
        if len(rest) == 3:
            values["peer"] = Relayed(str(host), int(port), transport, rest[1], rest[2])
        else:
            values["peer"] = (str(host), int(port)) if transport == "UDP" else \
                Flow(str(host), int(port), transport)
        return cls(**values)


def _target(message: Request | Response, fallback: str) -> str:
    """The URI of the message's Contact, or *fallback* when it has none we can read."""
    contact = message.headers.get("Contact")
    if contact:
        try:
            return parse_name_addr(contact).uri
        except (ParseError, ValueError):
            pass
    return fallback
