-- A client's Idempotency-Key for placing an order: a request sent again
-- (a retry after a lost answer) gets the order the first one placed.
CREATE TABLE order_requests (
    user_id         UUID           NOT NULL,
    idempotency_key TEXT           NOT NULL,
    order_id        UUID           NOT NULL REFERENCES orders (id),
    price           NUMERIC(14, 2) NOT NULL,
    created_at      TIMESTAMPTZ    NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);
