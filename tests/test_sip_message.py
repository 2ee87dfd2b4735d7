"""mpay.sip.message: RFC 3261 parsing and serialisation (RFC 4475's corpus: test_sip_rfc4475)."""

import os
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from twisted.trial import unittest

from mpay.sip.headers import split_list
from mpay.sip.useragent import build_request
from mpay.sip.message import (
    MAX_HEADER_FIELDS, MAX_HEADER_LINE_BYTES, MAX_MESSAGE_BYTES, Headers, ParseError, Request,
    Via, make_response, parse, parse_cseq, parse_name_addr, parse_uri, parse_via,
)

REGISTER = (
    b"REGISTER sip:mpay.example.net SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.7:5061;branch=z9hG4bK-74bf9;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:+886912345678@mpay.example.net>;tag=5e00e125\r\n"
    b"To: <sip:+886912345678@mpay.example.net>\r\n"
    b"Call-ID: a84b4c76e66710@198.51.100.7\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Contact: <sip:+886912345678@198.51.100.7:5061>;expires=3600\r\n"
    b"Content-Length: 0\r\n\r\n")


def with_header(data: bytes, line: bytes, replace: bytes | None = None) -> bytes:
    """REGISTER-like bytes with one header line added (before Content-Length) or replaced."""
    if replace is not None:
        start = data.index(replace)
        return data[:start] + line + data[data.index(b"\r\n", start):]
    at = data.index(b"Content-Length")
    return data[:at] + line + b"\r\n" + data[at:]


