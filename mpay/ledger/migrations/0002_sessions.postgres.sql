-- Charged-by-time sessions (DESIGN section 7), PostgreSQL dialect.
-- Keep 0002_sessions.sqlite.sql the same in meaning (its comments explain the design).

ALTER TABLE holds ADD COLUMN spent BIGINT NOT NULL DEFAULT 0;
ALTER TABLE holds ADD CONSTRAINT holds_spent_within_amount CHECK (spent >= 0 AND spent <= amount);

CREATE TABLE sessions (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hold_id             BIGINT NOT NULL REFERENCES holds (id),
    consumer            TEXT NOT NULL REFERENCES accounts (number),
    merchant            TEXT NOT NULL REFERENCES accounts (number),
    rate                BIGINT NOT NULL CHECK (rate > 0),
    session_ref         TEXT NOT NULL UNIQUE,
    owner               TEXT NOT NULL,
    opened              DOUBLE PRECISION NOT NULL,
    checkpointed_amount BIGINT NOT NULL DEFAULT 0 CHECK (checkpointed_amount >= 0),
    checkpointed        DOUBLE PRECISION,
    status              TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled')),
    charged             BIGINT CHECK (charged >= 0),
    journal_id          BIGINT REFERENCES journal (id),
    dialog              TEXT NOT NULL,
    CHECK (consumer <> merchant)
);
CREATE INDEX sessions_open ON sessions (owner, hold_id) WHERE status = 'open';
CREATE INDEX sessions_by_hold ON sessions (hold_id, status);
