-- One account per user, created on first touch; the balance can never go
-- below zero (every debit is one conditional UPDATE, and this CHECK guards it).
CREATE TABLE accounts (
    user_id    UUID PRIMARY KEY,
    balance    NUMERIC(14, 2) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_at TIMESTAMPTZ    NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ    NOT NULL DEFAULT now()
);

-- Every payment asked for by CreatePayment, with its outcome. The id is the
-- caller's, so a payment asked twice is charged once.
CREATE TABLE payments (
    id         UUID PRIMARY KEY,
    user_id    UUID           NOT NULL,
    amount     NUMERIC(14, 2) NOT NULL CHECK (amount > 0),
    succeeded  BOOLEAN        NOT NULL,
    reason     TEXT,
    created_at TIMESTAMPTZ    NOT NULL DEFAULT now()
);

CREATE INDEX payments_user ON payments (user_id, created_at DESC);
