-- no-transaction
-- A device's mailbox: fetch in id order, and its quotas (count, bytes, per sender) from the
-- index alone. Built without blocking writes; it replaces messages_pending_by_recipient.
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_pending_by_device
    ON messages (recipient_id, recipient_device_id, id)
    INCLUDE (expires_at, size, sender_id) WHERE NOT is_delivered;
