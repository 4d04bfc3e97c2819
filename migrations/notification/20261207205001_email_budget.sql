-- Each recipient's e-mail budget: how many e-mails the mailer took for the
-- address (lower-cased) in the window that began at window_start. A row
-- whose window is over counts as absent; pruning deletes it.
CREATE TABLE email_budgets (
    recipient    TEXT PRIMARY KEY,
    window_start TIMESTAMPTZ NOT NULL,
    used         INT         NOT NULL
);

CREATE INDEX email_budgets_window ON email_budgets (window_start);

-- An e-mail not sent because its recipient's budget was spent: the
-- notification is still stored and listed; only the e-mail is dropped.
ALTER TABLE email_deliveries ADD COLUMN suppressed_at TIMESTAMPTZ;
