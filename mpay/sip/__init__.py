"""SIP (RFC 3261), sans-IO at the core: messages, transactions, transports at the edge."""

# The message model first: it and parser.py import each other, and parser.py imported
# first would find message.py's parse() not yet there.
from mpay.sip import message  # noqa: E402,F401
