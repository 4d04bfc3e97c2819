-- An e-mail that can never be sent (an address the SMTP library refuses, a
-- 5xx answer) ends here with its reason instead of being retried forever.
ALTER TABLE email_deliveries
    ADD COLUMN failed_at     TIMESTAMPTZ,
    ADD COLUMN failed_reason TEXT;
