-- The checks added NOT VALID by 20261204000007, validated under SHARE UPDATE EXCLUSIVE: the scan
-- blocks no read or write of devices.
ALTER TABLE devices VALIDATE CONSTRAINT devices_pending_messages_check;
ALTER TABLE devices VALIDATE CONSTRAINT devices_pending_bytes_check;
ALTER TABLE devices VALIDATE CONSTRAINT devices_pending_known_check;
