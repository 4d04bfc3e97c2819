-- The profile's version: 1 at registration, one more at every change, carried
-- by UserCreated/UserUpdated so that a copy never goes back to an older one.
ALTER TABLE users ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