class FramingTests(unittest.TestCase):
    """Line endings, folding, Content-Length on datagrams, limits."""

    def test_compact_forms_become_canonical_long_names(self):
        compact = (b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                   b"f: <sip:x@y>;tag=1\r\nt: <sip:a@b>\r\ni: c1\r\nCSeq: 1 OPTIONS\r\n"
                   b"m: <sip:x@h>\r\nk: timer\r\nc: text/plain\r\ns: hi\r\no: refer\r\n"
                   b"r: <sip:z@q>\r\nu: talk\r\ne: gzip\r\nl: 2\r\n\r\nhi")
        m = parse(compact)
        self.assertEqual([name for name, _ in m.headers], [
            "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Supported", "Content-Type",
            "Subject", "Event", "Refer-To", "Allow-Events", "Content-Encoding", "Content-Length"])
        self.assertIn(b"\r\nCall-ID: c1\r\n", m.to_bytes())
        self.assertEqual(m.body, b"hi")

    def test_names_are_case_insensitive_and_unknown_names_keep_their_spelling(self):
        m = parse(with_header(REGISTER, b"X-Mpay-Ticket: abc"))
        for name in ("CALL-ID", "call-id", "i", "I", "Call-Id"):
            self.assertEqual(m.headers.get(name), "a84b4c76e66710@198.51.100.7")
        self.assertEqual(m.headers.get("x-mpay-ticket"), "abc")
        self.assertIn(("X-Mpay-Ticket", "abc"), list(m.headers))

    def test_bare_lf_and_mixed_line_endings(self):
        lf = REGISTER.replace(b"\r\n", b"\n")
        self.assertEqual(parse(lf), parse(REGISTER))
        mixed = REGISTER.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\n")
        self.assertEqual(parse(mixed), parse(REGISTER))

    def test_leading_crlfs_are_ignored_and_a_bare_cr_is_not(self):
        self.assertEqual(parse(b"\r\n\r\n" + REGISTER), parse(REGISTER))
        with self.assertRaises(ParseError):
            parse(REGISTER.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\rX: y\r\n"))
        for empty in (b"", b"\r\n", b"\r\n\r\n"):
            self.assertRaises(ParseError, parse, empty)

    def test_folded_lines_unfold_to_one_space(self):
        m = parse(with_header(REGISTER, b"Subject: one\r\n  two\r\n\tthree"))
        self.assertEqual(m.headers.get("Subject"), "one two three")

    def test_list_headers_split_but_not_inside_quotes_or_brackets(self):
        m = parse(with_header(REGISTER, b'Contact: "Lee, Ann" <sip:a@h;x=1,2>, <sip:b@h>\r\n'
                                        b"Allow: INVITE,ACK , MESSAGE\r\nContact: *"))
        self.assertEqual(m.headers.getall("Contact"), [
            "<sip:+886912345678@198.51.100.7:5061>;expires=3600",
            '"Lee, Ann" <sip:a@h;x=1,2>', "<sip:b@h>", "*"])
        self.assertEqual(m.headers.getall("Allow"), ["INVITE", "ACK", "MESSAGE"])
        self.assertEqual(parse_name_addr(m.headers.getall("Contact")[-1]).uri, "*")
        wire = m.to_bytes()        # token lists on one line, addresses one per line
        self.assertIn(b"\r\nAllow: INVITE, ACK, MESSAGE\r\n", wire)
        self.assertEqual(wire.count(b"\r\nContact: "), 4)

    def test_list_elements_with_quotes_or_brackets_keep_their_own_line(self):
        m = parse(REGISTER)
        for value in ('"', "ACK", 'text/x;q="1,2"', "<odd", "INFO"):
            m.headers.add("Allow", value)
        self.assertEqual(parse(m.to_bytes()).headers.getall("Allow"),
                         ['"', "ACK", 'text/x;q="1,2"', "<odd", "INFO"])

    def test_a_long_token_list_is_written_on_several_lines(self):
        many = ", ".join(f"ext-{i:04d}" for i in range(400))
        m = parse(with_header(REGISTER, f"Supported: {many}".encode()))
        wire = m.to_bytes()
        self.assertGreater(wire.count(b"\r\nSupported: "), 1)
        self.assertEqual(parse(wire).headers.getall("Supported"), many.split(", "))

    def test_credentials_and_dates_are_not_split(self):
        auth = 'Digest username="a", realm="b", nonce="c"'
        m = parse(with_header(REGISTER, f"Authorization: {auth}\r\nDate: Sat, 13 Nov 2010 "
                                        "23:29:00 GMT".encode()))
        self.assertEqual(m.headers.getall("Authorization"), [auth])
        self.assertEqual(len(m.headers.getall("Date")), 1)

    def test_multiple_vias_in_order(self):
        m = parse(with_header(REGISTER, b"Via: SIP/2.0/TCP p1:5070;branch=z9hG4bKp1, "
                                        b"SIP/2.0/UDP [2001:db8::9];received=192.0.2.1",
                              replace=b"Max-Forwards"))
        self.assertEqual([(v.host, v.port) for v in m.vias],
                         [("198.51.100.7", 5061), ("p1", 5070), ("2001:db8::9", None)])

    def test_missing_content_length_on_a_datagram_means_the_rest(self):
        data = REGISTER.replace(b"Content-Length: 0\r\n", b"") + b"payload"
        self.assertEqual(parse(data).body, b"payload")

    def test_shorter_content_length_truncates_longer_is_400(self):
        m = parse(REGISTER.replace(b"Length: 0", b"Length: 3") + b"abcdef")
        self.assertEqual(m.body, b"abc")
        for bad in (b"7", b"-1", b"x", b"1e3", b"\xd9\xa3", b"9" * 50):
            with self.assertRaises(ParseError) as caught:
                parse(REGISTER.replace(b"Length: 0", b"Length: " + bad) + b"abcdef")
            self.assertEqual(caught.exception.status, 400)
            self.assertIsNotNone(caught.exception.message)

    def test_missing_mandatory_headers_are_dropped_but_max_forwards_is_optional(self):
        for line in (b"Via:", b"From:", b"To:", b"Call-ID:", b"CSeq:"):
            start = REGISTER.index(line)
            data = REGISTER[:start] + REGISTER[REGISTER.index(b"\r\n", start) + 2:]
            with self.assertRaises(ParseError) as caught:
                parse(data)
            self.assertEqual(caught.exception.status, 400)
            self.assertIsNone(caught.exception.message)
        self.assertIsInstance(parse(REGISTER.replace(b"Max-Forwards: 70\r\n", b"")), Request)

    def test_bad_cseq(self):
        for value in (b"x REGISTER", b"-1 REGISTER", b"2147483648 REGISTER", b"1", b"1 2 3"):
            with self.assertRaises(ParseError) as caught:
                parse(with_header(REGISTER, b"CSeq: " + value, replace=b"CSeq:"))
            self.assertEqual((caught.exception.reason, caught.exception.message),
                             ("Bad CSeq", None))
        self.assertEqual(parse(with_header(REGISTER, b"CSeq: 2147483647 REGISTER",
                                           replace=b"CSeq:")).cseq, (2**31 - 1, "REGISTER"))

    def test_garbage_start_lines_are_dropped(self):
        for line in (b"HELLO", b"\x00\x01", b"SIP/2.0 OK", b"SIP/2.0 99 Low", b"<sip:a@b>",
                     b"REGISTER sip:mpay.example.net HTTP/1.1", b"REGISTER SIP/2.0"):
            with self.assertRaises(ParseError) as caught:
                parse(line + REGISTER[REGISTER.index(b"\r\n"):])
            self.assertIsNone(caught.exception.message, line)

    def test_unsupported_version_is_505_and_answered(self):
        with self.assertRaises(ParseError) as caught:
            parse(REGISTER.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
        self.assertEqual(caught.exception.status, 505)
        self.assertEqual(caught.exception.message.method, "REGISTER")

    def test_an_ack_is_never_answered(self):
        ack = REGISTER.replace(b"REGISTER", b"ACK").replace(b"Length: 0", b"Length: 9")
        with self.assertRaises(ParseError) as caught:
            parse(ack)
        self.assertIsNone(caught.exception.message)

    def test_size_limits(self):
        with self.assertRaises(ParseError) as caught:
            parse(REGISTER + b"x" * MAX_MESSAGE_BYTES)
        self.assertEqual((caught.exception.status, caught.exception.message), (513, None))
        with self.assertRaises(ParseError) as caught:
            parse(with_header(REGISTER, b"X-Big: " + b"y" * MAX_HEADER_LINE_BYTES))
        self.assertEqual(caught.exception.status, 513)
        self.assertIsNotNone(caught.exception.message)      # the fields we need were fine
        many = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADER_FIELDS))
        self.assertRaises(ParseError, parse, with_header(REGISTER, many[:-2]))

    def test_responses_parse_and_bad_ones_are_never_answered(self):
        response = make_response(parse(REGISTER), 200, to_tag="srv1")
        self.assertEqual(parse(response.to_bytes()).to_bytes(), response.to_bytes())
        wire = response.to_bytes()
        for bad in (wire.replace(b"CSeq: 2", b"CSeq: x"),
                    wire.replace(b"SIP/2.0 200", b"SIP/3.0 200"),
                    with_header(wire, b"X-Big: " + b"y" * MAX_HEADER_LINE_BYTES)):
            with self.assertRaises(ParseError) as caught:
                parse(bad)
            self.assertEqual((caught.exception.status, caught.exception.message), (400, None))


