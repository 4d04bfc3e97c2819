-- What clients that poll need from the database.
--
-- Every change of an order (placed, settled) bumps its user's list version
-- (the ETag of `GET /orders`, and what `If-Match` on `POST /orders` is checked
-- against) and, when its transaction commits, notifies `order_changed` with
-- the order id: the long polls waiting for that order, on whichever replica,
-- are woken by it.
CREATE TABLE order_list_versions (
    user_id UUID   PRIMARY KEY,
    version BIGINT NOT NULL DEFAULT 0
);

INSERT INTO order_list_versions (user_id, version)
    SELECT user_id, count(*) FROM orders GROUP BY user_id;

CREATE FUNCTION order_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_list_versions (user_id, version) VALUES (NEW.user_id, 1)
        ON CONFLICT (user_id) DO UPDATE SET version = order_list_versions.version + 1;
    PERFORM pg_notify('order_changed', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER order_changed AFTER INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION order_changed();

-- Order placement's Idempotency-Keys move to the runtime's table, which every
-- operation with an effect shares (the same rules, expiry and pruning).
INSERT INTO idempotency_keys (scope, user_id, key, request, outcome, created_at)
    SELECT 'order', user_id, idempotency_key, 'price=' || trim_scale(price)::text,
           jsonb_build_object('orderId', order_id), created_at
    FROM order_requests;

DROP TABLE order_requests;
