//! Throttles on what costs a password check or lets an attacker guess:
//! logins per client address and per account (or, from a device that logged
//! in to the account before, per device instead: see `devices`),
//! registrations per client address (GCRA limits from `governor`). Past a
//! limit: 429 with `Retry-After`; other accounts and addresses are not affected.

use axum::extract::FromRequestParts;
use axum::http::HeaderName;
use axum::http::request::Parts;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use runtime::ApiError;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// The limits of identity's costly or guessable calls (0 turns one off).
#[derive(clap::Args, Clone, Debug)]
pub struct AbuseLimits {
    /// Password hashes or checks running at once (each holds ~19 MiB and a
    /// core); 0: one per core.
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 0)]
    pub password_hash_concurrency: usize,

    /// Longest wait for a turn to check a password, in milliseconds; then 503.
    #[arg(long, env = "PASSWORD_HASH_WAIT_MS", default_value_t = 500)]
    pub password_hash_wait_ms: u64,

    /// Logins per minute from one client address (bursts up to as many).
    #[arg(long, env = "LOGIN_PER_ADDRESS_PER_MINUTE", default_value_t = 30)]
    pub login_per_address_per_minute: u32,

    /// Logins per minute for one account (e-mail), whatever the address,
    /// from clients without a device cookie for it.
    #[arg(long, env = "LOGIN_PER_ACCOUNT_PER_MINUTE", default_value_t = 10)]
    pub login_per_account_per_minute: u32,

    /// Logins per minute from one device that logged in to the account
    /// before (its device cookie), instead of the account's limit.
    #[arg(long, env = "LOGIN_PER_DEVICE_PER_MINUTE", default_value_t = 10)]
    pub login_per_device_per_minute: u32,

    /// How long a device cookie lasts, in days; 0: none is set or honoured.
    #[arg(long, env = "DEVICE_COOKIE_DAYS", default_value_t = 90)]
    pub device_cookie_days: u64,

    /// Registrations per minute from one client address.
    #[arg(long, env = "REGISTER_PER_ADDRESS_PER_MINUTE", default_value_t = 10)]
    pub register_per_address_per_minute: u32,

    /// Header that carries the client's address, set by the proxy in front
    /// (the gateway sets `X-Forwarded-For`). Unset: the connection's peer.
    /// Set it only when every request comes through that proxy.
    #[arg(long, env = "IDENTITY_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        AbuseLimits {
            password_hash_concurrency: 0,
            password_hash_wait_ms: 500,
            login_per_address_per_minute: 30,
            login_per_account_per_minute: 10,
            login_per_device_per_minute: 10,
            device_cookie_days: 90,
            register_per_address_per_minute: 10,
            client_ip_header: None,
        }
    }
}

type Limiter<K> = Option<DefaultKeyedRateLimiter<K>>;

pub struct Throttle {
    login_by_address: Limiter<IpAddr>,
    login_by_account: Limiter<String>,
    login_by_device: Limiter<String>,
    register_by_address: Limiter<IpAddr>,
}

fn limiter<K: Hash + Eq + Clone>(per_minute: u32) -> Limiter<K> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

fn check<K: Hash + Eq + Clone>(limiter: &Limiter<K>, key: Option<K>, what: &str) -> Result<(), ApiError> {
    let (Some(limiter), Some(key)) = (limiter, key) else { return Ok(()) };
    limiter.check_key(&key).map_err(|not_until| {
        let wait = not_until.wait_time_from(limiter.clock().now());
        tracing::warn!(what, "throttled");
        ApiError::too_many_requests(format!("too many {what}, try again later"), wait)
    })
}

fn forget_idle<K: Hash + Eq + Clone>(limiter: &Limiter<K>) {
    if let Some(l) = limiter {
        l.retain_recent();
        l.shrink_to_fit();
    }
}

impl Throttle {
    pub fn new(limits: &AbuseLimits) -> Self {
        Throttle {
            login_by_address: limiter(limits.login_per_address_per_minute),
            login_by_account: limiter(limits.login_per_account_per_minute),
            login_by_device: limiter(limits.login_per_device_per_minute),
            register_by_address: limiter(limits.register_per_address_per_minute),
        }
    }

    /// Before a login's password check: the address first (it bounds how
    /// many accounts one client can make the service remember), then the
    /// account, or the device when the client has a valid device cookie for
    /// this account (a guesser elsewhere does not lock the owner out of it).
    pub fn login(&self, client: Option<IpAddr>, email: &str, device: Option<&str>) -> Result<(), ApiError> {
        check(&self.login_by_address, client, "login attempts from this address")?;
        match device {
            Some(device) => check(&self.login_by_device, Some(device.to_string()), "login attempts from this device"),
            None => check(&self.login_by_account, Some(email.trim().to_lowercase()), "login attempts for this account"),
        }
    }

    pub fn register(&self, client: Option<IpAddr>) -> Result<(), ApiError> {
        check(&self.register_by_address, client, "registrations from this address")
    }

    /// Forgets the keys whose limits are back to full, once a minute.
    pub async fn prune(self: std::sync::Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            forget_idle(&self.login_by_address);
            forget_idle(&self.login_by_account);
            forget_idle(&self.login_by_device);
            forget_idle(&self.register_by_address);
        }
    }
}

/// The address of the client a request comes from (see
/// [`AbuseLimits::client_ip_header`]); `None` when unknown.
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = state.client_ip_header.as_ref();
        Ok(ClientIp(runtime::limits::client_ip(&parts.headers, runtime::limits::peer(parts), header)))
    }
}

pub fn header_name(name: Option<&str>) -> anyhow::Result<Option<HeaderName>> {
    name.filter(|n| !n.is_empty())
        .map(|n| HeaderName::try_from(n).map_err(|e| anyhow::anyhow!("client address header {n:?}: {e}")))
        .transpose()
}
