"""RFC 4475 as the parser's conformance corpus (mpay.sip.message).

tests/sip_corpus/ holds wire bytes: valid/ must parse, invalid/ must raise ParseError,
semantic/ parse but are refused above the parser (each test below says by what).
"""

import os

from twisted.trial import unittest

from mpay.sip.message import (
    ParseError, Request, Response, make_response, parse, parse_name_addr, parse_uri,
)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sip_corpus")


def corpus(kind: str, name: str) -> bytes:
    with open(os.path.join(CORPUS, kind, name + ".sip"), "rb") as handle:
        return handle.read()


def corpus_names(kind: str) -> list[str]:
    return sorted(f[:-4] for f in os.listdir(os.path.join(CORPUS, kind)) if f.endswith(".sip"))


def without_length(message: Request | Response) -> tuple:
    fields = [(n, v) for n, v in message.headers if n != "Content-Length"]
    return fields, message.body, message.to_bytes().split(b"\r\n", 1)[0]


class RFC4475ValidTests(unittest.TestCase):
    """RFC 4475 3.1.1: well-formed, however tortuous.  Each parses and round-trips."""

    def test_every_valid_message_parses_and_round_trips(self):
        names = corpus_names("valid") + corpus_names("semantic")
        self.assertGreaterEqual(len(names), 20)
        for name in names:
            message = parse(corpus("valid" if name in corpus_names("valid") else "semantic", name))
            wire = message.to_bytes()
            again = parse(wire)
            self.assertEqual(again.to_bytes(), wire, name)
            # the same fields and body; only a missing Content-Length (inv2543) was added
            self.assertEqual(without_length(again), without_length(message), name)

    def test_wsinv_short_tortuous_invite(self):
        m = parse(corpus("valid", "wsinv"))
        self.assertEqual((m.method, m.uri),
                         ("INVITE", "sip:vivekg@chair-dnrc.example.com;unknownparam"))
        self.assertEqual(m.to_addr.tag, "1918181833n")
        self.assertEqual(m.to_addr.uri, "sip:vivekg@chair-dnrc.example.com")
        self.assertEqual(m.from_addr.display, 'J Rosenberg \\"')
        self.assertEqual(m.from_addr.tag, "98asjd8")
        self.assertEqual(m.headers.get("max-forwards"), "0068")
        self.assertEqual(m.cseq, (9, "INVITE"))
        self.assertEqual([(v.transport, v.host, v.branch) for v in m.vias], [
            ("UDP", "192.0.2.2", "390skdjuw"), ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
            ("UDP", "192.168.255.111", "z9hG4bK30239")])
        self.assertEqual(m.headers.get("Subject"), "")
        self.assertEqual(m.headers.get("newfangledheader"),
                         "newfangled value continued newfangled value")
        self.assertEqual(m.headers.get("UnknownHeaderWithUnusualValue"), ";;,,;;,;")
        contact = parse_name_addr(m.headers.get("m"))
        self.assertEqual(contact.display, 'Quoted string ""')
        self.assertEqual(contact.params, {"newparam": "newvalue", "secondparam": None, "q": "0.33"})
        self.assertEqual(len(m.body), 150)

    def test_intmeth_wide_range_of_valid_characters(self):
        m = parse(corpus("valid", "intmeth"))
        self.assertEqual(m.method, "!interesting-Method0123456789_*+`.%indeed'~")
        self.assertEqual(m.cseq, (139122385, m.method))
        self.assertEqual(m.to_addr.display, "BEL:\x07 NUL:\x00 DEL:\x7f")
        self.assertEqual(m.from_addr.display, "token1~` token2'+_ token3*%!.-")
        self.assertEqual(m.from_addr.tag, "_token~1'+`*%!-.")
        self.assertEqual(m.top_via.branch, "z9hG4bK-.!%66*_+`'~")
        self.assertEqual(m.call_id, "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{")
        self.assertEqual(m.headers.get("extensionHeader-!.%*+_`'~"), "\ufeff\u5927\u505c\u96fb")

    def test_escapes_are_left_alone(self):
        m = parse(corpus("valid", "esc01"))
        self.assertEqual(parse_uri(m.uri).user, "sips%3Auser%40example.com")
        self.assertEqual(parse_uri(m.from_addr.uri).user, "I%20have%20spaces")
        contact = parse_uri(parse_name_addr(m.headers.get("Contact")).uri)
        self.assertEqual(contact.params, {"%6c%72": None, "n%61me": "v%61lue%25%34%31"})
        m = parse(corpus("valid", "escnull"))
        self.assertEqual(m.headers.getall("Contact"),
                         ["<sip:%00@host5.example.com>", "<sip:%00%00@host5.example.com>"])
        m = parse(corpus("valid", "esc02"))
        self.assertEqual(m.method, "RE%47IST%45R")
        self.assertEqual(len(m.headers.getall("Contact")), 2)
        self.assertEqual(m.headers.get("C%6Fntact"), "<sip:alias2@host2.example.com>")

    def test_lwsdisp_display_name_without_space(self):
        self.assertEqual(parse(corpus("valid", "lwsdisp")).from_addr.display, "caller")

    def test_longreq_many_vias_in_every_case_and_compact_form(self):
        m = parse(corpus("valid", "longreq"))
        self.assertEqual(len(m.vias), 34)
        self.assertEqual([v.host for v in m.vias[:3]],
                         ["sip33.example.com", "sip32.example.com", "sip31.example.com"])
        self.assertEqual(m.vias[-1].received, "192.0.2.5")
        self.assertTrue(m.to_addr.display.endswith("extreme proportion"))
        self.assertTrue(m.from_addr.tag.endswith("424"))

    def test_dblreq_second_request_in_the_datagram_is_ignored(self):
        m = parse(corpus("valid", "dblreq"))
        self.assertEqual((m.method, m.body), ("REGISTER", b""))

    def test_semiuri_and_folded_accept_list(self):
        m = parse(corpus("valid", "semiuri"))
        self.assertEqual(parse_uri(m.uri).user, "user;par=u%40example.net")
        self.assertEqual(m.headers.getall("Accept"), [
            "application/sdp", "application/pkcs7-mime", "multipart/mixed",
            "multipart/signed", "message/sip", "message/sipfrag"])

    def test_transports(self):
        m = parse(corpus("valid", "transports"))
        self.assertEqual([v.transport for v in m.vias], ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"])

    def test_mpart01_binary_body_is_kept_byte_for_byte(self):
        data = corpus("valid", "mpart01")
        m = parse(data)
        self.assertEqual(m.body, data[data.index(b"\r\n\r\n") + 4:])
        self.assertIn(b"\x00\x01\x02", m.body)

    def test_unreason_and_noreason(self):
        m = parse(corpus("valid", "unreason"))
        self.assertEqual(m.status, 200)
        self.assertTrue(m.reason.startswith("= 2**3 * 5**2 \u043d\u043e \u0441\u0442\u043e"))
        m = parse(corpus("valid", "noreason"))
        self.assertEqual((m.status, m.reason), (100, ""))
        self.assertTrue(m.to_bytes().startswith(b"SIP/2.0 100 \r\n"))


# name -> (status, answered).  Answered: the ParseError carries the request, so a response
# can be addressed.  Dropped: Via, From, To, Call-ID or CSeq is unusable (or a response).
INVALID = {
    "badinv01": (400, False),    # empty Via params: the top Via itself is unusable
    "clerr": (400, True),        # Content-Length larger than the datagram
    "ncl": (400, True),          # negative Content-Length
    "scalar02": (400, False),    # CSeq over 2**31-1: no CSeq to answer with
    "scalarlg": (400, False),    # a response: never answered
    "quotbal": (400, False),     # unterminated quote in To
    "ltgtruri": (400, True),     # <> around the Request-URI
    "lwsruri": (400, True),      # LWS inside the Request-URI
    "lwsstart": (400, True),     # several SP between Request-Line elements
    "trws": (400, True),         # SP after the SIP-Version
    "badaspec": (400, False),    # spaces inside <> in To
    "baddn": (400, False),       # unquoted display name with a comma
    "badvers": (505, True),      # SIP/7.0
    "mismatch01": (400, True),   # CSeq method differs from the request method
    "mismatch02": (400, True),
    "bigcode": (400, False),     # status code of ten digits
    "insuf": (400, False),       # no From, To, Call-ID: nothing to address
    "multi01": (400, True),      # two CSeq, Call-ID, From, To
    "mcl01": (400, True),        # two Content-Length
}


class RFC4475InvalidTests(unittest.TestCase):
    def test_every_invalid_message_is_a_parse_error_with_the_right_fate(self):
        self.assertEqual(sorted(INVALID), corpus_names("invalid"))
        for name, (status, answered) in INVALID.items():
            with self.assertRaises(ParseError, msg=name) as caught:
                parse(corpus("invalid", name))
            self.assertEqual(caught.exception.status, status, name)
            self.assertEqual(caught.exception.message is not None, answered, name)

    def test_answerable_errors_get_a_response_addressed_to_the_sender(self):
        for name, (status, answered) in INVALID.items():
            if not answered:
                continue
            try:
                parse(corpus("invalid", name))
            except ParseError as e:
                request, error = e.message, e
            response = parse(make_response(request, error.status, error.reason).to_bytes())
            self.assertEqual(response.status, status, name)
            self.assertEqual(response.headers.getall("Via"), request.headers.getall("Via"))
            self.assertEqual(response.call_id, request.call_id)
            self.assertEqual(response.cseq, request.cseq)

    def test_reasons_say_what_was_wrong(self):
        reasons = {}
        for name in ("clerr", "ncl", "scalar02", "badvers", "mismatch01", "insuf", "mcl01"):
            try:
                parse(corpus("invalid", name))
            except ParseError as e:
                reasons[name] = e.reason
        self.assertEqual(reasons, {
            "clerr": "Content-Length Exceeds Body", "ncl": "Bad Content-Length",
            "scalar02": "Bad CSeq", "badvers": "Version Not Supported",
            "mismatch01": "CSeq Method Mismatch", "insuf": "Missing From",
            "mcl01": "Multiple Content-Length"})


class RFC4475SemanticTests(unittest.TestCase):
    """Syntactically fine; the layer above refuses them with the helper named here."""

    def test_escruri_headers_in_request_uri_are_visible(self):
        m = parse(corpus("semantic", "escruri"))
        self.assertEqual(parse_uri(m.uri).headers, "Route=%3Csip:example.com%3E")

    def test_regbadct_contact_uri_with_headers_outside_brackets(self):
        m = parse(corpus("semantic", "regbadct"))
        with self.assertRaises(ParseError):
            parse_name_addr(m.headers.get("Contact"))

    def test_baddate_is_opaque(self):
        self.assertEqual(parse(corpus("semantic", "baddate")).headers.get("Date"),
                         "Fri, 01 Jan 2010 16:00:00 EST")

    def test_bcast_broadcast_via_is_visible_to_routing(self):
        self.assertEqual(parse(corpus("semantic", "bcast")).vias[1].host, "255.255.255.255")

    def test_badbranch_bare_magic_cookie_is_no_transaction_id(self):
        via = parse(corpus("semantic", "badbranch")).top_via
        self.assertEqual((via.branch, via.rfc3261_branch), ("z9hG4bK", None))

    def test_unknown_uri_scheme_is_416(self):
        with self.assertRaises(ParseError) as caught:
            parse_uri(parse(corpus("semantic", "unkscm")).uri)
        self.assertEqual(caught.exception.status, 416)

    def test_zero_max_forwards_and_rfc2543_request_parse(self):
        self.assertEqual(parse(corpus("semantic", "zeromf")).headers.get("Max-Forwards"), "0")
        m = parse(corpus("semantic", "inv2543"))
        self.assertIsNone(m.top_via.branch)
        self.assertTrue(m.body.startswith(b"v=0"))
