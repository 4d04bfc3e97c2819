//! The token signing key (Ed25519), its public half as a JWKS, and the list
//! of revoked tokens the gateway keeps in step with.

use anyhow::Context;
use axum::extract::State;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{Ed25519KeyPair, KeyPair};
use runtime::{ApiError, Json};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

use crate::AppState;

pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: Vec<u8>,
    /// Signs device cookies (see `devices`), derived from the private key.
    device: ring::hmac::Key,
}

impl SigningKey {
    fn from_pkcs8(kid: String, der: &[u8]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| anyhow::anyhow!("not an Ed25519 PKCS#8 key: {e}"))?;
        let seed = ring::digest::digest(&ring::digest::SHA256, &[b"identity device cookie\n", der].concat());
        Ok(SigningKey {
            kid,
            encoding: EncodingKey::from_ed_der(der),
            public: pair.public_key().as_ref().to_vec(),
            device: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_ref()),
        })
    }

    /// A new key that is kept nowhere (for tests).
    #[cfg(test)]
    pub fn generated() -> anyhow::Result<Self> {
        let (kid, der) = Self::generate()?;
        Self::from_pkcs8(kid, &der)
    }

    pub fn device_key(&self) -> &ring::hmac::Key {
        &self.device
    }

    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body.trim()).context("PEM body")?;
        let kid = URL_SAFE_NO_PAD.encode(&ring::digest::digest(&ring::digest::SHA256, &der).as_ref()[..12]);
        Self::from_pkcs8(kid, &der)
    }

    fn generate() -> anyhow::Result<(String, Vec<u8>)> {
        let der = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("generating a signing key"))?;
        Ok((Uuid::new_v4().simple().to_string(), der.as_ref().to_vec()))
    }

    pub fn sign<T: Serialize>(&self, claims: &T) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }

    pub fn jwk(&self) -> serde_json::Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&self.public),
        })
    }
}

/// The keys of a replica: the newest signs, and every key whose tokens may
/// still be valid is published (the current one first).
pub struct KeyRing {
    pub current: SigningKey,
    pub previous: Vec<SigningKey>,
}

impl KeyRing {
    pub fn single(key: SigningKey) -> Self {
        KeyRing { current: key, previous: Vec::new() }
    }

    pub fn kid(&self) -> &str {
        &self.current.kid
    }

    /// Every key, the current one first.
    pub fn keys(&self) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// The keys kept in the database, the first one created on first start
    /// (an advisory lock makes replicas that start together on an empty
    /// database agree on one key). Keys replaced less than `token_ttl` (plus
    /// a margin for clock skew) ago are still published: tokens they signed
    /// stay valid until they expire.
    pub async fn load_or_create(db: &PgPool, token_ttl: Duration) -> anyhow::Result<Self> {
        let mut tx = db.begin().await?;
        sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('identity.signing_keys'))").fetch_one(&mut *tx).await?;
        let mut rows =
            sqlx::query!("SELECT kid, pkcs8, created_at FROM signing_keys ORDER BY created_at DESC, kid DESC")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|k| (k.kid, k.pkcs8, k.created_at))
                .collect::<Vec<_>>();
        if rows.is_empty() {
            let (kid, der) = SigningKey::generate()?;
            let created_at = sqlx::query_scalar!(
                "INSERT INTO signing_keys (kid, pkcs8) VALUES ($1, $2) RETURNING created_at",
                kid,
                der
            )
            .fetch_one(&mut *tx)
            .await?;
            tracing::info!(kid, "generated a new token signing key");
            rows.push((kid, der, created_at));
        }
        tx.commit().await?;
        let horizon = Utc::now() - chrono::Duration::from_std(token_ttl + Duration::from_secs(60))?;
        let mut keys = Vec::new();
        // A key is published while its successor is younger than a token's life.
        let mut successor_created: Option<DateTime<Utc>> = None;
        for (kid, der, created_at) in rows {
            if successor_created.is_some_and(|t| t < horizon) {
                break;
            }
            keys.push(SigningKey::from_pkcs8(kid, &der)?);
            successor_created = Some(created_at);
        }
        let current = keys.remove(0);
        Ok(KeyRing { current, previous: keys })
    }

    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = std::iter::once(&self.current).chain(&self.previous).map(SigningKey::jwk).collect();
        json!({ "keys": keys })
    }
}

/// Adds a new signing key: identity replicas sign with it from their next
/// reload (`SIGNING_KEY_RELOAD_SECS`) and keep publishing the previous one
/// until the tokens it signed have expired. Returns the new key's id.
pub async fn rotate(db: &PgPool) -> anyhow::Result<String> {
    let mut tx = db.begin().await?;
    sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('identity.signing_keys'))").fetch_one(&mut *tx).await?;
    let (kid, der) = SigningKey::generate()?;
    // Newer than every key there, whatever the clocks say.
    sqlx::query!(
        "INSERT INTO signing_keys (kid, pkcs8, created_at)
         SELECT $1, $2, GREATEST(now(), COALESCE(max(created_at), now()) + interval '1 millisecond') FROM signing_keys",
        kid,
        der
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(kid, "rotated the token signing key");
    Ok(kid)
}

pub async fn jwks(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.keys().jwks())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedToken {
    jti: Uuid,
    expires_at: DateTime<Utc>,
}

/// Revoked tokens that have not expired yet (an expired one is refused anyway).
pub async fn revoked_tokens(State(state): State<AppState>) -> Result<Json<Vec<RevokedToken>>, ApiError> {
    let rows = sqlx::query_as!(RevokedToken, "SELECT jti, expires_at FROM revoked_tokens WHERE expires_at > now()")
        .fetch_all(&state.db)
        .await?;
    Ok(Json(rows))
}
