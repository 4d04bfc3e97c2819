//! Access-token verification, for the gateway and for any service whose port
//! faces browsers (the push service's HTTPS listener): identity's public keys
//! (JWKS), fetched at start and again when a token names an unknown key, and
//! the list of revoked tokens, refreshed from identity and updated at once by
//! a logout that passes through this process.

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
}

/// The answers every service gives for these, in one place.
impl From<TokenError> for crate::ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Missing => {
                crate::ApiError::unauthorized("authentication required: send a bearer token or the accessToken cookie")
            }
            TokenError::Invalid => crate::ApiError::unauthorized("the access token is invalid, expired or revoked"),
            TokenError::Unavailable => {
                crate::ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "authentication is not available yet")
            }
        }
    }
}

pub struct TokenVerifier {
    http: Http,
    identity_url: String,
    keys: RwLock<HashMap<String, DecodingKey>>,
    revoked: RwLock<HashMap<Uuid, i64>>,
    last_key_fetch: tokio::sync::Mutex<Option<tokio::time::Instant>>,
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
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

impl TokenVerifier {
    pub fn new(identity_url: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        TokenVerifier {
            http: Client::builder(TokioExecutor::new()).build(connector),
            identity_url: identity_url.trim_end_matches('/').to_string(),
            keys: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashMap::new()),
            last_key_fetch: tokio::sync::Mutex::new(None),
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
        *self.keys.write().expect("keys lock") = keys;
        Ok(())
    }

    async fn fetch_revoked(&self) -> anyhow::Result<()> {
        let list: Vec<Revoked> = self.get_json("/internal/v1/revoked-tokens").await?;
        let now = chrono::Utc::now().timestamp();
        let mut revoked = self.revoked.write().expect("revoked lock");
        revoked.retain(|_, exp| *exp > now);
        revoked.extend(list.into_iter().map(|r| (r.jti, r.expires_at.timestamp())));
        Ok(())
    }

    /// Whether tokens can be verified yet (identity's keys are loaded).
    pub fn has_keys(&self) -> bool {
        !self.keys.read().expect("keys lock").is_empty()
    }

    /// Keeps the keys and the revocations current until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, every: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
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
        loop {
            if let Err(e) = self.fetch_revoked().await {
                tracing::warn!(error = %e, "could not refresh revoked tokens");
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
    }

    /// The claims of a valid, unexpired, unrevoked token.
    pub async fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        if !self.keys.read().expect("keys lock").contains_key(&kid) {
            // A new key, or none yet: fetch again, at most every few seconds.
            let mut last = self.last_key_fetch.lock().await;
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                *last = Some(tokio::time::Instant::now());
                if let Err(e) = self.fetch_keys().await {
                    tracing::warn!(error = %e, "could not fetch identity's keys");
                }
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
        validation.leeway = 5;
        let claims =
            jsonwebtoken::decode::<TokenClaims>(token, key, &validation).map_err(|_| TokenError::Invalid)?.claims;
        if self.revoked.read().expect("revoked lock").contains_key(&claims.jti) {
            return Err(TokenError::Invalid);
        }
        Ok(claims)
    }

    /// The claims of the token `headers` carry.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<TokenClaims, TokenError> {
        let token = token_of(headers).ok_or(TokenError::Missing)?;
        self.verify(token).await
    }
}
