//! The API gateway: the only door from outside. It verifies the access token
//! (bearer header or `accessToken` cookie) against identity's published key,
//! drops any `X-User-Assertion` header a client sent, forwards the request
//! to the service that owns the path with an assertion of who the user is,
//! signed with its own key for that service (`runtime::auth`), and streams
//! the answer back unbuffered (the event stream included).

pub mod docs;
mod h2c;
mod proxy;
mod web;

use axum::Router;
use axum::routing::any;
use runtime::Service;

use runtime::auth::tokens::TokenVerifier;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "gateway", about = "API gateway")]
pub struct Config {
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    #[arg(long, env = "IDENTITY_URL", default_value = "http://127.0.0.1:8081")]
    pub identity_url: String,
    #[arg(long, env = "BILLING_URL", default_value = "http://127.0.0.1:8082")]
    pub billing_url: String,
    #[arg(long, env = "ORDERING_URL", default_value = "http://127.0.0.1:8083")]
    pub ordering_url: String,
    #[arg(long, env = "NOTIFICATION_URL", default_value = "http://127.0.0.1:8084")]
    pub notification_url: String,
    #[arg(long, env = "PUSH_URL", default_value = "http://127.0.0.1:8085")]
    pub push_url: String,
    /// Reach the push service over HTTP/2 without TLS (h2c, prior
    /// knowledge), its event streams multiplexed on a few connections;
    /// `false`: HTTP/1.1, one connection per event stream (a push upstream
    /// that does not speak h2c).
    #[arg(long, env = "GATEWAY_PUSH_H2C", default_value_t = true, action = clap::ArgAction::Set)]
    pub push_h2c: bool,
    /// Event streams on one h2c connection to the push service before
    /// another is opened (below the push service's HTTP/2 limit of 200
    /// concurrent streams per connection).
    #[arg(long, env = "GATEWAY_PUSH_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub push_streams_per_connection: usize,
    #[command(flatten)]
    pub verifier: runtime::auth::tokens::VerifierConfig,
    /// Longest wait for a service's answer to start (event streams, once
    /// started, are never cut; a long poll with `Prefer: wait=N` gets N more
    /// seconds).
    #[arg(long, env = "UPSTREAM_TIMEOUT_SECS", default_value_t = 30)]
    pub upstream_timeout_secs: u64,
    /// Header that carries the client's address, set by the ingress or load
    /// balancer in front (e.g. `X-Forwarded-For`, its last entry). Unset: the
    /// connection's peer. Either way the services behind get the address in
    /// `X-Forwarded-For` (one entry, set here; a client's own is dropped).
    #[arg(long, env = "GATEWAY_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,
    /// HTTPS address (HTTP/2 by ALPN `h2`, and HTTP/1.1); empty turns it off.
    #[arg(long, env = "GATEWAY_HTTPS_ADDR", default_value = "127.0.0.1:8443")]
    pub https_addr: String,
    #[command(flatten)]
    pub tls: runtime::auth::tls::TlsConfig,
    #[command(flatten)]
    pub limits: runtime::HttpLimits,
    #[command(flatten)]
    pub connections: runtime::http::connections::ConnectionLimits,
    #[command(flatten)]
    pub signing: runtime::auth::SigningKeyConfig,
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let https = runtime::auth::tls::bind(&config.https_addr)?;
    run_with_tls(config, listener, https, shutdown).await
}

/// [`run`], with the HTTPS listener given (or none).
pub async fn run_with_tls(
    config: Config,
    listener: TcpListener,
    https: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let signer = config.signing.signer()?;
    let client = proxy::client();
    let auth = Arc::new(TokenVerifier::new(&config.identity_url, config.verifier.clone()));
    let gateway = Arc::new(proxy::Gateway::new(&config, client, auth.clone(), signer.clone(), shutdown.clone())?);
    let client_ip_header = gateway.client_ip_header.clone();
    let routes = Router::new()
        .route("/api/{*path}", any(proxy::forward))
        .with_state(gateway)
        .merge(web::routes())
        .merge(docs::routes());

    // No route of its own names a caller; the skeleton wants a verifier all the same.
    let mut service = Service::new("gateway", &config.limits, &signer.verify_keys(), shutdown);
    // Slow and idle clients get a bounded share of the connections and permits.
    service.limit_connections(&config.connections, client_ip_header);
    let keys = auth.clone();
    service.ready_when(move || keys.not_ready());
    service.spawn("token keys", auth.keep_fresh(service.shutdown()));
    if let Some(https) = https {
        let secure_cookie = |app: Router| app.layer(axum::middleware::map_response(web::secure_token_cookie));
        service.https(https, &config.tls, Duration::from_secs(30), secure_cookie).await?;
    }
    service.serve(listener, routes).await
}
