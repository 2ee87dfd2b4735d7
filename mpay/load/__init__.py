"""``mpay-load``: the payment server's capacity, measured as thesis section 4.4 did.

Payers (Sim-DMDs with real tickets and keys, in worker processes) send credit
transfers at a given arrival rate; payees confirm the PS's notices; a request
succeeds when its payer has the final 200 in time.  The arrival schedule, the
statistics and the capacity search are plain objects (``schedule``,
``stats``, ``capacity``); ``server`` and ``devices`` are the real server as a
child process and the devices enrolled against it; ``books`` is the ledger
checked after each rate (SQLite or PostgreSQL), ``backends`` the Redis
prefix and PostgreSQL schema a run owns on the production backends.
"""
