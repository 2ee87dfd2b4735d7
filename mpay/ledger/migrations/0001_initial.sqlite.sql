-- The ledger's first schema, SQLite dialect (STRICT tables: types enforced).
-- Money columns are integer minor units; times are Unix seconds (REAL).
-- Keep 0001_initial.postgres.sql the same in meaning.

CREATE TABLE accounts (
    number  TEXT PRIMARY KEY,                 -- E.164, or 'settlement'
    balance INTEGER NOT NULL DEFAULT 0,
    held    INTEGER NOT NULL DEFAULT 0,       -- sum of this account's active holds
    status  TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    created REAL NOT NULL,
    CHECK (balance >= 0 OR number = 'settlement'),
    CHECK (held >= 0 AND (held <= balance OR number = 'settlement'))
) STRICT;

-- The settlement account: the counterpart of cash-in and cash-out, so that
-- the sum of all balances is always zero.
INSERT INTO accounts (number, balance, held, status, created) VALUES ('settlement', 0, 0, 'active', 0);

CREATE TABLE journal (
    id                   INTEGER PRIMARY KEY,
    debit                TEXT NOT NULL REFERENCES accounts (number),
    credit               TEXT NOT NULL REFERENCES accounts (number),
    amount               INTEGER NOT NULL CHECK (amount > 0),
    kind                 TEXT NOT NULL
                         CHECK (kind IN ('transfer', 'cash_in', 'cash_out', 'charge', 'session')),
    reference            TEXT NOT NULL DEFAULT '',
    idempotency_key      TEXT NOT NULL UNIQUE,  -- the guard against paying twice
    payer_signature      BLOB,                  -- the payer DMD's Ed25519 signature, if any
    debit_balance_after  INTEGER NOT NULL,      -- with credit_balance_after: replays the result
    credit_balance_after INTEGER NOT NULL,
    created              REAL NOT NULL,
    CHECK (debit <> credit)
) STRICT;
CREATE INDEX journal_by_debit ON journal (debit, id);
CREATE INDEX journal_by_credit ON journal (credit, id);

CREATE TABLE holds (
    id                  INTEGER PRIMARY KEY,
    account             TEXT NOT NULL REFERENCES accounts (number),
    amount              INTEGER NOT NULL CHECK (amount > 0),
    session_ref         TEXT NOT NULL,
    created             REAL NOT NULL,
    checkpointed_amount INTEGER NOT NULL DEFAULT 0
                        CHECK (checkpointed_amount >= 0 AND checkpointed_amount <= amount),
    status              TEXT NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'settled', 'released')),
    charged             INTEGER CHECK (charged >= 0 AND charged <= amount),
    journal_id          INTEGER REFERENCES journal (id)
) STRICT;
CREATE INDEX holds_active ON holds (account) WHERE status = 'active';

CREATE TABLE device_keys (
    number      TEXT PRIMARY KEY,
    encrypted_k BLOB NOT NULL,
    ed25519_pub BLOB NOT NULL CHECK (length(ed25519_pub) = 32),
    created     REAL NOT NULL
) STRICT;
