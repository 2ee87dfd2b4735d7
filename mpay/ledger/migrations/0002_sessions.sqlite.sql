-- Charged-by-time sessions (DESIGN section 7), SQLite dialect.
-- Keep 0002_sessions.postgres.sql the same in meaning.
--
-- All open sessions of one consumer draw on one hold (session_ref 'sessions'),
-- which reserves the consumer's available money: a session settles its charge
-- out of it (``spent`` grows) and the last one to end releases the rest.
-- ``accounts.held`` is the sum of ``amount - spent`` over the active holds.

ALTER TABLE holds ADD COLUMN spent INTEGER NOT NULL DEFAULT 0
    CHECK (spent >= 0 AND spent <= amount);

CREATE TABLE sessions (
    id                  INTEGER PRIMARY KEY,
    hold_id             INTEGER NOT NULL REFERENCES holds (id),
    consumer            TEXT NOT NULL REFERENCES accounts (number),
    merchant            TEXT NOT NULL REFERENCES accounts (number),
    rate                INTEGER NOT NULL CHECK (rate > 0),   -- minor units per second
    session_ref         TEXT NOT NULL UNIQUE,                -- the merchant's dialog: opened once
    owner               TEXT NOT NULL,                       -- the PS process running it
    opened              REAL NOT NULL,
    checkpointed_amount INTEGER NOT NULL DEFAULT 0 CHECK (checkpointed_amount >= 0),
    checkpointed        REAL,
    status              TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled')),
    charged             INTEGER CHECK (charged >= 0),
    journal_id          INTEGER REFERENCES journal (id),
    dialog              TEXT NOT NULL,                       -- JSON: what a BYE to each side needs
    CHECK (consumer <> merchant)
) STRICT;
CREATE INDEX sessions_open ON sessions (owner, hold_id) WHERE status = 'open';
CREATE INDEX sessions_by_hold ON sessions (hold_id, status);
