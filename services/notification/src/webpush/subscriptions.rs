//! The browsers' push subscriptions, per user: the page's service worker
//! subscribes with the server's VAPID public key and hands the subscription
//! (its `PushSubscription.toJSON()`) over here.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use contracts::api::ErrorBody;
use runtime::auth::CurrentUser;
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::{ApiError, Json};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Vapid, WebPushConfig};

/// Longest endpoint taken (the push services' are a few hundred characters).
const MAX_ENDPOINT: usize = 2048;

#[derive(Clone)]
pub struct WebPush {
    db: PgPool,
    /// `None`: Web Push is not configured here.
    vapid: Option<Arc<Vapid>>,
    config: Arc<WebPushConfig>,
}

impl WebPush {
    pub fn new(db: PgPool, vapid: Option<Vapid>, config: WebPushConfig) -> Self {
        WebPush { db, vapid: vapid.map(Arc::new), config: Arc::new(config) }
    }

    fn vapid(&self) -> Result<&Vapid, ApiError> {
        self.vapid.as_deref().ok_or_else(|| ApiError::not_found("Web Push is not enabled on this server"))
    }
}

pub fn routes(state: WebPush) -> Router {
    Router::new()
        .route("/api/v1/notifications/push-public-key", get(public_key))
        .route("/api/v1/notifications/push-subscriptions", post(subscribe).delete(unsubscribe))
        .with_state(state)
}

/// A browser's push subscription, as `PushSubscription.toJSON()` gives it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushSubscription {
    /// The push service's URL for this browser (https).
    #[schema(
        max_length = 2048,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*$",
        example = "https://fcm.googleapis.com/fcm/send/dpH5lCsTSSM:APA91b..."
    )]
    pub endpoint: String,
    pub keys: PushKeys,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PushKeys {
    /// The browser's P-256 public key: base64url of the 65-byte uncompressed point.
    #[schema(example = "BLn9b-VR0ca83knDNZ32dCHGyjJp-1riX9ZTN40MqV8K_LpQmLqxC_DoHvqvFXO_nGdAB4W9dogZb_sM-uV4JbY")]
    pub p256dh: String,
    /// The browser's authentication secret: base64url of 16 bytes.
    #[schema(example = "_ordMnz7uTCmrpBTeUV4Bw")]
    pub auth: String,
}

/// Which subscription to remove.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PushEndpoint {
    #[schema(max_length = 2048, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub endpoint: String,
}

/// The server's VAPID public key, the `applicationServerKey` to subscribe with.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushPublicKey {
    /// base64url of the uncompressed P-256 point.
    pub public_key: String,
}

/// A subscription whose every part was checked: only these are stored.
#[derive(Debug)]
pub struct Subscription {
    pub endpoint: url::Url,
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
}

fn base64url(value: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(value.trim_end_matches('=')).or_else(|_| URL_SAFE.decode(value)).ok()
}

impl Subscription {
    /// Parses what a browser sent; a 422 saying what is wrong otherwise.
    pub fn parse(s: &PushSubscription, config: &WebPushConfig) -> Result<Subscription, ApiError> {
        if s.endpoint.len() > MAX_ENDPOINT {
            return Err(ApiError::unprocessable(format!("endpoint must have at most {MAX_ENDPOINT} characters")));
        }
        let endpoint = parse_endpoint(&s.endpoint, config)?;
        let p256dh = base64url(&s.keys.p256dh)
            .filter(|k| k.len() == 65 && k[0] == 4)
            .filter(|k| p256::PublicKey::from_sec1_bytes(k).is_ok())
            .ok_or_else(|| {
                ApiError::unprocessable(
                    "keys.p256dh must be a P-256 public key: base64url of its 65-byte uncompressed point",
                )
            })?;
        let auth = base64url(&s.keys.auth)
            .filter(|a| a.len() == 16)
            .ok_or_else(|| ApiError::unprocessable("keys.auth must be base64url of 16 bytes"))?;
        Ok(Subscription { endpoint, p256dh, auth })
    }
}

fn parse_endpoint(endpoint: &str, config: &WebPushConfig) -> Result<url::Url, ApiError> {
    let url = url::Url::parse(endpoint)
        .ok()
        .filter(|u| u.scheme() == "https" && u.username().is_empty() && u.password().is_none())
        .ok_or_else(|| ApiError::unprocessable("endpoint must be an https URL"))?;
    let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    if !config.allows_host(host) {
        return Err(ApiError::unprocessable(format!("endpoint: {host} is not a push service this server sends to")));
    }
    Ok(url)
}

