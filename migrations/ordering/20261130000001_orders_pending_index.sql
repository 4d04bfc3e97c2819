-- Pending orders only: keeps the periodic `orders_pending` gauge query
-- (count and oldest created_at of pending orders) an index-only scan of the
-- few orders in flight, however many settled orders the table holds.
CREATE INDEX orders_pending ON orders (created_at) WHERE status = 'pending';
