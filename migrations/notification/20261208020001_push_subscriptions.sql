-- Web Push (RFC 8030): the browsers' push subscriptions, per user. An
-- endpoint is one browser's: subscribing it again (another user logged in
-- there, or new keys) takes it over.
CREATE TABLE push_subscriptions (
    id         UUID PRIMARY KEY,
    user_id    UUID        NOT NULL,
    endpoint   TEXT        NOT NULL UNIQUE,
    -- The browser's P-256 public key (65 bytes, uncompressed) and auth secret (16 bytes).
    p256dh     BYTEA       NOT NULL,
    auth       BYTEA       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX push_subscriptions_user ON push_subscriptions (user_id, created_at DESC);

-- One push message per notification and subscription, written with the
-- notification (so in the consumer's transaction: a redelivered order event
-- writes none twice), sent by the pusher, retried with backoff. Removing a
-- subscription removes its messages, sent or not.
CREATE TABLE push_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    notification_id UUID        NOT NULL REFERENCES notifications (id),
    subscription_id UUID        NOT NULL REFERENCES push_subscriptions (id) ON DELETE CASCADE,
    user_id         UUID        NOT NULL,
    payload         JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INT         NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    -- The push service's answer when it took the message.
    sent_at         TIMESTAMPTZ,
    sent_status     INT,
    -- Refused for good (or expired before it could be sent).
    failed_at       TIMESTAMPTZ,
    failed_reason   TEXT,
    -- Not sent: the user's push budget was spent.
    suppressed_at   TIMESTAMPTZ,
    UNIQUE (notification_id, subscription_id)
);

CREATE INDEX push_deliveries_due ON push_deliveries (next_attempt_at)
    WHERE sent_at IS NULL AND failed_at IS NULL AND suppressed_at IS NULL;
CREATE INDEX push_deliveries_subscription ON push_deliveries (subscription_id);

-- Each user's push budget: how many push messages the pusher took for the
-- user in the window that began at window_start (as email_budgets).
CREATE TABLE push_budgets (
    user_id      UUID PRIMARY KEY,
    window_start TIMESTAMPTZ NOT NULL,
    used         INT         NOT NULL
);

CREATE INDEX push_budgets_window ON push_budgets (window_start);
