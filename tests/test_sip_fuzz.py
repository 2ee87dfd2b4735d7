"""Property tests for mpay.sip.message: whatever arrives, only ParseError escapes; whatever
we build, serialising and parsing give it back.

These call `parser._parse`, the parser without its last-resort exception net, so a bug
shows here as the exception it is rather than as a quiet 400.
"""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mpay.sip import headers
from mpay.sip.headers import KNOWN_NAMES, parse_name_addr, parse_via, split_list
from mpay.sip.message import (
    Headers, NameAddr, ParseError, Request, Response, Via, parse,
)
from mpay.sip import parser
from mpay.sip.parser import _parse   # after message, which imports the parser at its end

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sip_corpus")
SEEDS = [open(os.path.join(CORPUS, kind, name), "rb").read()
         for kind in ("valid", "semantic", "invalid")
         for name in sorted(os.listdir(os.path.join(CORPUS, kind)))]

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def parses_or_parse_error(data: bytes):
    """The property every input must have; a parsed message must also serialise."""
    try:
        message = _parse(data)
    except ParseError as e:
        assert e.status in (400, 505, 513), e.status
        assert e.message is None or isinstance(e.message, Request)
        return None
    assert isinstance(message, (Request, Response))
    wire = message.to_bytes()
    again = _parse(wire)
    assert again.to_bytes() == wire
    return message


