-- Idempotency-Keys of requests with an effect (placing an order, moving
-- money), for every service: a request sent again under the same key (a
-- retry after a lost answer) is answered from the first one's outcome instead
-- of having its effect twice. `scope` names the operation, `request` is what
-- the first request asked (a retry asking something else is refused), and
-- `outcome` what the operation needs to answer again. A key expires after the
-- service's configured time (it is then free again) and is pruned later.
-- (Version 0008: the runtime's migrations are numbered apart from each other
-- and from the services' timestamped ones.)
CREATE TABLE idempotency_keys (
    scope      TEXT        NOT NULL,
    user_id    UUID        NOT NULL,
    key        TEXT        NOT NULL,
    request    TEXT        NOT NULL,
    outcome    JSONB       NOT NULL DEFAULT 'null'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, user_id, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
