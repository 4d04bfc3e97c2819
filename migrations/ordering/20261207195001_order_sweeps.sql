-- What the sweeper sent for an order left pending: its `CreatePayment` again
-- (`redrives`), or, past the pending timeout, a `VoidPayment` (`voids`); the
-- next command for it waits until `last_sent_at` is a re-drive interval old.
-- Kept apart from `orders` so that a sweep changes neither an order's tag nor
-- its list's version, and wakes no long poll.
CREATE TABLE order_sweeps (
    order_id     UUID        PRIMARY KEY REFERENCES orders (id),
    redrives     INT         NOT NULL DEFAULT 0,
    voids        INT         NOT NULL DEFAULT 0,
    last_sent_at TIMESTAMPTZ NOT NULL
);
