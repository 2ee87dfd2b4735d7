"""The replay cache shared by every PS process (DESIGN section 4, issue 8).

Each PS's verifier keeps the authenticators it accepted in memory
(:class:`mpay.auth.verifier.ReplayCache`), which stops a replay that reaches
the same process.  With several PS processes a copied request sent from
another address reaches another process, whose memory has not seen it; so
after the local checks an authenticator is also *claimed* in Redis, once for
all processes: ``SET key 1 NX PX retention``.  The first claim wins; every
later one is a replay (403).  A Redis that does not answer means 503: a
request whose freshness cannot be proved is not served (fail closed).
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import defer


class RedisReplayCache:
    """Claims (number, nonce) pairs for ``retention_s``, the verifier's own window."""

    def __init__(self, redis: Any, prefix: str, retention_s: float):
        assert retention_s > 0
        self.redis = redis
        self.prefix = prefix
        self.retention_ms = math.ceil(retention_s * 1000)

    def _key(self, number: str, nonce: bytes) -> str:
        return f"{self.prefix}replay:{number}:{nonce.hex()}"

    def claim(self, number: str, nonce: bytes) -> defer.Deferred:
        """Fires True if this is the first use of the authenticator anywhere, else False."""
        claimed = self.redis.set(self._key(number, nonce), "1", pexpire=self.retention_ms,
                                 only_if_not_exists=True)
        return claimed.addCallback(lambda stored: stored is not None)
