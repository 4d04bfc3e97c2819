//! Web Push for closed tabs (RFC 8030 push, RFC 8291 `aes128gcm` payload
//! encryption, RFC 8292 VAPID): the browsers' subscriptions (`subscriptions`),
//! and the pusher that sends each final order's outcome to them (`pusher`).
//!
//! A push message is written as a `push_deliveries` row with the notification,
//! in the consumer's transaction, one per subscription: the idempotent
//! consumer makes a redelivered order event write none twice, and the pusher
//! sends each row once it has the push service's 2xx. The cryptography of the
//! payload is `web-push-native`'s; the VAPID token is signed here (see
//! `vapid`), with the endpoint's full origin as its audience.

pub mod pusher;
pub mod subscriptions;
pub mod vapid;

use anyhow::Context;
use sqlx::PgConnection;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

pub use pusher::Pusher;
pub use vapid::Vapid;

/// The channel a commit that queued push messages NOTIFYs.
pub const PUSH_CHANNEL: &str = "web_push";

/// The push services browsers subscribe with (Chrome/Edge via FCM, Firefox,
/// Safari, the old Edge): the hosts an endpoint may name unless configured.
pub const DEFAULT_PUSH_HOSTS: &str =
    "fcm.googleapis.com,updates.push.services.mozilla.com,web.push.apple.com,.notify.windows.com";

#[derive(clap::Args, Clone, Debug)]
pub struct WebPushConfig {
    /// The VAPID private key (P-256): base64url of the 32-byte scalar, or a
    /// PEM (SEC1 `EC PRIVATE KEY` or PKCS#8). Without it or
    /// VAPID_PRIVATE_KEY_FILE (or empty), Web Push is off.
    #[arg(long, env = "VAPID_PRIVATE_KEY", hide_env_values = true)]
    pub vapid_private_key: Option<String>,

    /// A PEM file holding the VAPID private key (as `openssl ecparam
    /// -genkey -name prime256v1` writes it), instead of VAPID_PRIVATE_KEY.
    #[arg(long, env = "VAPID_PRIVATE_KEY_FILE")]
    pub vapid_private_key_file: Option<PathBuf>,

    /// Who push services may contact about this sender: `mailto:...` or `https://...`.
    #[arg(long, env = "VAPID_SUBJECT")]
    pub vapid_subject: Option<String>,

    /// Hosts a subscription's endpoint may name (comma-separated; a leading
    /// dot: that domain's subdomains). The server sends requests only there.
    #[arg(long = "web-push-allowed-hosts", env = "WEB_PUSH_ALLOWED_HOSTS", value_delimiter = ',', default_value = DEFAULT_PUSH_HOSTS)]
    pub allowed_hosts: Vec<String>,

    /// PEM file of CA certificates push services' certificates may chain to,
    /// besides the public web roots.
    #[arg(long = "web-push-ca-file", env = "WEB_PUSH_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Subscriptions a user may hold; subscribing one more replaces the oldest.
    #[arg(long = "web-push-subscriptions-per-user", env = "WEB_PUSH_SUBSCRIPTIONS_PER_USER", default_value_t = 10)]
    pub subscriptions_per_user: u32,

    /// Push messages one user may be sent an hour (over all their
    /// subscriptions); the rest are not sent. 0: no budget.
    #[arg(long = "web-push-per-user-per-hour", env = "WEB_PUSH_PER_USER_PER_HOUR", default_value_t = 30)]
    pub per_user_per_hour: u32,

    /// How long a push service keeps a message for a browser that is offline
    /// (the `TTL` header), in seconds; a message not handed over by then is
    /// failed as expired.
    #[arg(long = "web-push-ttl-secs", env = "WEB_PUSH_TTL_SECS", default_value_t = 86_400)]
    pub ttl_secs: u32,

    /// First retry of a push service's 429/5xx without `Retry-After`, in
    /// milliseconds, doubling up to an hour.
    #[arg(long = "web-push-retry-base-ms", env = "WEB_PUSH_RETRY_BASE_MS", default_value_t = 2_000)]
    pub retry_base_ms: u64,
}

impl Default for WebPushConfig {
    /// Off (no VAPID key), with the documented defaults otherwise.
    fn default() -> Self {
        WebPushConfig {
            vapid_private_key: None,
            vapid_private_key_file: None,
            vapid_subject: None,
            allowed_hosts: DEFAULT_PUSH_HOSTS.split(',').map(str::to_string).collect(),
            ca_file: None,
            subscriptions_per_user: 10,
            per_user_per_hour: 30,
            ttl_secs: 86_400,
            retry_base_ms: 2_000,
        }
    }
}

