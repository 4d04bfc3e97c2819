//! `Idempotency-Key`: the one set of rules for every request with an effect
//! (placing an order, a deposit, a withdrawal).
//!
//! - The key is 1 to 255 visible ASCII characters, scoped to the user and the
//!   operation; a malformed key is 400.
//! - The request claims its key in the transaction of its effect. The first
//!   request with a key stores what it asked and its outcome and has its
//!   effect; a repeat finds the key and is answered from that outcome, with
//!   no second effect; a repeat that asks something else is 422.
//! - Two concurrent requests with one key: the second one's claim waits for
//!   the first one's transaction; it then finds the key (one effect), or, if
//!   the first rolled back, claims it itself.
//! - A request that fails (rolls back) leaves no key: a retry is tried afresh.
//! - A key expires [`IdempotencyConfig::ttl`] after its first use: from then on
//!   it is free again (a new effect), and [`prune`] deletes it.

use axum::http::HeaderMap;
use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

use crate::ApiError;
use crate::data::prune::Prune;

pub const HEADER: &str = "idempotency-key";

#[derive(clap::Args, Clone, Debug)]
pub struct IdempotencyConfig {
    /// How long an Idempotency-Key is remembered, in seconds (then a request
    /// with it is new again, and it is pruned).
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL_SECS", default_value_t = 24 * 3600)]
    pub idempotency_key_ttl_secs: u64,

    /// Seconds between two prunings of the expired keys.
    #[arg(long, env = "IDEMPOTENCY_PRUNE_INTERVAL_SECS", default_value_t = 3600)]
    pub idempotency_prune_interval_secs: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig { idempotency_key_ttl_secs: 24 * 3600, idempotency_prune_interval_secs: 3600 }
    }
}

impl IdempotencyConfig {
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.idempotency_key_ttl_secs)
    }

    pub fn prune_interval(&self) -> Duration {
        Duration::from_secs(self.idempotency_prune_interval_secs)
    }
}

/// The `Idempotency-Key` header as the OpenAPI documents describe it
/// (`params(IdempotencyKeyHeader)`).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// Makes a retry safe: a request sent again with the same key (by the same
    /// user) has its effect once and is answered as the first time; the same
    /// key with another request body is 422. Keys are remembered for 24 hours
    /// (configurable).
    #[param(rename = "Idempotency-Key", min_length = 1, max_length = 255, pattern = r"^[\x21-\x7E]+$")]
    pub idempotency_key: Option<String>,
}

/// A client's `Idempotency-Key`.
#[derive(Clone, Debug)]
pub struct Key(String);

impl Key {
    /// The request's key, if it sent one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Key>, ApiError> {
        let Some(value) = headers.get(HEADER) else { return Ok(None) };
        match value.to_str() {
            Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(Some(Key(key.into())))
            }
            _ => Err(ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One operation's use of a key.
pub struct Request<'a> {
    /// The operation (`order`, `deposit`, ...): keys of different operations never meet.
    pub scope: &'static str,
    pub user: Uuid,
    pub key: &'a Key,
    /// What the request asks, in a canonical form (e.g. `amount=12.5`).
    pub request: String,
    /// What a repeat needs to be answered as this request was.
    pub outcome: serde_json::Value,
    /// The 422 message for a repeat that asks something else.
    pub conflict: &'static str,
}

/// What claiming a key found.
#[derive(Debug)]
pub enum Claim {
    /// The key is this request's: have the effect in the same transaction.
    First,
    /// The key was used by an earlier request with the same ask: roll back and
    /// answer from its outcome.
    Repeat(serde_json::Value),
}

/// Claims the key in `tx` (the transaction of the effect); see the module.
pub async fn claim(tx: &mut PgConnection, r: Request<'_>, ttl: Duration) -> Result<Claim, ApiError> {
    // A key past its time is taken over as if new. The statement waits for a
    // concurrent transaction that inserted the same key.
    let claimed = sqlx::query_scalar!(
        r#"INSERT INTO idempotency_keys (scope, user_id, key, request, outcome) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (scope, user_id, key) DO UPDATE
             SET request = EXCLUDED.request, outcome = EXCLUDED.outcome, created_at = now()
             WHERE idempotency_keys.created_at <= now() - make_interval(secs => $6)
         RETURNING true AS "claimed!""#,
        r.scope,
        r.user,
        r.key.as_str(),
        r.request,
        r.outcome,
        ttl.as_secs_f64(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_some() {
        return Ok(Claim::First);
    }
    // A new statement sees what the concurrent transaction committed.
    let first = sqlx::query!(
        "SELECT request, outcome FROM idempotency_keys WHERE scope = $1 AND user_id = $2 AND key = $3",
        r.scope,
        r.user,
        r.key.as_str(),
    )
    .fetch_one(&mut *tx)
    .await?;
    let (request, outcome) = (first.request, first.outcome);
    if request != r.request {
        return Err(ApiError::unprocessable(r.conflict));
    }
    tracing::info!(scope = r.scope, user_id = %r.user, "request repeated under its Idempotency-Key");
    Ok(Claim::Repeat(outcome))
}

/// Deletes the keys past their time, for [`crate::data::prune`].
pub fn prune(config: &IdempotencyConfig) -> Prune {
    crate::prune!(
        "idempotency keys",
        config.ttl(),
        "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1) LIMIT $2))"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn key(value: &[u8]) -> Result<Option<Key>, ApiError> {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_bytes(value).unwrap());
        Key::from_headers(&h)
    }

    #[test]
    fn no_header_is_no_key() {
        assert!(Key::from_headers(&HeaderMap::new()).unwrap().is_none());
    }

    #[test]
    fn visible_ascii_up_to_255_characters_is_a_key() {
        assert_eq!(key(b"order-2026-11-30#1").unwrap().unwrap().as_str(), "order-2026-11-30#1");
        assert_eq!(key("k".repeat(255).as_bytes()).unwrap().unwrap().as_str().len(), 255);
    }

    #[test]
    fn empty_too_long_spaced_or_non_ascii_keys_are_a_400() {
        for bad in [&b""[..], &b"a b"[..], "k".repeat(256).as_bytes(), "ключ".as_bytes(), &b"tab\there"[..]] {
            let e = key(bad).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_header_value_is_a_key_or_a_400(raw in proptest::collection::vec(0x20u8..0x7f, 0..300)) {
            match key(&raw) {
                Ok(Some(k)) => proptest::prop_assert!(
                    (1..=255).contains(&k.as_str().len()) && k.as_str().bytes().all(|b| b.is_ascii_graphic())
                ),
                Ok(None) => proptest::prop_assert!(false, "a header was sent"),
                Err(e) => proptest::prop_assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST),
            }
        }
    }
}
