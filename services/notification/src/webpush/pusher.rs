//! Sends the queued push messages to the push services, as the mailer sends
//! e-mails: woken by NOTIFY when a message is queued (a poll as safety net),
//! a batch claimed with `SKIP LOCKED` so replicas share the work, each
//! message sent and its outcome recorded on its own.
//!
//! What a push service answers decides the rest (RFC 8030 §5, §8.4):
//! - 2xx: sent (the push service has it; it delivers when the browser is online);
//! - 404/410: the subscription is gone (expired, or the user revoked it): it
//!   is removed, with what was still to be sent to it;
//! - 429 and 5xx (and no answer): retried, after `Retry-After` when the push
//!   service says it, else with growing delays; a message whose `TTL` ran
//!   out first is failed as expired;
//! - any other 4xx (a VAPID key the subscription was not made with, a payload
//!   refused): failed, not retried.
//!
//! Each user has a push budget (`WEB_PUSH_PER_USER_PER_HOUR`) kept in the
//! database like the e-mail budget; a message beyond it is not sent.

use anyhow::Context;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;
use web_push_native::WebPushBuilder;

use super::{PUSH_CHANNEL, Vapid, WebPushConfig};
use crate::delivery::{self, BUDGET_WINDOW, Budget};

/// Messages claimed at a time.
const BATCH: i64 = 20;
/// How long one push service may take to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Pusher {
    db: PgPool,
    vapid: Vapid,
    http: reqwest::Client,
    ttl: Duration,
    retry_base: Duration,
    /// Messages per user an hour.
    budget: Budget,
}

struct Due {
    id: i64,
    notification_id: Uuid,
    user_id: Uuid,
    payload: serde_json::Value,
    attempts: i32,
    age_secs: f64,
    subscription_id: Uuid,
    endpoint: String,
    p256dh: Vec<u8>,
    auth: Vec<u8>,
}

/// What became of one push message.
#[derive(Debug, PartialEq)]
enum Outcome {
    Sent(u16),
    /// 404/410: the subscription no longer exists.
    Gone(u16),
    /// Worth another try, after the push service's `Retry-After` if it gave one.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Never worth another try.
    Refused(String),
}