impl WebPushConfig {
    /// The VAPID identity, if Web Push is configured; an error if it is
    /// configured wrongly (a key that does not parse, no subject).
    pub fn vapid(&self) -> anyhow::Result<Option<Vapid>> {
        // Empty counts as unset: compose and k8s pass an empty value to mean "off".
        let value = self.vapid_private_key.as_deref().map(str::trim).filter(|v| !v.is_empty());
        let file = self.vapid_private_key_file.as_ref().filter(|f| !f.as_os_str().is_empty());
        let pem_or_value = match (value, file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => anyhow::bail!("set VAPID_PRIVATE_KEY or VAPID_PRIVATE_KEY_FILE, not both"),
            (Some(value), None) => value.to_string(),
            (None, Some(file)) => {
                std::fs::read_to_string(file).with_context(|| format!("VAPID_PRIVATE_KEY_FILE {}", file.display()))?
            }
        };
        let subject = self.vapid_subject.as_deref().context("VAPID_SUBJECT is required with a VAPID key")?;
        Vapid::new(&pem_or_value, subject).map(Some)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl_secs))
    }

    /// Whether an endpoint on `host` may be sent to.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).any(|allowed| {
            match allowed.strip_prefix('.') {
                Some(domain) => host.len() > domain.len() + 1 && host.ends_with(&allowed),
                None => !allowed.is_empty() && host == allowed,
            }
        })
    }
}

/// Queues the notification's push message for each of the user's
/// subscriptions, in the caller's (the consumer's) transaction.
pub async fn queue(
    tx: &mut PgConnection,
    notification_id: Uuid,
    user_id: Uuid,
    order_id: Uuid,
    title: &str,
    body: &str,
) -> sqlx::Result<()> {
    // What the service worker shows (see services/gateway/web/sw.js).
    let payload = serde_json::json!({
        "notificationId": notification_id,
        "orderId": order_id,
        "title": title,
        "body": body,
    });
    let queued = sqlx::query!(
        "INSERT INTO push_deliveries (notification_id, subscription_id, user_id, payload)
         SELECT $1, id, user_id, $3 FROM push_subscriptions WHERE user_id = $2
         ON CONFLICT (notification_id, subscription_id) DO NOTHING",
        notification_id,
        user_id,
        payload,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if queued > 0 {
        sqlx::query!("SELECT pg_notify($1, '')", PUSH_CHANNEL).fetch_one(&mut *tx).await?;
        tracing::info!(%notification_id, %user_id, queued, "push messages queued");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allowed_hosts_and_their_subdomains_where_asked_are_allowed() {
        let config = WebPushConfig::default();
        assert!(config.allows_host("fcm.googleapis.com"));
        assert!(config.allows_host("FCM.googleapis.com"));
        assert!(config.allows_host("wns2-db5p.notify.windows.com"));
        assert!(!config.allows_host("notify.windows.com"), "the leading dot means subdomains");
        assert!(!config.allows_host("evil-notify.windows.com.example"));
        assert!(!config.allows_host("fcm.googleapis.com.example"));
        assert!(!config.allows_host("169.254.169.254"));
    }

    #[test]
    fn web_push_is_off_without_a_key_and_a_key_needs_a_subject() {
        assert!(WebPushConfig::default().vapid().unwrap().is_none());
        let empty = WebPushConfig { vapid_private_key: Some(" ".into()), ..Default::default() };
        assert!(empty.vapid().unwrap().is_none(), "empty is off");
        let no_subject = WebPushConfig { vapid_private_key: Some(vapid::tests::KEY_B64.into()), ..Default::default() };
        assert!(no_subject.vapid().unwrap_err().to_string().contains("VAPID_SUBJECT"));
        let both = WebPushConfig {
            vapid_private_key: Some(vapid::tests::KEY_B64.into()),
            vapid_private_key_file: Some("/nonexistent".into()),
            vapid_subject: Some("mailto:ops@example.com".into()),
            ..Default::default()
        };
        assert!(both.vapid().is_err());
        let missing = WebPushConfig {
            vapid_private_key_file: Some("/nonexistent/vapid.pem".into()),
            vapid_subject: Some("mailto:ops@example.com".into()),
            ..Default::default()
        };
        assert!(missing.vapid().unwrap_err().to_string().contains("VAPID_PRIVATE_KEY_FILE"));
    }
}
