-- no-transaction
-- Replaced by messages_idempotency_by_device (a fan-out stores one row per device under one key).
DROP INDEX CONCURRENTLY IF EXISTS messages_idempotency_key;
