-- The journal's kind CHECK, PostgreSQL dialect: nothing to do.
-- 0004_journal_kind_check.sqlite.sql respells SQLite's CHECK (kind IN (...)) as
-- comparisons, because SQLite builds a temporary b-tree for the IN list on every
-- INSERT; PostgreSQL evaluates the same CHECK as kind = ANY (an array constant).
-- The version exists so that both dialects number their migrations alike.
SELECT 1;