class HeaderValueTests(unittest.TestCase):
    def test_via(self):
        via = parse_via("SIP / 2.0 / udp 192.0.2.1 : 5060 ; branch = z9hG4bKx ; rport ; "
                        "received=10.0.0.1")
        self.assertEqual((via.transport, via.host, via.port, via.protocol),
                         ("UDP", "192.0.2.1", 5060, "SIP/2.0"))
        self.assertEqual((via.branch, via.rfc3261_branch, via.rport, via.received),
                         ("z9hG4bKx", "z9hG4bKx", "", "10.0.0.1"))
        self.assertEqual(via.to_str(),
                         "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx;rport;received=10.0.0.1")
        self.assertEqual(parse_via("SIP/2.0/UDP h;rport=5062").rport, "5062")
        self.assertIsNone(parse_via("SIP/2.0/UDP h").rport)
        v6 = parse_via("SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKy")
        self.assertEqual((v6.host, v6.port), ("2001:db8::1", 5061))
        self.assertEqual(parse_via(v6.to_str()), v6)
        for bad in ("", "SIP/2.0/UDP", "SIP/2.0 UDP h", "HTTP/1.1/TCP h", "SIP/2.0/UDP h:99999",
                    "SIP/2.0/UDP h;;", "SIP/2.0/UDP h;branch=", "SIP/2.0/UDP h j",
                    "SIP/2.0/UDP [::1"):
            self.assertRaises(ParseError, parse_via, bad)

    def test_name_addr_forms(self):
        cases = {
            '"Ann \\"A\\"" <sip:ann@h>;tag=9': ('Ann "A"', "sip:ann@h", {"tag": "9"}),
            "Ann Lee <sip:ann@h;lr>": ("Ann Lee", "sip:ann@h;lr", {}),
            "<sip:ann@h>": (None, "sip:ann@h", {}),
            "sip:ann@h;tag=1;x": (None, "sip:ann@h", {"tag": "1", "x": None}),
            "tel:+886912345678": (None, "tel:+886912345678", {}),
            '<sip:a@h>;+sip.instance="<urn:uuid:1;2>"': (
                None, "sip:a@h", {"+sip.instance": '"<urn:uuid:1;2>"'}),
        }
        for text, (display, uri, params) in cases.items():
            na = parse_name_addr(text)
            self.assertEqual((na.display, na.uri, na.params), (display, uri, params), text)
            self.assertEqual(parse_name_addr(na.to_str()), na, text)
        self.assertEqual(parse_name_addr("<sip:a@h>;TAG=x").tag, "x")
        for bad in ("", "<sip:a@h", '"open <sip:a@h>', "< sip:a@h >", "a,b <sip:a@h>",
                    "sip:a@h?x=y", "<sip:a@h> junk", "<sip:a@h>;", "<nouri>"):
            self.assertRaises(ParseError, parse_name_addr, bad)

    def test_cseq(self):
        self.assertEqual(parse_cseq("0009  INVITE"), (9, "INVITE"))
        self.assertEqual(parse_cseq("0 RECEIVE"), (0, "RECEIVE"))
        for bad in ("", "1", "a b", "1 IN VITE", "٣ INVITE", "00000000000000000001x A"):
            self.assertRaises(ParseError, parse_cseq, bad)

    def test_uri(self):
        uri = parse_uri("sips:+886912345678:pw@[2001:db8::2]:5061;user=phone;lr?subject=x")
        self.assertEqual((uri.scheme, uri.user, uri.password, uri.host, uri.port),
                         ("sips", "+886912345678", "pw", "2001:db8::2", 5061))
        self.assertEqual((uri.params, uri.headers), ({"user": "phone", "lr": None}, "subject=x"))
        self.assertEqual(parse_uri(uri.to_str()), uri)
        self.assertEqual(parse_uri("sip:mpay.test").user, None)
        self.assertRaises(ParseError, parse_uri, "sip:@h")
        self.assertRaises(ParseError, parse_uri, "sip:a b@h")

    def test_split_list(self):
        self.assertEqual(split_list(' a , "b,c" <sip:x>,<sip:y,z>;q=1 ,, '),
                         ["a", '"b,c" <sip:x>', "<sip:y,z>;q=1"])
        self.assertEqual(split_list(""), [])


