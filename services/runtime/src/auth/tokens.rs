//! Access-token verification, for the gateway and for any service whose port
//! faces browsers (the push service's HTTPS listener): identity's public keys
//! (JWKS), fetched at start and again when a token names an unknown key, and
//! the list of revoked tokens, refreshed from identity and updated at once by
//! a logout that passes through this process.
//!
//! Revocation fails closed: when the list could not be loaded for longer than
//! `REVOCATION_MAX_AGE_SECS`, a token that is otherwise valid cannot be judged
//! and is answered 503 with `Retry-After` (and the process is not ready),
//! never accepted. A stream opened with a token ends with it
//! ([`TokenVerifier::until_ended`]).
//!
//! A token verified once is remembered by its exact text until its `exp`
//! (`TOKEN_CACHE_CAPACITY` of them at most): the same token again (an SPA
//! polls with one token for its whole life) costs a map lookup instead of a
//! signature check. What can end a token before its `exp` is checked on every
//! use all the same: its revocation, the revoked-token list's age, and
//! identity no longer publishing the key that signed it (the memory is
//! forgotten when a key disappears from identity's keys).

use axum::http::{HeaderMap, Uri, header};
use contracts::api::{TOKEN_COOKIE, TOKEN_ISSUER, TokenClaims};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Http = Client<HttpConnector, Empty<axum::body::Bytes>>;

/// Why a request is not authenticated.
#[derive(Debug, PartialEq)]
pub enum TokenError {
    Missing,
    Invalid,
    /// No key to check with yet (identity unreachable since start).
    Unavailable,
    /// The token is well signed, but the list of revoked tokens is older
    /// than allowed: whether it was logged out cannot be told.
    RevocationsStale,
    /// The token names a key not known here, and identity's keys were
    /// fetched too recently to look again yet.
    UnknownKeyYet,
}

/// Fetches of identity's keys prompted by tokens naming an unknown key are
/// at most this often.
const KEY_FETCH_INTERVAL: Duration = Duration::from_secs(1);

/// Clock skew allowed on `exp`.
pub const LEEWAY_SECS: u64 = 5;

/// What a client is told to wait when tokens cannot be judged.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// How a verifier keeps its keys and revocations current.
#[derive(clap::Args, Clone, Debug)]
pub struct VerifierConfig {
    /// How often the list of revoked tokens is refreshed from identity, in
    /// milliseconds (a logout through this replica applies at once).
    #[arg(long, env = "REVOCATION_REFRESH_MS", default_value_t = 2000)]
    pub revocation_refresh_ms: u64,
    /// Longest time without a successful load of the revoked-token list;
    /// past it, tokens are refused with 503 and the process is not ready.
    #[arg(long, env = "REVOCATION_MAX_AGE_SECS", default_value_t = 30)]
    pub revocation_max_age_secs: u64,
    /// How often identity's public keys (JWKS) are fetched again, in seconds
    /// (a token naming an unknown key fetches them at once, at most every 5 s).
    #[arg(long, env = "KEY_REFRESH_SECS", default_value_t = 300)]
    pub key_refresh_secs: u64,
    /// Verified tokens remembered (by their exact text, each until its
    /// `exp`) so that the same token is not verified again; 0: none.
    #[arg(long, env = "TOKEN_CACHE_CAPACITY", default_value_t = 10_000)]
    pub token_cache_capacity: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        VerifierConfig {
            revocation_refresh_ms: 2000,
            revocation_max_age_secs: 30,
            key_refresh_secs: 300,
            token_cache_capacity: 10_000,
        }
    }
}

/// The answers every service gives for these, in one place.
impl From<TokenError> for crate::ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Missing => {
                crate::ApiError::unauthorized("authentication required: send a bearer token or the accessToken cookie")
            }
            TokenError::Invalid => crate::ApiError::unauthorized("the access token is invalid, expired or revoked"),
            TokenError::Unavailable => crate::ApiError::unavailable("authentication is not available yet", RETRY_AFTER),
            TokenError::UnknownKeyYet => crate::ApiError::unavailable(
                "the token's signing key is not known here yet; try again shortly",
                KEY_FETCH_INTERVAL,
            ),
            TokenError::RevocationsStale => crate::ApiError::unavailable(
                "the token cannot be checked now (the list of revoked tokens is out of date); try again later",
                RETRY_AFTER,
            ),
        }
    }
}

