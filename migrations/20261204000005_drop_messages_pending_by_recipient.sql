-- no-transaction
-- Replaced by messages_pending_by_device, which leads with the same column.
DROP INDEX CONCURRENTLY IF EXISTS messages_pending_by_recipient;