class HeadersTests(unittest.TestCase):
    def test_multimap_operations(self):
        h = Headers([("v", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("Allow", "INVITE, ACK")])
        self.assertEqual(h.getall("Allow"), ["INVITE", "ACK"])
        h.add("Via", "SIP/2.0/UDP b;branch=z9hG4bK2", first=True)
        self.assertEqual(h.get("VIA"), "SIP/2.0/UDP b;branch=z9hG4bK2")
        h.set("allow", "MESSAGE")
        self.assertEqual(list(h)[-1], ("Allow", "MESSAGE"))
        copy = h.copy()
        h.remove("Via")
        self.assertNotIn("Via", h)
        self.assertIn("v", copy)
        self.assertEqual(len(copy), 3)
        self.assertIsNone(h.get("Via"))
        self.assertEqual(h.get("Via", "-"), "-")

    def test_values_with_line_breaks_are_refused(self):
        h = Headers()
        self.assertRaises(ValueError, h.add, "Subject", "hi\r\nVia: evil")
        self.assertRaises(ValueError, h.set, "Subject", "hi\nx")
        self.assertRaises(ValueError, h.add, "Bad Name", "x")

    def test_parsed_values_are_cached_until_headers_change(self):
        m = parse(REGISTER)
        self.assertIs(m.vias, m.vias)
        m.headers.add("Via", "SIP/2.0/TCP proxy;branch=z9hG4bKp", first=True)
        self.assertEqual(m.top_via.host, "proxy")
        m.headers = Headers([("CSeq", "5 MESSAGE")])
        self.assertEqual((m.cseq, m.vias, m.top_via), ((5, "MESSAGE"), [], None))

    def test_set_top_via(self):
        m = parse(REGISTER)
        via = m.top_via
        via.params["received"] = "203.0.113.9"
        m.set_top_via(via)
        self.assertIn(b"rport;received=203.0.113.9\r\n", m.to_bytes())
        self.assertEqual(parse(m.to_bytes()).top_via.received, "203.0.113.9")

    def test_set_top_via_keeps_the_other_parsed_values(self):
        m = parse(with_header(REGISTER, b"Via: SIP/2.0/UDP p2;branch=z9hG4bKp2"))
        cseq, to_addr, lower = m.cseq, m.to_addr, m.vias[1]
        m.set_top_via(Via("UDP", "198.51.100.1", 5070, {"branch": "z9hG4bKnew"}))
        self.assertEqual([v.host for v in m.vias], ["198.51.100.1", "p2"])
        self.assertIs(m.vias[1], lower)
        self.assertEqual(m.cseq, cseq)
        self.assertIsNotNone(m._cseq, "still cached")    # compiled, a tuple is boxed anew
        self.assertIs(m.to_addr, to_addr)
        self.assertEqual([v.host for v in parse(m.to_bytes()).vias], ["198.51.100.1", "p2"])
        m.headers.set("CSeq", "9 REGISTER")          # any other change still drops the caches
        self.assertEqual(m.cseq, (9, "REGISTER"))


class BuildTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(host=st.sampled_from(["127.0.0.1", "ps.mpay.test", "::1"]),
           port=st.integers(min_value=1, max_value=65535),
           cseq=st.integers(min_value=0, max_value=2**31 - 1),
           method=st.sampled_from(["MESSAGE", "REFER", "RECEIVE", "BYE"]),
           to_tag=st.one_of(st.none(), st.just("t9")))
    def test_built_request_caches_what_its_bytes_say(self, host, port, cseq, method, to_tag):
        request = build_request(method, "sip:+886912345678@h", sent_by=(host, port),
                                from_uri="sip:a@h", to_uri="sip:b@h", call_id="c@h", cseq=cseq,
                                to_tag=to_tag, headers=[("Subject", "x")], body=b"{}",
                                content_type="application/json")
        wire = request.to_bytes()
        again = parse(wire)
        self.assertEqual(again.to_bytes(), wire)
        self.assertEqual(request.cseq, again.cseq)
        self.assertEqual(request.top_via.to_str(), again.top_via.to_str())
        self.assertEqual(request.top_via.host, host)
        self.assertEqual([name for name, _ in request.headers][:6],
                         ["Via", "Max-Forwards", "From", "To", "Call-ID", "CSeq"])

    def test_built_request_refuses_a_line_break(self):
        self.assertRaises(ValueError, build_request, "MESSAGE", "sip:b@h", sent_by=("h", 1),
                          from_uri="sip:a@h", to_uri="sip:b@h", call_id="c\r\nX: y", cseq=1)

    def test_request_built_by_code_gets_its_content_length(self):
        request = Request("MESSAGE", "sip:+886912345678@mpay.test", Headers([
            ("Via", "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKb1"), ("From", "<sip:a@h>;tag=1"),
            ("To", "<sip:b@h>"), ("Call-ID", "x"), ("CSeq", "1 MESSAGE")]), b"pay 5")
        wire = request.to_bytes()
        self.assertTrue(wire.endswith(b"\r\nContent-Length: 5\r\n\r\npay 5"))
        self.assertEqual(parse(wire).body, b"pay 5")

    def test_make_response_per_rfc3261_8_2_6(self):
        request = parse(with_header(REGISTER, b"Via: SIP/2.0/UDP p2;branch=z9hG4bKp2\r\n"
                                              b"Via: SIP/2.0/UDP p3;branch=z9hG4bKp3"))
        response = make_response(request, 200, to_tag="t1", headers=[("Expires", "3600")],
                                 body=b"ok")
        self.assertEqual((response.status, response.reason), (200, "OK"))
        self.assertEqual(response.headers.getall("Via"), request.headers.getall("Via"))
        self.assertEqual(response.to_addr.tag, "t1")
        self.assertEqual(response.from_addr, request.from_addr)
        self.assertEqual((response.call_id, response.cseq), (request.call_id, request.cseq))
        self.assertEqual([n for n, _ in response.headers],
                         ["Via", "Via", "Via", "From", "To", "Call-ID", "CSeq", "Expires"])
        self.assertIn(b"Content-Length: 2\r\n\r\nok", response.to_bytes())
        tagged = make_response(parse(response.to_bytes().replace(b"SIP/2.0 200 OK",
                                                                  b"BYE sip:x SIP/2.0")
                                     .replace(b"2 REGISTER", b"2 BYE")), 200, to_tag="t2")
        self.assertEqual(tagged.to_addr.tag, "t1")
        self.assertEqual(make_response(request, 488).reason, "Not Acceptable Here")
        self.assertEqual(make_response(request, 499).reason, "Client Error")
        self.assertEqual(make_response(request, 402, "Insufficient Funds").reason,
                         "Insufficient Funds")


class ImportOrderTests(unittest.TestCase):
    def test_any_sip_module_may_be_imported_first_compiled_or_not(self):
        """message.py and parser.py import each other; whichever comes first, both load."""
        for interpreted in ("", "1"):
            env = dict(os.environ, MPAY_INTERPRETED=interpreted)
            for module in ("parser", "message", "headers", "uri", "transaction"):
                done = subprocess.run([sys.executable, "-c", f"import mpay.sip.{module}"],
                                      env=env, capture_output=True, text=True)
                self.assertEqual(done.returncode, 0, f"{module}, {interpreted!r}: {done.stderr}")
