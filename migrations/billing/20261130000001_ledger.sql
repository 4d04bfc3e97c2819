-- The append-only ledger of every money movement: each deposit, withdrawal
-- and successful payment is one entry, written by the same statement as the
-- balance change, so an account's balance always equals the sum of its
-- entries (`order-system audit` checks it). Amounts are signed: a deposit is
-- positive, a withdrawal or a payment negative.
CREATE TABLE ledger_entries (
    id            BIGSERIAL PRIMARY KEY,
    user_id       UUID           NOT NULL REFERENCES accounts (user_id),
    kind          TEXT           NOT NULL CHECK (kind IN ('opening', 'deposit', 'withdrawal', 'payment')),
    -- Where it came from: `request:<X-Request-Id>` for a REST call,
    -- `message:<message id>` for a message, `migration` for an opening entry.
    source        TEXT           NOT NULL,
    -- The payment charged (kind 'payment'): unique, so a payment can never
    -- be charged twice whatever the path.
    payment_id    UUID           UNIQUE,
    amount        NUMERIC(14, 2) NOT NULL CHECK (amount <> 0),
    balance_after NUMERIC(14, 2) NOT NULL CHECK (balance_after >= 0),
    created_at    TIMESTAMPTZ    NOT NULL DEFAULT now(),
    CHECK ((kind = 'payment') = (payment_id IS NOT NULL))
);

CREATE INDEX ledger_entries_user ON ledger_entries (user_id, id);

-- Append-only: entries are never changed or removed.
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only (% refused)', TG_OP;
END;
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

-- Accounts that existed before the ledger open it with their balance.
INSERT INTO ledger_entries (user_id, kind, source, amount, balance_after)
SELECT user_id, 'opening', 'migration', balance, balance FROM accounts WHERE balance <> 0;
