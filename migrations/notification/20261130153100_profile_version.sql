-- The version of the profile copy (from UserCreated/UserUpdated): an event
-- older than the copy changes nothing. 0: a copy from before versions existed.
ALTER TABLE profiles ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
