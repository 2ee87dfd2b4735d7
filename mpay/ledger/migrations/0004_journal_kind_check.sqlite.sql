-- The journal's kind CHECK, spelled as comparisons, SQLite dialect.
-- Keep 0004_journal_kind_check.postgres.sql the same in meaning (there: nothing to do).
--
-- Same rule as 0001's ``CHECK (kind IN (...))``, but SQLite compiles an IN list
-- inside a CHECK into a temporary b-tree that it builds again for every INSERT:
-- about a quarter of the writer thread's instructions per transfer.  SQLite cannot
-- ALTER a constraint; for a change that every stored row already satisfies, its
-- documented way is to edit the table's definition in place (sqlite.org/
-- lang_altertable.html, "Making Other Kinds Of Table Schema Changes", the simpler
-- procedure).  The replace is exact: a journal defined otherwise is left as it is.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql,
       'CHECK (kind IN (''transfer'', ''cash_in'', ''cash_out'', ''charge'', ''session''))',
       'CHECK (kind = ''transfer'' OR kind = ''cash_in'' OR kind = ''cash_out'''
       || ' OR kind = ''charge'' OR kind = ''session'')')
 WHERE type = 'table' AND name = 'journal';
-- RESET re-reads the schema on this connection; the DDL below bumps the schema
-- cookie, so that every other connection re-reads it too.
PRAGMA writable_schema = RESET;
CREATE TABLE schema_reread_0004 (x INTEGER);
DROP TABLE schema_reread_0004;
