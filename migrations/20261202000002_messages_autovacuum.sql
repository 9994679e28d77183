-- Churn that vacuum keeps up with (issue 10, item 3; the figures are in README.md, "Soak").
--
-- Every message is inserted, updated once at confirmation and deleted by the purge: the table
-- turns over completely within a week. The confirmation cannot be a HOT update (it flips
-- is_delivered, which the partial indexes' predicates read), so it leaves a dead row version and
-- new entries in the primary key, expires_at, sender and idempotency indexes, and its erased
-- ciphertext leaves dead TOAST chunks; the purge leaves one more dead version per message.
-- With PostgreSQL's defaults autovacuum waits until 20% of the table is dead (a day and a half of
-- churn at a week's retention), and may skip the indexes when few heap pages hold dead items,
-- so dead index entries and TOAST chunks pile up between runs and the table and its indexes
-- grow. Here: vacuum (and analyze, which the /metrics estimates read) after 2% of the table
-- changes, for the table and its TOAST table alike, and always clean the indexes.
-- fillfactor stays at 100: it only helps HOT updates, and this table has none.
ALTER TABLE messages SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 100,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 100,
    vacuum_index_cleanup = on,
    toast.autovacuum_vacuum_scale_factor = 0.02,
    toast.autovacuum_vacuum_threshold = 100,
    toast.vacuum_index_cleanup = on
);
