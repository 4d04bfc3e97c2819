-- Users who asked for no more e-mail (the unsubscribe link of an e-mail,
-- RFC 8058 one-click). Their notifications are still stored and listed;
-- the mailer drops their e-mails (`suppressed_at`) instead of sending them.
CREATE TABLE email_unsubscribes (
    user_id         UUID PRIMARY KEY,
    unsubscribed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
