-- A copy of each user's contact details, from UserCreated / UserUpdated.
CREATE TABLE profiles (
    user_id    UUID PRIMARY KEY,
    email      TEXT        NOT NULL,
    first_name TEXT,
    last_name  TEXT,
    phone      TEXT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE notifications (
    id         UUID PRIMARY KEY,
    user_id    UUID        NOT NULL,
    message    TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX notifications_user ON notifications (user_id, created_at DESC, id DESC);

-- E-mails to send: written with the notification, sent by the mailer once
-- the user's profile (their address) is known, retried with backoff.
CREATE TABLE email_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    notification_id UUID        NOT NULL REFERENCES notifications (id),
    user_id         UUID        NOT NULL,
    subject         TEXT        NOT NULL,
    body            TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INT         NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    sent_to         TEXT,
    sent_at         TIMESTAMPTZ
);

CREATE INDEX email_deliveries_due ON email_deliveries (next_attempt_at) WHERE sent_at IS NULL;
