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
use uuid::Uuid;

use crate::AppState;

pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: Vec<u8>,
}

impl SigningKey {
    fn from_pkcs8(kid: String, der: &[u8]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| anyhow::anyhow!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(SigningKey { kid, encoding: EncodingKey::from_ed_der(der), public: pair.public_key().as_ref().to_vec() })
    }

    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body.trim()).context("PEM body")?;
        let kid = URL_SAFE_NO_PAD.encode(&ring::digest::digest(&ring::digest::SHA256, &der).as_ref()[..12]);
        Self::from_pkcs8(kid, &der)
    }

    /// The key kept in the database, created on first start. An advisory
    /// lock makes replicas that start together on an empty database agree on
    /// one key.
    pub async fn load_or_create(db: &PgPool) -> anyhow::Result<Self> {
        let mut tx = db.begin().await?;
        sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('identity.signing_keys'))").fetch_one(&mut *tx).await?;
        let existing = sqlx::query!("SELECT kid, pkcs8 FROM signing_keys ORDER BY created_at, kid LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|key| (key.kid, key.pkcs8));
        let (kid, der) = match existing {
            Some(key) => key,
            None => {
                let der = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| anyhow::anyhow!("generating a signing key"))?;
                let kid = Uuid::new_v4().simple().to_string();
                sqlx::query!("INSERT INTO signing_keys (kid, pkcs8) VALUES ($1, $2)", kid, der.as_ref())
                    .execute(&mut *tx)
                    .await?;
                tracing::info!("generated a new token signing key");
                (kid, der.as_ref().to_vec())
            }
        };
        tx.commit().await?;
        Self::from_pkcs8(kid, &der)
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

pub async fn jwks(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "keys": [state.key.jwk()] }))
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
