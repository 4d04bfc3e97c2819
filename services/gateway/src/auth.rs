//! Token verification at the gateway: identity's public keys (JWKS), fetched
//! at start and again when a token names an unknown key, and the list of
//! revoked tokens, refreshed from identity and updated at once by a logout
//! that passes through here.

use axum::http::HeaderMap;
use contracts::api::{TOKEN_COOKIE, TOKEN_ISSUER, TokenClaims};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::proxy::{Client, get_json};

pub struct Authenticator {
    client: Client,
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

/// Why a request is not authenticated.
#[derive(Debug, PartialEq)]
pub enum AuthError {
    Missing,
    Invalid,
    /// No key to check with yet (identity unreachable since start).
    Unavailable,
}

/// The token a request carries: `Authorization: Bearer`, else the cookie.
pub fn token_of(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
    {
        return Some(t.trim());
    }
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

impl Authenticator {
    pub fn new(client: Client, identity_url: String) -> Self {
        Authenticator {
            client,
            identity_url,
            keys: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashMap::new()),
            last_key_fetch: tokio::sync::Mutex::new(None),
        }
    }

    async fn fetch_keys(&self) -> anyhow::Result<()> {
        let jwks: Jwks = get_json(&self.client, &format!("{}/.well-known/jwks.json", self.identity_url)).await?;
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

    /// Fetches the keys again, at most once every few seconds.
    async fn refresh_keys(&self) {
        let mut last = self.last_key_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        if let Err(e) = self.fetch_keys().await {
            tracing::warn!(error = %e, "could not fetch identity's keys");
        }
    }

    async fn fetch_revoked(&self) -> anyhow::Result<()> {
        let list: Vec<Revoked> =
            get_json(&self.client, &format!("{}/internal/v1/revoked-tokens", self.identity_url)).await?;
        let now = chrono::Utc::now().timestamp();
        let mut revoked = self.revoked.write().expect("revoked lock");
        revoked.retain(|_, exp| *exp > now);
        revoked.extend(list.into_iter().map(|r| (r.jti, r.expires_at.timestamp())));
        Ok(())
    }

    /// Keeps keys and revocations current until `shutdown`.
    pub async fn keep_fresh(
        self: std::sync::Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut pause = Duration::from_millis(100);
        while self.keys.read().expect("keys lock").is_empty() {
            match self.fetch_keys().await {
                Ok(()) => tracing::info!("identity keys loaded"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "identity keys not available yet")
                }
            }
            if self.keys.read().expect("keys lock").is_empty() {
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

    /// Whether tokens can be verified yet (identity's keys are loaded).
    pub fn has_keys(&self) -> bool {
        !self.keys.read().expect("keys lock").is_empty()
    }

    /// Applies a logout at once on this replica.
    pub fn revoke(&self, claims: &TokenClaims) {
        self.revoked.write().expect("revoked lock").insert(claims.jti, claims.exp);
    }

    pub async fn verify(&self, token: &str) -> Result<TokenClaims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let kid = header.kid.ok_or(AuthError::Invalid)?;
        if !self.keys.read().expect("keys lock").contains_key(&kid) {
            self.refresh_keys().await;
        }
        let keys = self.keys.read().expect("keys lock");
        if keys.is_empty() {
            return Err(AuthError::Unavailable);
        }
        let key = keys.get(&kid).ok_or(AuthError::Invalid)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 5;
        let claims =
            jsonwebtoken::decode::<TokenClaims>(token, key, &validation).map_err(|_| AuthError::Invalid)?.claims;
        if self.revoked.read().expect("revoked lock").contains_key(&claims.jti) {
            return Err(AuthError::Invalid);
        }
        Ok(claims)
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<TokenClaims, AuthError> {
        let token = token_of(headers).ok_or(AuthError::Missing)?;
        self.verify(token).await
    }
}