impl Pusher {
    pub fn new(config: &WebPushConfig, vapid: Vapid, db: PgPool) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("order-system-notification/", env!("CARGO_PKG_VERSION")));
        if let Some(file) = &config.ca_file {
            let pem = std::fs::read(file).with_context(|| format!("WEB_PUSH_CA_FILE {}", file.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("WEB_PUSH_CA_FILE {}: not PEM certificates", file.display()))?;
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let budget = Budget::per_hour(config.per_user_per_hour);
        Ok(Pusher {
            db,
            vapid,
            http: http.build().context("the push HTTP client")?,
            ttl: config.ttl(),
            retry_base: Duration::from_millis(config.retry_base_ms.max(1)),
            budget,
        })
    }

    pub async fn run(self, poll: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
        delivery::run(&self.db, PUSH_CHANNEL, poll, &shutdown, "pusher", || self.send_due(&shutdown)).await
    }

    /// Sends every due message, a batch at a time, holding no transaction
    /// across the HTTP exchanges (see the mailer's `send_due`). On shutdown,
    /// the claimed messages not yet tried are handed back at once.
    async fn send_due(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        loop {
            let due = sqlx::query_as!(
                Due,
                r#"UPDATE push_deliveries d SET next_attempt_at = now() + interval '10 minutes'
                 FROM push_subscriptions s
                 WHERE s.id = d.subscription_id AND d.id IN (
                     SELECT id FROM push_deliveries
                     WHERE sent_at IS NULL AND failed_at IS NULL AND suppressed_at IS NULL
                       AND next_attempt_at <= now()
                     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING d.id, d.notification_id, d.user_id, d.payload, d.attempts,
                     extract(epoch FROM now() - d.created_at)::float8 AS "age_secs!",
                     s.id AS subscription_id, s.endpoint, s.p256dh, s.auth"#,
                BATCH,
            )
            .fetch_all(&self.db)
            .await?;
            if due.is_empty() {
                return Ok(());
            }
            for (i, message) in due.iter().enumerate() {
                if shutdown.is_cancelled() {
                    let rest: Vec<i64> = due[i..].iter().map(|m| m.id).collect();
                    sqlx::query!("UPDATE push_deliveries SET next_attempt_at = now() WHERE id = ANY($1)", &rest)
                        .execute(&self.db)
                        .await?;
                    return Ok(());
                }
                let span = tracing::info_span!("push",
                    delivery_id = message.id,
                    notification_id = %message.notification_id,
                    user_id = %message.user_id,
                    subscription_id = %message.subscription_id,
                );
                self.deliver(message).instrument(span).await?;
            }
            if due.len() < BATCH as usize {
                return Ok(());
            }
        }
    }

    async fn deliver(&self, message: &Due) -> anyhow::Result<()> {
        let remaining = self.ttl.as_secs_f64() - message.age_secs;
        if remaining < 1.0 {
            metrics::counter!("web_push_failed_total", "kind" => "expired").increment(1);
            tracing::warn!(attempts = message.attempts, "push message expired before a push service took it");
            return self.fail(message, "expired: its TTL ran out before a push service took it").await;
        }
        if !self.within_budget(message).await? {
            metrics::counter!("web_push_suppressed_total").increment(1);
            tracing::info!("user's push budget spent; not sent");
            sqlx::query!("UPDATE push_deliveries SET suppressed_at = now() WHERE id = $1", message.id)
                .execute(&self.db)
                .await?;
            return Ok(());
        }
        match self.send(message, Duration::from_secs_f64(remaining)).await {
            Outcome::Sent(status) => {
                metrics::counter!("web_push_sent_total").increment(1);
                tracing::info!(status, "push message sent");
                sqlx::query!(
                    "UPDATE push_deliveries SET sent_at = now(), sent_status = $2, attempts = attempts + 1 WHERE id = $1",
                    message.id,
                    i32::from(status),
                )
                .execute(&self.db)
                .await?;
            }
            Outcome::Gone(status) => {
                metrics::counter!("web_push_subscriptions_removed_total").increment(1);
                tracing::info!(status, "push subscription gone; removed");
                sqlx::query!("DELETE FROM push_subscriptions WHERE id = $1", message.subscription_id)
                    .execute(&self.db)
                    .await?;
            }
            Outcome::Retry { reason, after } => {
                metrics::counter!("web_push_failed_total", "kind" => "temporary").increment(1);
                let delay = delivery::retry_delay(message.attempts, self.retry_base, after);
                tracing::warn!(%reason, retry_in = ?delay, "push message not taken; will retry");
                sqlx::query!(
                    "UPDATE push_deliveries SET attempts = attempts + 1, last_error = $2,
                        next_attempt_at = now() + make_interval(secs => $3)
                     WHERE id = $1",
                    message.id,
                    reason,
                    delay.as_secs_f64(),
                )
                .execute(&self.db)
                .await?;
            }
            Outcome::Refused(reason) => {
                metrics::counter!("web_push_failed_total", "kind" => "refused").increment(1);
                tracing::error!(%reason, "push message refused for good; failed");
                self.fail(message, &reason).await?;
            }
        }
        Ok(())
    }

    async fn fail(&self, message: &Due, reason: &str) -> anyhow::Result<()> {
        sqlx::query!(
            "UPDATE push_deliveries SET attempts = attempts + 1, last_error = $2, failed_at = now(), failed_reason = $2
             WHERE id = $1",
            message.id,
            reason,
        )
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Encrypts the payload for the subscription (RFC 8291) and posts it
    /// with the VAPID header, `TTL` (what is left of it), `Urgency` and a
    /// `Topic` naming the notification (a push service replaces a copy it
    /// still holds, should the message be sent twice).
    async fn send(&self, message: &Due, ttl: Duration) -> Outcome {
        let request = match self.request(message, ttl) {
            Ok(r) => r,
            Err(e) => return Outcome::Refused(format!("{e:#}")),
        };
        let response = match self.http.execute(request).await {
            Ok(r) => r,
            Err(e) => return Outcome::Retry { reason: format!("no answer from the push service: {e}"), after: None },
        };
        let status = response.status();
        let retry_after =
            response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| retry_after(v.to_str().ok()?));
        let text = response.text().await.unwrap_or_default();
        let detail: String = text.chars().take(200).collect();
        match status.as_u16() {
            200..=299 => Outcome::Sent(status.as_u16()),
            404 | 410 => Outcome::Gone(status.as_u16()),
            429 | 500..=599 => Outcome::Retry { reason: format!("{status}: {detail}"), after: retry_after },
            _ => Outcome::Refused(format!("{status}: {detail}")),
        }
    }

    fn request(&self, message: &Due, ttl: Duration) -> anyhow::Result<reqwest::Request> {
        let endpoint = url::Url::parse(&message.endpoint).context("stored endpoint")?;
        let public = p256::PublicKey::from_sec1_bytes(&message.p256dh).context("stored p256dh")?;
        anyhow::ensure!(message.auth.len() == 16, "stored auth secret is not 16 bytes");
        let auth = web_push_native::Auth::clone_from_slice(&message.auth);
        let uri: http::Uri = message.endpoint.parse().context("stored endpoint")?;
        let body = serde_json::to_vec(&message.payload)?;
        let request = WebPushBuilder::new(uri, public, auth)
            .with_valid_duration(Duration::from_secs(ttl.as_secs().max(1)))
            .build(body)
            .map_err(|e| anyhow::anyhow!("encrypting the payload: {e}"))?;
        let mut request = reqwest::Request::try_from(request).context("push request")?;
        let headers = request.headers_mut();
        headers.insert(reqwest::header::AUTHORIZATION, self.vapid.authorization(&endpoint).parse()?);
        headers.insert("urgency", reqwest::header::HeaderValue::from_static("normal"));
        headers.insert("topic", message.notification_id.simple().to_string().parse()?);
        Ok(request)
    }

    /// Takes one message from the user's budget (see [`Budget::allows`]):
    /// whether it may be sent.
    async fn within_budget(&self, message: &Due) -> sqlx::Result<bool> {
        let take = |window: f64| {
            sqlx::query_scalar!(
                "INSERT INTO push_budgets AS b (user_id, window_start, used) VALUES ($1, now(), 1)
             ON CONFLICT (user_id) DO UPDATE SET
                 used = CASE WHEN b.window_start <= now() - make_interval(secs => $2) THEN 1 ELSE b.used + 1 END,
                 window_start = CASE WHEN b.window_start <= now() - make_interval(secs => $2)
                                     THEN now() ELSE b.window_start END
             RETURNING used",
                message.user_id,
                window,
            )
            .fetch_one(&self.db)
        };
        self.budget.allows(message.attempts, take).await
    }
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 §10.2.3).
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
    Some(wait)
}

/// Budgets whose window is over, for `runtime::data::prune`.
pub fn spent_budgets() -> runtime::data::prune::Prune {
    runtime::prune!(
        "push_budgets",
        BUDGET_WINDOW,
        "DELETE FROM push_budgets WHERE user_id IN (
             SELECT user_id FROM push_budgets WHERE window_start < now() - make_interval(secs => $1) LIMIT $2)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(" 120 "), Some(Duration::from_secs(120)));
        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        let wait = retry_after(&later.to_rfc2822().replace("+0000", "GMT")).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO), "a date past: now");
        assert_eq!(retry_after("soon"), None);
        assert_eq!(retry_after("-1"), None);
    }
}
