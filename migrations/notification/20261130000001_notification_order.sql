-- The order a notification is about, so that `order-system audit` can check
-- that every final order got exactly one. Notifications stored before this
-- column existed have none (the audit checks only orders settled after it).
ALTER TABLE notifications ADD COLUMN order_id UUID;

CREATE INDEX notifications_order ON notifications (order_id) WHERE order_id IS NOT NULL;