# ------------------------------------------------------------------ malformed input
@st.composite
def mutated(draw):
    """A corpus message with a few bytes flipped, inserted, deleted or lines shuffled."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "crlf", "dup-line", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(
                [b"\r\n", b"\n", b" ", b":", b",", b";", b'"', b"<", b">", b"\x00", b"\xff",
                 b"\r\n ", b"=", b"9" * 12, b"%"]) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "crlf":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", draw(st.integers(1, 5))))
        elif op == "dup-line":
            end = data.find(b"\n", at)
            start = data.rfind(b"\n", 0, at) + 1
            if end > 0:
                data[end + 1:end + 1] = data[start:end + 1]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


class MalformedInputTests(unittest.TestCase):
    @FAST
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes(self, data):
        parses_or_parse_error(data)

    @FAST
    @given(st.lists(st.sampled_from([
        b"INVITE ", b"SIP/2.0 ", b"200 ", b"sip:a@b ", b"SIP/2.0", b"\r\n", b"\n", b"Via: ",
        b"v:", b"SIP/2.0/UDP ", b"h:5060", b";branch=z9hG4bK", b"From: ", b"To: ", b"<sip:x@y>",
        b";tag=1", b"Call-ID: ", b"CSeq: ", b"1 INVITE", b"Content-Length: ", b"l:", b"0", b"-",
        b'"', b",", b" ", b"\t", b"\x80", b"99999999999", b"*", b"\r\n\r\n"]), max_size=40))
    def test_sip_shaped_noise(self, pieces):
        parses_or_parse_error(b"".join(pieces))

    @settings(FAST, max_examples=300)
    @given(mutated())
    def test_mutated_corpus_messages(self, data):
        parses_or_parse_error(data)

    def test_the_public_parse_never_lets_anything_else_out(self):
        for data in SEEDS:
            try:
                parse(data)
            except ParseError:
                pass


# ------------------------------------------------------------------ generated messages
TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
                min_size=1, max_size=12)
HOST = st.from_regex(r"[a-z][a-z0-9\-]{0,10}(\.[a-z]{2,5}){0,2}", fullmatch=True)
PORT = st.none() | st.integers(1, 65535)
PARAM_VALUE = st.none() | TOKEN
PARAMS = st.dictionaries(TOKEN.map(str.lower), PARAM_VALUE, max_size=3)
USER = st.from_regex(r"\+?[0-9]{3,15}|[a-z][a-z0-9.]{0,10}", fullmatch=True)
URI = st.builds(lambda u, h, p: f"sip:{u}@{h}" + ("" if p is None else f":{p}"), USER, HOST, PORT)
# Display names: any text but line breaks and surrogates (which no wire form can carry).
DISPLAY = st.none() | st.text(st.characters(exclude_categories=("Cs",),
                                            exclude_characters="\r\n"), max_size=20)
# Opaque header values: no line breaks, no surrounding LWS (LWS is not part of a value).
VALUE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"),
                max_size=40).map(lambda v: v.strip(" \t"))

VIA = st.builds(Via, st.sampled_from(["UDP", "TCP", "TLS", "SCTP"]),
                HOST | st.sampled_from(["192.0.2.1", "2001:db8::7"]), PORT, PARAMS)
NAME_ADDR = st.builds(NameAddr, DISPLAY, URI, PARAMS)
EXTRA_NAMES = st.sampled_from([
    "Allow", "Supported", "Require", "Subject", "Expires", "User-Agent", "Authorization",
    "Route", "Record-Route", "Contact", "Accept", "Date", "Event", "Content-Type", "Warning",
]) | TOKEN.filter(lambda n: n not in KNOWN_NAMES and n.lower() not in KNOWN_NAMES)


@st.composite
def messages(draw):
    method = draw(st.sampled_from(["REGISTER", "MESSAGE", "INVITE", "OPTIONS", "RECEIVE"])
                  | TOKEN)
    body = draw(st.binary(max_size=300))
    fields = [("Via", v.to_str()) for v in draw(st.lists(VIA, min_size=1, max_size=3))]
    fields += [("From", draw(NAME_ADDR).to_str()), ("To", draw(NAME_ADDR).to_str()),
               ("Call-ID", draw(TOKEN)), ("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}")]
    fields += draw(st.lists(st.tuples(EXTRA_NAMES, VALUE), max_size=6))
    fields = draw(st.permutations(fields))
    fields.insert(draw(st.integers(0, len(fields))), ("Content-Length", str(len(body))))
    headers = Headers(fields)
    if draw(st.booleans()):
        return Request(method, draw(URI), headers, body)
    return Response(draw(st.integers(100, 699)), draw(VALUE), headers, body)


class RoundTripTests(unittest.TestCase):
    @FAST
    @given(messages())
    def test_parse_of_serialise_is_the_message_and_serialise_is_stable(self, message):
        wire = message.to_bytes()
        parsed = _parse(wire)
        self.assertEqual(parsed, message)
        self.assertEqual(parsed.to_bytes(), wire)
        self.assertEqual(parsed.vias, message.vias)
        self.assertEqual(parsed.cseq, message.cseq)
        self.assertEqual((parsed.from_addr, parsed.to_addr), (message.from_addr, message.to_addr))

    @FAST
    @given(messages(), st.sampled_from([b"\r\n", b"\n"]), st.integers(0, 3))
    def test_line_endings_and_leading_blank_lines_do_not_matter(self, message, eol, blanks):
        wire = message.to_bytes()
        head, _, body = wire.partition(b"\r\n\r\n")
        self.assertEqual(_parse(eol * blanks + head.replace(b"\r\n", eol) + eol * 2 + body),
                         message)

    @FAST
    @given(VIA)
    def test_via_round_trip(self, via):
        self.assertEqual(parse_via(via.to_str()), via)

    @FAST
    @given(NAME_ADDR)
    def test_name_addr_round_trip(self, name_addr):
        self.assertEqual(parse_name_addr(name_addr.to_str()), name_addr)

    @FAST
    @given(st.lists(NAME_ADDR, min_size=1, max_size=4))
    def test_contact_lists_split_on_the_right_commas(self, addrs):
        joined = ", ".join(a.to_str() for a in addrs)
        self.assertEqual([parse_name_addr(v) for v in split_list(joined)], addrs)


# ------------------------------------------------------------------ the regex fast paths
def _outcome(parser, value: str):
    """What a header parser makes of *value*, comparable across parsers."""
    try:
        parsed = parser(value)
    except ParseError as e:
        return ("error", e.status, e.reason)
    fields = {name: getattr(parsed, name) for name in _FIELDS[type(parsed).__name__]}
    return (parsed.to_str(), fields, list(parsed.params.items()))


# Their attributes, named here: a compiled class (mpay/compiled.py) has no __slots__ to read.
_FIELDS = {"Via": ("transport", "host", "port", "params", "protocol"),
           "NameAddr": ("display", "uri", "params")}


_TOKEN_CHARS = "abcXYZ019-.!%*_+`'~"
_ODD_CHARS = " \t;,:=<>\"\\/[]@?\x00\x7f\xe9"


def _perturbed(draw, parts: dict[str, str], choices: dict[str, st.SearchStrategy]) -> str:
    """*parts* joined, with at most one of them replaced by a draw from *choices*: one
    difference at a time is what finds where the fast path and the general one part."""
    which = draw(st.sampled_from([None, *choices]))
    if which is not None:
        parts = {**parts, which: draw(choices[which])}
    return "".join(parts.values())


def _with_odd(alphabet: str, max_size: int = 10):
    """Text of *alphabet* with one character from outside it somewhere."""
    return st.tuples(st.text(alphabet, max_size=max_size), st.sampled_from(_ODD_CHARS),
                     st.integers(0, max_size)).map(lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])


@st.composite
def plain_vias(draw):
    """Vias of the shape the fast path reads, and near misses of it."""
    token = st.text(_TOKEN_CHARS, min_size=1, max_size=16)
    parts = {"protocol": "SIP/2.0/", "transport": draw(st.sampled_from(["UDP", "TCP", "TLS"])),
             "sp": " ", "host": draw(st.sampled_from(["127.0.0.1", "ps.example", "a-1.b"])),
             "colon": ":", "port": str(draw(st.integers(0, 65535))), "branch": ";branch=",
             "value": draw(token), "tail": draw(st.sampled_from(["", ";rport"]))}
    return _perturbed(draw, parts, {
        "protocol": st.sampled_from(["sip/2.0/", "SIP/3.0/", "SIP / 2.0/", "SIP/2.0 /", ""]),
        "transport": st.sampled_from(["udp", "Tls", "SCTP", "WS", ""]) | _with_odd("UDP"),
        "sp": st.sampled_from(["", "  ", "\t"]),
        "host": st.sampled_from(["[::1]", "a..b", "", "h_st", "1.2.3.4.5"]) | _with_odd("ab09-."),
        "colon": st.sampled_from(["", " : ", "::"]),
        "port": st.sampled_from(["65536", "99999", "007", "0065535", "", "x", "-1"]),
        "branch": st.sampled_from([";BRANCH=", "; branch=", ";branch =", ";branch", ";"]),
        "value": st.just("") | _with_odd(_TOKEN_CHARS),
        "tail": st.sampled_from([";RPORT", ";rport=5", ";rport;received=1.2.3.4", " ;rport",
                                 ";", ";rport;", ",SIP/2.0/UDP h"])})


@st.composite
def plain_name_addrs(draw):
    parts = {"head": "", "open": "<", "scheme": draw(st.sampled_from(["sip", "sips", "tel"])),
             "rest": draw(st.sampled_from([":+886912000001@mpay.test;user=phone", ":a@b"])),
             "close": ">", "tag": draw(st.sampled_from(["", ";tag="])), "value": "", "tail": ""}
    if parts["tag"]:
        parts["value"] = draw(st.text(_TOKEN_CHARS, min_size=1, max_size=12))
    return _perturbed(draw, parts, {
        "head": st.sampled_from([" ", '"Al" ', "Al ", "\t"]),
        "open": st.sampled_from(["", " <", "<<"]),
        "scheme": st.sampled_from(["s1+.-", "1sip", "", "s_p"]),
        "rest": st.sampled_from([":", "", ":a b", ":a>b", ":a<b"]) | _with_odd("ab@:;=?,+", 16),
        "close": st.sampled_from(["", "> ", ">>"]),
        "tag": st.sampled_from([";TAG=", "; tag=", ";tag", ";tag==", ";lr;tag="]),
        "value": _with_odd(_TOKEN_CHARS),
        "tail": st.sampled_from([";lr", ";TAG=x", " ", ";", ",<sip:b@c>"])})


# Pure functions, microseconds each: enough examples that a regex one character too wide
# is caught (checked by hand with such mutants of both regexes).
MANY = settings(max_examples=1000, deadline=None)


class FastPathTests(unittest.TestCase):
    """A header the regex reads must come out exactly as the general parser has it."""

    @MANY
    @given(plain_vias())
    def test_via_fast_path_is_the_general_parser(self, value):
        self.assertEqual(_outcome(parse_via, value), _outcome(headers._parse_via, value))

    @MANY
    @given(plain_name_addrs())
    def test_name_addr_fast_path_is_the_general_parser(self, value):
        self.assertEqual(_outcome(parse_name_addr, value),
                         _outcome(headers._parse_name_addr, value))

    def test_the_common_forms_take_the_fast_path(self):
        for value in ("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport",
                      "SIP/2.0/TLS ps.example:5061;branch=z9hG4bK2"):
            self.assertIsNotNone(headers._PLAIN_VIA_RE.fullmatch(value), value)
        for value in ("<sip:+886912000001@mpay.test;user=phone>;tag=debf21a684c0",
                      "<sip:+886987000001@mpay.test;user=phone>"):
            self.assertIsNotNone(headers._PLAIN_NAME_ADDR_RE.fullmatch(value), value)


class RememberedNamesTests(unittest.TestCase):
    """Extension header names are remembered as parsed, but never without bound."""

    def test_many_new_names_never_grow_the_table_past_its_bound_nor_change_a_parse(self):
        base = (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                b"From: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n")
        for i in range(parser.MAX_EXTENSION_NAMES + 50):
            for spelling in (f"X-Name-{i}", f"x-name-{i} "):
                message = parse(base + f"{spelling}: v{i}\r\n\r\n".encode())
                self.assertEqual(message.headers.get(f"X-NAME-{i}"), f"v{i}")
                self.assertEqual(list(message.headers)[-1], (spelling.rstrip(), f"v{i}"))
        self.assertLessEqual(len(parser._NAMES), len(KNOWN_NAMES) + parser.MAX_EXTENSION_NAMES)
        self.assertRaises(ParseError, parse, base + b"Bad Name: v\r\n\r\n")
