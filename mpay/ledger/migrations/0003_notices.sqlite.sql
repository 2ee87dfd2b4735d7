-- Notices waiting for an offline payee (mpay/ledger/notices.py), SQLite dialect.
-- Keep 0003_notices.postgres.sql the same in meaning.
--
-- One row per movement at most (journal_id is UNIQUE): a re-sent transfer that
-- finds its payee offline again does not queue a second copy.  The payee is the
-- journal row's credit account (checked when queued); no foreign key to accounts,
-- so that on PostgreSQL queueing a notice never waits on a batch's account locks.

CREATE TABLE notices (
    id         INTEGER PRIMARY KEY,              -- queue order: oldest first
    payee      TEXT NOT NULL,                    -- E.164
    journal_id INTEGER NOT NULL UNIQUE REFERENCES journal (id),
    from_uri   TEXT NOT NULL,                    -- the payer's SIP URI, or RFC 3323 anonymous
    body       BLOB NOT NULL,                    -- the notice's JSON, receipt included
    created    REAL NOT NULL
) STRICT;
CREATE INDEX notices_by_payee ON notices (payee, id);
