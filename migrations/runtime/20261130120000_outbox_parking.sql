-- A message the broker keeps refusing (returned unroutable or nacked) is
-- parked after OUTBOX_PARK_AFTER refusals: kept with its reason, no longer
-- retried, and not in the way of the rows behind it. An operator sends it
-- again with `UPDATE outbox SET parked_at = NULL, refusals = 0 WHERE id = ...`.
ALTER TABLE outbox
    ADD COLUMN refusals      INT NOT NULL DEFAULT 0,
    ADD COLUMN parked_at     TIMESTAMPTZ,
    ADD COLUMN parked_reason TEXT;

CREATE INDEX outbox_parked ON outbox (id) WHERE parked_at IS NOT NULL;
