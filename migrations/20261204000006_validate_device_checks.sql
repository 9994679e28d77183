-- The checks added NOT VALID by 20261204000001, validated under SHARE UPDATE EXCLUSIVE: the scan
-- blocks no read or write of users or messages.
ALTER TABLE users VALIDATE CONSTRAINT users_next_device_id_check;
ALTER TABLE users VALIDATE CONSTRAINT users_device_count_check;
ALTER TABLE messages VALIDATE CONSTRAINT messages_recipient_device_id_check;
ALTER TABLE messages VALIDATE CONSTRAINT messages_sender_device_id_check;