pub struct TokenVerifier {
    http: Http,
    identity_url: String,
    keys: RwLock<HashMap<String, DecodingKey>>,
    revoked: RwLock<HashMap<Uuid, i64>>,
    /// When the revoked-token list was last loaded in full.
    revoked_loaded: RwLock<Option<tokio::time::Instant>>,
    /// Bumped whenever a token is revoked here or the list is reloaded.
    revocations: tokio::sync::watch::Sender<u64>,
    last_key_fetch: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Tokens verified here, by their exact text, with their claims.
    verified: RwLock<HashMap<String, TokenClaims>>,
    config: VerifierConfig,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: String,
    kty: String,
    crv: Option<String>,
    x: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Revoked {
    jti: Uuid,
    expires_at: chrono::DateTime<chrono::Utc>,
}

/// The token a request carries: `Authorization: Bearer`, else the
/// `accessToken` cookie. Never the query string.
pub fn token_of(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
    {
        return Some(t.trim());
    }
    cookies(headers).find(|(name, _)| *name == TOKEN_COOKIE).map(|(_, value)| value).filter(|v| !v.is_empty())
}

/// Every `name=value` cookie of a request's `Cookie` headers, in order.
pub fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
}

impl TokenVerifier {
    pub fn new(identity_url: &str, config: VerifierConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        TokenVerifier {
            http: Client::builder(TokioExecutor::new()).build(connector),
            identity_url: identity_url.trim_end_matches('/').to_string(),
            keys: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashMap::new()),
            revoked_loaded: RwLock::new(None),
            revocations: tokio::sync::watch::channel(0).0,
            last_key_fetch: tokio::sync::Mutex::new(None),
            verified: RwLock::new(HashMap::new()),
            config,
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let uri: Uri = format!("{}{path}", self.identity_url).parse()?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.http.get(uri)).await??;
        anyhow::ensure!(resp.status().is_success(), "identity answered {} to {path}", resp.status());
        Ok(serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?)
    }

    async fn fetch_keys(&self) -> anyhow::Result<()> {
        let jwks: Jwks = self.get_json("/.well-known/jwks.json").await?;
        let mut keys = HashMap::new();
        for k in jwks.keys {
            if let (true, Some("Ed25519"), Some(x)) = (k.kty == "OKP", k.crv.as_deref(), k.x.as_deref()) {
                keys.insert(k.kid, DecodingKey::from_ed_components(x)?);
            }
        }
        anyhow::ensure!(!keys.is_empty(), "identity published no Ed25519 key");
        self.replace_keys(keys);
        Ok(())
    }

    async fn fetch_revoked(&self) -> anyhow::Result<()> {
        let list: Vec<Revoked> = self.get_json("/internal/v1/revoked-tokens").await?;
        let added = self.merge_revoked(list.into_iter().map(|r| (r.jti, r.expires_at.timestamp())));
        *self.revoked_loaded.write().expect("loaded lock") = Some(tokio::time::Instant::now());
        // Only a token newly revoked wakes the open streams: a reload that
        // brings nothing new (nearly every one) costs them nothing.
        if added {
            self.revocations.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Takes identity's keys; a key no longer among them signs nothing
    /// that is accepted here any more, remembered tokens included.
    fn replace_keys(&self, keys: HashMap<String, DecodingKey>) {
        let mut current = self.keys.write().expect("keys lock");
        if current.keys().any(|kid| !keys.contains_key(kid)) {
            self.verified.write().expect("verified lock").clear();
        }
        *current = keys;
    }

    /// Takes a full load of the revoked tokens (id, expiry), forgetting the
    /// expired ones; whether it named one not known here before.
    fn merge_revoked(&self, list: impl IntoIterator<Item = (Uuid, i64)>) -> bool {
        let now = chrono::Utc::now().timestamp();
        let mut revoked = self.revoked.write().expect("revoked lock");
        revoked.retain(|_, exp| *exp > now);
        let mut added = false;
        for (jti, exp) in list.into_iter().filter(|(_, exp)| *exp > now) {
            added |= revoked.insert(jti, exp).is_none();
        }
        added
    }

    /// Whether the revoked-token list is too old to judge tokens by.
    pub fn revocations_stale(&self) -> bool {
        self.stale_in().is_none()
    }

    /// How long until the revoked-token list is too old to judge tokens by,
    /// unless it is loaded again before; `None` when it already is.
    fn stale_in(&self) -> Option<Duration> {
        let max_age = Duration::from_secs(self.config.revocation_max_age_secs);
        let loaded = (*self.revoked_loaded.read().expect("loaded lock"))?;
        max_age.checked_sub(loaded.elapsed()).filter(|left| !left.is_zero())
    }

    /// Why this process cannot verify tokens now (readiness), if it cannot.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.has_keys() {
            Some("identity's token keys not loaded yet")
        } else if self.revocations_stale() {
            Some("the list of revoked tokens could not be loaded recently")
        } else {
            None
        }
    }

    /// Whether tokens can be verified yet (identity's keys are loaded).
    pub fn has_keys(&self) -> bool {
        !self.keys.read().expect("keys lock").is_empty()
    }

    /// Keeps the keys and the revocations current until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let every = Duration::from_millis(self.config.revocation_refresh_ms.max(1));
        let key_every = Duration::from_secs(self.config.key_refresh_secs.max(1));
        let mut pause = Duration::from_millis(100);
        while !self.has_keys() {
            match self.fetch_keys().await {
                Ok(()) => tracing::info!("identity keys loaded"),
                Err(e) => tracing::warn!(error = %e, retry_in = ?pause, "identity keys not available yet"),
            }
            if !self.has_keys() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
        let mut keys_fetched = tokio::time::Instant::now();
        loop {
            if let Err(e) = self.fetch_revoked().await {
                tracing::warn!(error = %e, stale = self.revocations_stale(), "could not refresh revoked tokens");
            }
            if keys_fetched.elapsed() >= key_every {
                keys_fetched = tokio::time::Instant::now();
                if let Err(e) = self.fetch_keys().await {
                    tracing::warn!(error = %e, "could not refresh identity's keys");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Applies a logout at once in this process.
    pub fn revoke(&self, claims: &TokenClaims) {
        self.revoked.write().expect("revoked lock").insert(claims.jti, claims.exp);
        self.revocations.send_modify(|n| *n += 1);
    }

    fn is_revoked(&self, jti: &Uuid) -> bool {
        self.revoked.read().expect("revoked lock").contains_key(jti)
    }

    /// Resolves when the authority of `claims` ends: the token expires, is
    /// revoked, or can no longer be judged (revocations stale). A stream
    /// opened with the token ends then; the client reconnects with a fresh one.
    pub async fn until_ended(&self, claims: &TokenClaims) {
        let mut changes = self.revocations.subscribe();
        // Accepted through the second `exp` + the leeway, so held until then
        // too (a reconnect before it would be accepted and end at once).
        let expires =
            chrono::DateTime::from_timestamp(claims.exp.saturating_add(LEEWAY_SECS as i64 + 1), 0).unwrap_or_default();
        // A stream sleeps until its token expires or the list could go stale
        // (the list's age limit after its last load: one wake-up per limit,
        // not per reload), or a token is revoked: with thousands of streams
        // open, nothing else wakes them.
        loop {
            if self.is_revoked(&claims.jti) {
                return;
            }
            let Some(stale_in) = self.stale_in() else { return };
            let left = (expires - chrono::Utc::now()).to_std().unwrap_or_default();
            if left.is_zero() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(stale_in)) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// The claims of a valid, unexpired, unrevoked token.
    pub async fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        if let Some(claims) = self.remembered(token, chrono::Utc::now().timestamp()) {
            return self.admit(claims);
        }
        let claims = self.check_signature(token).await?;
        let claims = self.admit(claims)?;
        self.remember(token, &claims);
        Ok(claims)
    }

    /// The claims of `token` verified before, unless it has expired since
    /// (through the leeway, as the signature check counts it) as of `now`.
    fn remembered(&self, token: &str, now: i64) -> Option<TokenClaims> {
        let verified = self.verified.read().expect("verified lock");
        let claims = verified.get(token)?;
        (now <= claims.exp.saturating_add(LEEWAY_SECS as i64)).then(|| claims.clone())
    }

    /// Keeps `token`'s claims for its next use, within the capacity: full,
    /// the expired ones go first, then one at random.
    fn remember(&self, token: &str, claims: &TokenClaims) {
        let capacity = self.config.token_cache_capacity;
        if capacity == 0 {
            return;
        }
        let now = chrono::Utc::now().timestamp();
        let mut verified = self.verified.write().expect("verified lock");
        if verified.len() >= capacity {
            verified.retain(|_, c| now <= c.exp.saturating_add(LEEWAY_SECS as i64));
            while verified.len() >= capacity {
                let Some(any) = verified.keys().next().cloned() else { break };
                verified.remove(&any);
            }
        }
        verified.insert(token.to_string(), claims.clone());
    }

    /// What can end a well-signed token before its `exp`, checked on every
    /// use: its revocation, and whether revocations can be judged at all.
    fn admit(&self, claims: TokenClaims) -> Result<TokenClaims, TokenError> {
        if self.is_revoked(&claims.jti) {
            return Err(TokenError::Invalid);
        }
        if self.revocations_stale() {
            return Err(TokenError::RevocationsStale);
        }
        Ok(claims)
    }

    /// The claims of a token signed by one of identity's keys, not expired.
    async fn check_signature(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        if !self.keys.read().expect("keys lock").contains_key(&kid) {
            // A new key (a rotation), or none yet: fetch again, at most
            // once per KEY_FETCH_INTERVAL whatever the tokens name.
            let mut last = self.last_key_fetch.lock().await;
            if last.is_none_or(|t| t.elapsed() >= KEY_FETCH_INTERVAL) {
                *last = Some(tokio::time::Instant::now());
                if let Err(e) = self.fetch_keys().await {
                    tracing::warn!(error = %e, "could not fetch identity's keys");
                }
            } else if !self.keys.read().expect("keys lock").contains_key(&kid) {
                // Not looked up now: it may be a key published a moment ago.
                return Err(TokenError::UnknownKeyYet);
            }
        }
        let keys = self.keys.read().expect("keys lock");
        if keys.is_empty() {
            return Err(TokenError::Unavailable);
        }
        let key = keys.get(&kid).ok_or(TokenError::Invalid)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = LEEWAY_SECS;
        jsonwebtoken::decode::<TokenClaims>(token, key, &validation).map(|d| d.claims).map_err(|_| TokenError::Invalid)
    }

    /// The claims of the token `headers` carry.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<TokenClaims, TokenError> {
        let token = token_of(headers).ok_or(TokenError::Missing)?;
        self.verify(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(max_age_secs: u64) -> TokenVerifier {
        let config = VerifierConfig { revocation_max_age_secs: max_age_secs, ..VerifierConfig::default() };
        TokenVerifier::new("http://127.0.0.1:9", config)
    }

    fn loaded_now(v: &TokenVerifier) {
        *v.revoked_loaded.write().unwrap() = Some(tokio::time::Instant::now());
    }

    fn claims() -> TokenClaims {
        let now = chrono::Utc::now().timestamp();
        TokenClaims {
            iss: TOKEN_ISSUER.into(),
            sub: "alice".into(),
            user_id: Uuid::new_v4(),
            email: "alice@example.com".into(),
            iat: now,
            exp: now + 3600,
            jti: Uuid::new_v4(),
        }
    }

    #[tokio::test]
    async fn a_stream_outlives_its_list_age_limit_while_the_list_is_reloaded_and_ends_once_it_is_not() {
        let v = Arc::new(verifier(1));
        loaded_now(&v);
        let c = claims();
        let reloads = {
            let v = v.clone();
            tokio::spawn(async move {
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    loaded_now(&v);
                }
            })
        };
        // Three age limits pass while the list is kept fresh: still open.
        let open = tokio::time::timeout(Duration::from_millis(2500), v.until_ended(&c)).await;
        assert!(open.is_err(), "ended although the list was fresh");
        reloads.await.unwrap();
        // No reload any more: the list goes stale and the stream ends.
        tokio::time::timeout(Duration::from_secs(5), v.until_ended(&c)).await.expect("ended once the list went stale");
        assert!(v.revocations_stale());
    }

    #[tokio::test]
    async fn a_stream_ends_when_its_token_is_revoked_here() {
        let v = Arc::new(verifier(30));
        loaded_now(&v);
        let c = claims();
        let ended = tokio::spawn({
            let (v, c) = (v.clone(), c.clone());
            async move { v.until_ended(&c).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!ended.is_finished());
        v.revoke(&claims()); // another token: the stream looks and stays
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!ended.is_finished());
        v.revoke(&c);
        tokio::time::timeout(Duration::from_secs(5), ended).await.expect("ended on revocation").unwrap();
    }

    /// A verifier that knows one signing key (`k1`), its revoked-token
    /// list just loaded, and what signs tokens with that key.
    fn knowing_a_key(capacity: usize) -> (TokenVerifier, impl Fn(&TokenClaims) -> String) {
        let config = VerifierConfig { token_cache_capacity: capacity, ..VerifierConfig::default() };
        let v = TokenVerifier::new("http://127.0.0.1:9", config);
        let (encoding, decoding) = key_pair();
        v.keys.write().unwrap().insert("k1".into(), decoding);
        loaded_now(&v);
        let sign = move |c: &TokenClaims| {
            let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
            header.kid = Some("k1".into());
            jsonwebtoken::encode(&header, c, &encoding).unwrap()
        };
        (v, sign)
    }

    fn key_pair() -> (jsonwebtoken::EncodingKey, DecodingKey) {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let der = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(der.as_ref()).unwrap();
        (jsonwebtoken::EncodingKey::from_ed_der(der.as_ref()), DecodingKey::from_ed_der(pair.public_key().as_ref()))
    }

    #[tokio::test]
    async fn a_token_verified_once_is_taken_from_memory_and_refused_after_a_reload_revokes_it() {
        let (v, sign) = knowing_a_key(100);
        let c = claims();
        let token = sign(&c);
        assert_eq!(v.verify(&token).await.unwrap().user_id, c.user_id);
        // Key `k1` now checks signatures of another key: a token seen for
        // the first time fails, the remembered one is not checked again.
        v.keys.write().unwrap().insert("k1".into(), key_pair().1);
        assert_eq!(v.verify(&sign(&claims())).await.unwrap_err(), TokenError::Invalid);
        assert_eq!(v.verify(&token).await.unwrap().jti, c.jti);
        // The next reload of the revoked-token list names it: refused at once.
        assert!(v.merge_revoked([(c.jti, c.exp)]));
        assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::Invalid);
        // A logout through this process, likewise.
        let (v, sign) = knowing_a_key(100);
        let c = claims();
        let token = sign(&c);
        assert!(v.verify(&token).await.is_ok());
        v.revoke(&c);
        assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::Invalid);
    }

    #[tokio::test]
    async fn a_remembered_token_ends_at_its_exp_and_cannot_be_judged_with_a_stale_list() {
        let (v, sign) = knowing_a_key(100);
        let c = claims();
        let token = sign(&c);
        assert!(v.verify(&token).await.is_ok());
        let through = c.exp + LEEWAY_SECS as i64;
        assert!(v.remembered(&token, through).is_some());
        assert!(v.remembered(&token, through + 1).is_none(), "past exp and the leeway it is not taken from memory");
        *v.revoked_loaded.write().unwrap() = None;
        assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::RevocationsStale);
    }

    #[tokio::test]
    async fn a_key_identity_no_longer_publishes_forgets_the_tokens_it_signed() {
        let (v, sign) = knowing_a_key(100);
        let token = sign(&claims());
        assert!(v.verify(&token).await.is_ok());
        // A new key beside it: nothing is forgotten.
        v.replace_keys(HashMap::from([("k1".to_string(), key_pair().1), ("k2".to_string(), key_pair().1)]));
        assert!(v.remembered(&token, chrono::Utc::now().timestamp()).is_some());
        // `k1` gone: its tokens are refused, the remembered one too.
        v.replace_keys(HashMap::from([("k2".to_string(), key_pair().1)]));
        assert!(v.remembered(&token, chrono::Utc::now().timestamp()).is_none());
        assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::Invalid);
    }

    #[tokio::test]
    async fn the_memory_of_tokens_is_bounded_and_can_be_turned_off() {
        let (v, sign) = knowing_a_key(2);
        for _ in 0..3 {
            assert!(v.verify(&sign(&claims())).await.is_ok());
        }
        assert_eq!(v.verified.read().unwrap().len(), 2);
        let (v, sign) = knowing_a_key(0);
        let token = sign(&claims());
        assert!(v.verify(&token).await.is_ok());
        assert!(v.verified.read().unwrap().is_empty());
        // Without a memory every use is checked: another key under `k1` refuses it.
        v.keys.write().unwrap().insert("k1".into(), key_pair().1);
        assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn a_reload_tells_only_of_tokens_not_revoked_here_before() {
        let v = verifier(30);
        let future = chrono::Utc::now().timestamp() + 600;
        let (a, b, gone) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert!(v.merge_revoked([(a, future)]));
        assert!(!v.merge_revoked([(a, future)]), "the same list again is no news");
        assert!(!v.merge_revoked([(a, future), (gone, future - 1200)]), "an expired entry is no news");
        assert!(!v.is_revoked(&gone));
        assert!(v.merge_revoked([(a, future), (b, future)]));
        assert!(v.is_revoked(&a) && v.is_revoked(&b));
    }
}