#[utoipa::path(get, path = "/api/v1/notifications/push-public-key", tag = "notifications",
    operation_id = "getPushPublicKey",
    responses(
        (status = 200, description = "The VAPID public key to subscribe with", body = PushPublicKey),
        (status = 404, description = "Web Push is not enabled on this server", body = ErrorBody),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn public_key(State(push): State<WebPush>, _user: CurrentUser) -> Result<Json<PushPublicKey>, ApiError> {
    Ok(Json(PushPublicKey { public_key: push.vapid()?.public_key().to_string() }))
}

#[utoipa::path(post, path = "/api/v1/notifications/push-subscriptions", tag = "notifications",
    operation_id = "addPushSubscription",
    request_body = PushSubscription,
    responses(
        (status = 204, description = "Stored: the user's final orders are pushed to it. A user holds at most \
            WEB_PUSH_SUBSCRIPTIONS_PER_USER subscriptions; one more replaces the oldest."),
        (status = 404, description = "Web Push is not enabled on this server", body = ErrorBody),
        (status = 422, description = "Not an https endpoint of a known push service, or keys of the wrong form",
            body = ErrorBody),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn subscribe(
    State(push): State<WebPush>,
    user: CurrentUser,
    Json(body): Json<PushSubscription>,
) -> Result<StatusCode, ApiError> {
    push.vapid()?;
    let s = Subscription::parse(&body, &push.config)?;
    let mut tx = push.db.begin().await?;
    // One user's subscribing is serialised, so the cap holds under races.
    sqlx::query!("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 23))", user.id.to_string())
        .fetch_one(&mut *tx)
        .await?;
    // An endpoint is one browser's: subscribing it again takes it over.
    let id = sqlx::query_scalar!(
        "INSERT INTO push_subscriptions (id, user_id, endpoint, p256dh, auth) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (endpoint) DO UPDATE SET user_id = EXCLUDED.user_id, p256dh = EXCLUDED.p256dh,
             auth = EXCLUDED.auth, created_at = now()
         RETURNING id",
        Uuid::now_v7(),
        user.id,
        s.endpoint.as_str(),
        s.p256dh,
        s.auth,
    )
    .fetch_one(&mut *tx)
    .await?;
    let replaced = sqlx::query!(
        "DELETE FROM push_subscriptions WHERE id IN (
             SELECT id FROM push_subscriptions WHERE user_id = $1 ORDER BY created_at DESC, id DESC OFFSET $2)",
        user.id,
        i64::from(push.config.subscriptions_per_user.max(1)),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    tracing::info!(user_id = %user.id, subscription_id = %id, host = s.endpoint.host_str(), replaced, "push subscription stored");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/notifications/push-subscriptions", tag = "notifications",
    operation_id = "removePushSubscription",
    request_body = PushEndpoint,
    responses(
        (status = 204, description = "Removed: nothing more is pushed to it"),
        (status = 404, description = "The user has no subscription with this endpoint", body = ErrorBody),
        (status = 422, description = "Invalid request body", body = ErrorBody),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn unsubscribe(
    State(push): State<WebPush>,
    user: CurrentUser,
    Json(body): Json<PushEndpoint>,
) -> Result<StatusCode, ApiError> {
    let removed = sqlx::query_scalar!(
        "DELETE FROM push_subscriptions WHERE user_id = $1 AND endpoint = $2 RETURNING id",
        user.id,
        body.endpoint,
    )
    .fetch_optional(&push.db)
    .await?;
    match removed {
        Some(id) => {
            tracing::info!(user_id = %user.id, subscription_id = %id, "push subscription removed");
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::not_found("no push subscription with this endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256DH: &str = "BLn9b-VR0ca83knDNZ32dCHGyjJp-1riX9ZTN40MqV8K_LpQmLqxC_DoHvqvFXO_nGdAB4W9dogZb_sM-uV4JbY";
    const AUTH: &str = "_ordMnz7uTCmrpBTeUV4Bw";

    fn sub(endpoint: &str, p256dh: &str, auth: &str) -> PushSubscription {
        PushSubscription { endpoint: endpoint.into(), keys: PushKeys { p256dh: p256dh.into(), auth: auth.into() } }
    }

    fn refused(s: PushSubscription, needle: &str) {
        let err = Subscription::parse(&s, &WebPushConfig::default()).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.message.contains(needle), "{:?} should mention {needle:?}", err.message);
    }

    #[test]
    fn a_browsers_subscription_is_taken() {
        let s = Subscription::parse(
            &sub("https://fcm.googleapis.com/fcm/send/abc:def", P256DH, AUTH),
            &WebPushConfig::default(),
        )
        .unwrap();
        assert_eq!(s.p256dh.len(), 65);
        assert_eq!(s.auth.len(), 16);
        // Padded base64url, as some libraries write it, is the same key.
        assert!(
            Subscription::parse(
                &sub(
                    "https://updates.push.services.mozilla.com/wpush/v2/x",
                    &format!("{P256DH}="),
                    "_ordMnz7uTCmrpBTeUV4Bw=="
                ),
                &WebPushConfig::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn an_endpoint_that_is_not_https_or_not_a_push_service_is_refused() {
        refused(sub("http://fcm.googleapis.com/fcm/send/x", P256DH, AUTH), "https");
        refused(sub("not a url", P256DH, AUTH), "https");
        refused(sub("https://user:pw@fcm.googleapis.com/x", P256DH, AUTH), "https");
        refused(sub("https://169.254.169.254/latest/meta-data", P256DH, AUTH), "not a push service");
        refused(sub("https://internal.svc.cluster.local/", P256DH, AUTH), "not a push service");
        refused(sub(&format!("https://fcm.googleapis.com/{}", "x".repeat(MAX_ENDPOINT)), P256DH, AUTH), "at most");
    }

    #[test]
    fn keys_of_the_wrong_length_or_off_the_curve_are_refused() {
        let ep = "https://fcm.googleapis.com/fcm/send/x";
        refused(sub(ep, "", AUTH), "keys.p256dh");
        refused(sub(ep, &P256DH[..40], AUTH), "keys.p256dh");
        refused(sub(ep, "not base64!", AUTH), "keys.p256dh");
        // 65 bytes, uncompressed form, but not a point of the curve.
        let off_curve = URL_SAFE_NO_PAD.encode([[4u8].as_slice(), &[1u8; 64]].concat());
        refused(sub(ep, &off_curve, AUTH), "keys.p256dh");
        refused(sub(ep, P256DH, ""), "keys.auth");
        refused(sub(ep, P256DH, &URL_SAFE_NO_PAD.encode([0u8; 17])), "keys.auth");
    }
}
