"""How many SIP messages per second mpay.sip.message parses (and serialises) on one core.

Two messages of the payment server's hot path: a DMD's REGISTER carrying a ticket, and a
MESSAGE with a ~200-byte body.  Each figure runs for RUN_S seconds.  The same REGISTER fed
to Twisted's own parser (twisted.protocols.sip.MessagesParser) is the baseline; note that
it only splits lines into headers, while ours also validates Via, From, To, CSeq and
Content-Length and caches the parsed values.

The last line is for scripts: ``sip_parse: register_per_s=X message_per_s=Y``
(parse + serialise).  Run: ``.venv/bin/python bench/sip_parse.py`` (BENCH_RUN_S=0.2 for
a quick look).
"""

import os
import time
import warnings

from mpay.sip.message import parse

RUN_S = float(os.environ.get("BENCH_RUN_S", "2.0"))
BATCH = 500

REGISTER = (
    b"REGISTER sip:mpay.example.net SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.7:5061;branch=z9hG4bK-524287-1-0f3eb40b11f97a9c;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:+886912345678@mpay.example.net>;tag=5e00e125\r\n"
    b"To: <sip:+886912345678@mpay.example.net>\r\n"
    b"Call-ID: wSSsR1c-lUjKuRhxr0iEKA@198.51.100.7\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Contact: <sip:+886912345678@198.51.100.7:5061;transport=udp>;expires=3600\r\n"
    b"Expires: 3600\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, MESSAGE, OPTIONS, RECEIVE\r\n"
    b"User-Agent: mpay-dmd/0.1\r\n"
    b'Authorization: MPAY ticket="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKiss'
    b'LS4vMDEyMzQ1Njc4OTo7PD0-P0BBQkNERUZHSElKS0xNTk8", authenticator="MDEyMzQ1Njc4OWFiY2RlZg"'
    b"\r\n"
    b"Content-Length: 0\r\n\r\n")

BODY = (b"amount=1250&currency=TWD&payee=%2B886987654321&memo=lunch%20at%20the%20night%20market"
        b"&nonce=8c1f0e3a5b7d9f21&ts=2026-11-25T04%3A00%3A00Z&sig=MEUCIQDx3kq9Vv0s7pL2mJ5nXx4bAi"
        b"EA0o8yQ1x2Vb7Tq0Lw9Zs3Rm5Kd8Fp")
MESSAGE = (
    b"MESSAGE sip:+886987654321@mpay.example.net SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.7:5061;branch=z9hG4bK-77ac01e9;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Lin" <sip:+886912345678@mpay.example.net>;tag=9fxced76sl\r\n'
    b"To: <sip:+886987654321@mpay.example.net>\r\n"
    b"Call-ID: 3848276298220188511@198.51.100.7\r\n"
    b"CSeq: 17 MESSAGE\r\n"
    b'Authorization: MPAY ticket="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKiss'
    b'", authenticator="MDEyMzQ1Njc4OWFiY2RlZg"\r\n'
    b"Content-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


def rate(work, data: bytes) -> float:
    """Calls of work(data) per second, over at least RUN_S seconds."""
    for _ in range(BATCH):          # warm up
        work(data)
    count = 0
    start = time.perf_counter()
    deadline = start + RUN_S
    while True:
        for _ in range(BATCH):
            work(data)
        count += BATCH
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def parse_only(data: bytes) -> None:
    parse(data)


def parse_and_serialise(data: bytes) -> None:
    parse(data).to_bytes()


def twisted_parser(same_work: bool):
    """Twisted's parser; with `same_work`, also parse what ours validates and caches
    (top Via, From, To, CSeq) with Twisted's helpers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from twisted.protocols.sip import MessagesParser, parseAddress, parseViaHeader
    received = []
    parser = MessagesParser(received.append)

    def work(data: bytes) -> None:
        parser.dataReceived(data)
        parser.dataDone()
        message = received.pop()
        if same_work:
            headers = message.headers
            parseViaHeader(headers["via"][0])
            parseAddress(headers["from"][0])
            parseAddress(headers["to"][0])
            number, method = headers["cseq"][0].split()
            int(number)
    work(REGISTER)
    return work


def main() -> None:
    assert parse(MESSAGE).body == BODY and len(BODY) >= 200
    print(f"sip_parse: {RUN_S:.1f} s per figure, REGISTER {len(REGISTER)} bytes, "
          f"MESSAGE {len(MESSAGE)} bytes ({len(BODY)}-byte body)")
    register_rt = rate(parse_and_serialise, REGISTER)
    message_rt = rate(parse_and_serialise, MESSAGE)
    register_p = rate(parse_only, REGISTER)
    message_p = rate(parse_only, MESSAGE)
    baseline = rate(twisted_parser(same_work=False), REGISTER)
    baseline_same = rate(twisted_parser(same_work=True), REGISTER)
    print(f"  REGISTER parse+serialise  {register_rt:10,.0f} /s  ({1e6 / register_rt:5.1f} us)")
    print(f"  MESSAGE  parse+serialise  {message_rt:10,.0f} /s  ({1e6 / message_rt:5.1f} us)")
    print(f"  REGISTER parse only       {register_p:10,.0f} /s  ({1e6 / register_p:5.1f} us)")
    print(f"  MESSAGE  parse only       {message_p:10,.0f} /s  ({1e6 / message_p:5.1f} us)")
    print("  baseline, twisted.protocols.sip.MessagesParser on the same REGISTER:")
    print(f"    lines to headers only            {baseline:10,.0f} /s  "
          f"-> ours (which does more) is {register_p / baseline:.2f}x")
    print(f"    + Via, From, To, CSeq parsed     {baseline_same:10,.0f} /s  "
          f"-> ours is {register_p / baseline_same:.2f}x")
    print(f"sip_parse: register_per_s={register_rt:.0f} message_per_s={message_rt:.0f}")


if __name__ == "__main__":
    main()
