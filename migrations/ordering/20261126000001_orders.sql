CREATE TABLE orders (
    id         UUID PRIMARY KEY,
    user_id    UUID           NOT NULL,
    price      NUMERIC(14, 2) NOT NULL CHECK (price > 0),
    status     TEXT           NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason     TEXT,
    created_at TIMESTAMPTZ    NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ    NOT NULL DEFAULT now()
);

CREATE INDEX orders_user ON orders (user_id, created_at DESC, id DESC);
