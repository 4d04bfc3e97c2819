-- The gateway and push replicas ask for the unexpired revoked tokens every
-- few seconds, and the pruner deletes the expired ones: both by expiry.
CREATE INDEX revoked_tokens_expires_at ON revoked_tokens (expires_at);
