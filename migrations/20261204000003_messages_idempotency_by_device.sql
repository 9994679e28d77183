-- no-transaction
-- One request's envelopes share its Idempotency-Key, one row per device: the key is unique per
-- mailbox. The recipient leads, so the rule holds on a database sharded by recipient.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS messages_idempotency_by_device
    ON messages (recipient_id, recipient_device_id, sender_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
