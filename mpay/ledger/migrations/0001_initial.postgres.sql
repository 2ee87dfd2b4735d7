-- The ledger's first schema, PostgreSQL dialect.  Same meaning as
-- 0001_initial.sqlite.sql: money in integer minor units, times in Unix seconds.

CREATE TABLE accounts (
    number  TEXT PRIMARY KEY,                 -- E.164, or 'settlement'
    balance BIGINT NOT NULL DEFAULT 0,
    held    BIGINT NOT NULL DEFAULT 0,        -- sum of this account's active holds
    status  TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    created DOUBLE PRECISION NOT NULL,
    CHECK (balance >= 0 OR number = 'settlement'),
    CHECK (held >= 0 AND (held <= balance OR number = 'settlement'))
);

-- The settlement account: the counterpart of cash-in and cash-out, so that
-- the sum of all balances is always zero.
INSERT INTO accounts (number, balance, held, status, created) VALUES ('settlement', 0, 0, 'active', 0);

CREATE TABLE journal (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    debit                TEXT NOT NULL REFERENCES accounts (number),
    credit               TEXT NOT NULL REFERENCES accounts (number),
    amount               BIGINT NOT NULL CHECK (amount > 0),
    kind                 TEXT NOT NULL
                         CHECK (kind IN ('transfer', 'cash_in', 'cash_out', 'charge', 'session')),
    reference            TEXT NOT NULL DEFAULT '',
    idempotency_key      TEXT NOT NULL UNIQUE,  -- the guard against paying twice
    payer_signature      BYTEA,                 -- the payer DMD's Ed25519 signature, if any
    debit_balance_after  BIGINT NOT NULL,       -- with credit_balance_after: replays the result
    credit_balance_after BIGINT NOT NULL,
    created              DOUBLE PRECISION NOT NULL,
    CHECK (debit <> credit)
);
CREATE INDEX journal_by_debit ON journal (debit, id);
CREATE INDEX journal_by_credit ON journal (credit, id);

CREATE TABLE holds (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account             TEXT NOT NULL REFERENCES accounts (number),
    amount              BIGINT NOT NULL CHECK (amount > 0),
    session_ref         TEXT NOT NULL,
    created             DOUBLE PRECISION NOT NULL,
    checkpointed_amount BIGINT NOT NULL DEFAULT 0
                        CHECK (checkpointed_amount >= 0 AND checkpointed_amount <= amount),
    status              TEXT NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'settled', 'released')),
    charged             BIGINT CHECK (charged >= 0 AND charged <= amount),
    journal_id          BIGINT REFERENCES journal (id)
);
CREATE INDEX holds_active ON holds (account) WHERE status = 'active';

CREATE TABLE device_keys (
    number      TEXT PRIMARY KEY,
    encrypted_k BYTEA NOT NULL,
    ed25519_pub BYTEA NOT NULL CHECK (length(ed25519_pub) = 32),
    created     DOUBLE PRECISION NOT NULL
);
