//! Identity: users, their passwords, and the access tokens that prove who
//! calls. Registration answers 201 at once and announces `UserCreated`
//! through the outbox; login signs an EdDSA JWT whose public key the gateway
//! reads from `/.well-known/jwks.json`; logout revokes the token.

mod devices;
mod keys;
mod passwords;
mod throttle;
mod users;

use anyhow::Context;
use axum::Router;
use axum::routing::{get, post};
use contracts::messages::{UserCreated, UserUpdated};
use runtime::Service;
use runtime::http::openapi::InternalAuth;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use keys::SigningKey;

// What identity publishes; its outbox refuses any other message.
runtime::publishes!(pub OUTBOX: Identity = "identity" => UserCreated, UserUpdated);
pub use throttle::AbuseLimits;

/// The service's REST API, as served at `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Identity service", description = "Users, login and access tokens."),
    paths(users::register, users::login, users::logout, users::profile, users::update_profile),
    modifiers(&InternalAuth),
    tags((name = "identity")),
)]
pub struct ApiDoc;

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "identity", about = "Identity service: users, login, tokens")]
pub struct Config {
    #[arg(long, env = "IDENTITY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/identity")]
    pub database_url: String,

    /// The broker, the HTTP limits and the keys that check callers.
    #[command(flatten)]
    pub common: runtime::ServiceConfig,

    /// How long an access token is valid, in seconds.
    #[arg(long, env = "TOKEN_TTL_SECS", default_value_t = 3600)]
    pub token_ttl_secs: u64,

    /// Ed25519 private key (PKCS#8 PEM) that signs tokens. Without it, a key
    /// is generated once and kept in the identity database.
    #[arg(long, env = "JWT_PRIVATE_KEY_PEM", hide_env_values = true)]
    pub jwt_private_key_pem: Option<String>,

    #[command(flatten)]
    pub abuse: AbuseLimits,

    /// How often the signing keys kept in the database are reloaded, in
    /// seconds: a rotation (`order-system rotate-key`) takes effect within it.
    #[arg(long, env = "SIGNING_KEY_RELOAD_SECS", default_value_t = 10)]
    pub signing_key_reload_secs: u64,

    /// Mark the `accessToken` cookie `Secure` (set it behind HTTPS).
    #[arg(long, env = "COOKIE_SECURE", default_value_t = false)]
    pub cookie_secure: bool,

    #[arg(long, env = "IDENTITY_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: String,
}

#[derive(Clone)]
pub(crate) struct AppState {
    db: PgPool,
    keys: Arc<std::sync::RwLock<Arc<keys::KeyRing>>>,
    token_ttl: Duration,
    cookie_secure: bool,
    passwords: Arc<passwords::Passwords>,
    throttle: Arc<throttle::Throttle>,
    client_ip_header: Option<axum::http::HeaderName>,
    /// How long a device cookie lasts; `None`: device cookies are off.
    device_cookie_ttl: Option<Duration>,
}

impl AppState {
    /// The signing keys as loaded last.
    pub(crate) fn keys(&self) -> Arc<keys::KeyRing> {
        self.keys.read().expect("keys lock").clone()
    }
}

/// Rotates the token signing key kept in the identity database at
/// `database_url` (`order-system rotate-key`); returns the new key's id.
pub async fn rotate_signing_key(database_url: &str) -> anyhow::Result<String> {
    let db = PgPool::connect(database_url).await.context("identity database")?;
    let kid = keys::rotate(&db).await;
    db.close().await;
    kid
}

/// Reloads the keys from the database every `every` (a rotation by another
/// process or replica is picked up) until `shutdown`.
async fn reload_keys(
    db: PgPool,
    keys: Arc<std::sync::RwLock<Arc<keys::KeyRing>>>,
    token_ttl: Duration,
    every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        match keys::KeyRing::load_or_create(&db, token_ttl).await {
            Ok(ring) => {
                let mut current = keys.write().expect("keys lock");
                if current.kid() != ring.kid() {
                    tracing::info!(kid = ring.kid(), "signing with a new key");
                }
                *current = Arc::new(ring);
            }
            Err(e) => tracing::warn!(error = %e, "could not reload the signing keys"),
        }
    }
}

fn routes(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/register", post(users::register))
        .route("/api/v1/login", post(users::login))
        .route("/api/v1/logout", post(users::logout))
        .route("/api/v1/profile", get(users::profile).put(users::update_profile))
        .route("/.well-known/jwks.json", get(keys::jwks))
        .route("/internal/v1/revoked-tokens", get(keys::revoked_tokens))
        .with_state(state)
        .merge(runtime::http::openapi::route(<ApiDoc as utoipa::OpenApi>::openapi()))
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut service = Service::start("identity", &config.common, shutdown)?
        .with_database(&config.database_url, sqlx::migrate!("../../migrations/identity"), &listener)
        .await?;
    let token_ttl = Duration::from_secs(config.token_ttl_secs);
    let ring = match &config.jwt_private_key_pem {
        Some(pem) => keys::KeyRing::single(SigningKey::from_pem(pem).context("JWT_PRIVATE_KEY_PEM")?),
        None => keys::KeyRing::load_or_create(&service.db, token_ttl).await?,
    };
    let keys = Arc::new(std::sync::RwLock::new(Arc::new(ring)));
    if config.jwt_private_key_pem.is_none() {
        let every = Duration::from_secs(config.signing_key_reload_secs.max(1));
        service.spawn(
            "signing key reload",
            reload_keys(service.db.clone(), keys.clone(), token_ttl, every, service.shutdown()),
        );
    }
    let state = AppState {
        db: service.db.clone(),
        keys,
        token_ttl: Duration::from_secs(config.token_ttl_secs),
        cookie_secure: config.cookie_secure,
        passwords: Arc::new(passwords::Passwords::new(
            config.abuse.password_hash_concurrency,
            Duration::from_millis(config.abuse.password_hash_wait_ms),
        )),
        throttle: Arc::new(throttle::Throttle::new(&config.abuse)),
        client_ip_header: throttle::header_name(config.abuse.client_ip_header.as_deref())?,
        device_cookie_ttl: (config.abuse.device_cookie_days > 0)
            .then(|| Duration::from_secs(config.abuse.device_cookie_days.saturating_mul(86_400))),
    };
    service.spawn("throttle pruning", state.throttle.clone().prune(service.shutdown()));
    service.relay_outbox();
    // A revoked token is refused by its expiry anyway once it has expired.
    let expired = runtime::prune!(
        "revoked_tokens",
        Duration::ZERO,
        "DELETE FROM revoked_tokens WHERE jti IN (
             SELECT jti FROM revoked_tokens WHERE expires_at < now() - make_interval(secs => $1) LIMIT $2)"
    );
    service.prune(vec![expired], config.common.messaging.prune_interval());
    service.serve(listener, routes(state)).await
}
