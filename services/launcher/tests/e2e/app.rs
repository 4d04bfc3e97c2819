//! The whole system of one test, in-process on random ports, with its own
//! PostgreSQL databases, RabbitMQ vhost and SMTP sink (a `test_support`
//! sandbox), so tests run in parallel without seeing each other's data or
//! messages. It is described by the launcher's `SystemConfig` and started by
//! its `System`, as `order-system run` starts one: a test changes the fields
//! it is about, nothing restates a service's configuration.

use crate::client::{User, as_current};
use order_system::system::{Listeners, Service, System, SystemConfig, Wiring};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use test_support::{Sandbox, SmtpSink, eventually, postgres_url};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The test's RabbitMQ vhost.
pub struct Vhost {
    pub name: String,
    pub amqp_url: String,
}

/// The whole system of one test.
pub struct TestApp {
    pub gateway: String,
    /// The gateway's HTTPS address (HTTP/2 by ALPN, self-signed certificate).
    pub gateway_https: String,
    /// Identity, directly (its keys for services that check tokens themselves).
    pub identity: String,
    pub http: reqwest::Client,
    pub vhost: Vhost,
    pub prefix: String,
    pub smtp: SmtpSink,
    /// The system's description, as the test set it: more services of this
    /// system (replicas, a second gateway) are configured from it.
    pub config: SystemConfig,
    /// Where the services are, and the gateway's key for the assertions the
    /// services verify (generated per test, as the launcher does): tests mint
    /// assertions with it to call a service directly, as the gateway would.
    pub wiring: Wiring,
    shutdown: CancellationToken,
    system: System,
    /// Services started beside the system's own (replicas, gateways).
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The databases, vhost and mail directory, removed when the app is
    /// dropped (after `stop`, or when the test fails). Declared last: dropped
    /// after the services' tasks and the SMTP sink.
    pub sandbox: Sandbox,
}

/// A system on the sandbox's databases (`PREFIX_identity`, ..., removed
/// with it) and vhost, with the defaults of `order-system run` otherwise.
pub fn sandboxed(sandbox: &Sandbox) -> SystemConfig {
    let mut config = SystemConfig::defaults();
    config.postgres_url = postgres_url();
    config.database_prefix = format!("{}_", sandbox.prefix);
    for service in Service::WITH_DATABASE {
        // The sandbox drops each database the service creates.
        assert_eq!(config.database_url(service), sandbox.database_url(service.name()));
    }
    config.messaging.amqp_url = sandbox.amqp_url.clone();
    config
}

/// Ordering's sweeper leaves pending orders alone (for a year): for tests
/// that leave an order pending on purpose, which it would re-drive or void.
pub fn sweeper_off(config: &mut SystemConfig) {
    let year = 365 * 24 * 3600 * 1000;
    config.sweeper.redrive_after_ms = year;
    config.sweeper.pending_timeout_ms = year;
}

pub const SERVICES_WITH_DB: [&str; 4] = ["identity", "billing", "ordering", "notification"];

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// The system of a test, changed by `tune`.
    pub async fn spawn_with(tune: impl FnOnce(&mut SystemConfig)) -> TestApp {
        Self::start(false, tune).await
    }

    /// E-mail over implicit TLS (`smtps://`, the sink's CA in `SMTP_CA_FILE`).
    pub async fn spawn_over_smtps() -> TestApp {
        Self::start(true, |_| {}).await
    }

    /// The system of a test: production's settings, except that many users
    /// register and log in from one address, messages are retried, metrics
    /// and revocations refreshed and signing keys reloaded within a second,
    /// streams beat every second and end at once on shutdown, the push
    /// service has no HTTPS port of its own and e-mail goes to the sink.
    fn config(sandbox: &Sandbox, smtp: &SmtpSink) -> SystemConfig {
        let mut config = sandboxed(sandbox);
        config.messaging.retry_delays_ms = vec![100, 300];
        config.messaging.metrics_refresh_ms = 200;
        config.abuse.login_per_address_per_minute = 10_000;
        config.abuse.register_per_address_per_minute = 10_000;
        config.signing_key_reload_secs = 1;
        config.verifier.revocation_refresh_ms = 200;
        config.heartbeat_secs = 1;
        config.push_drain_secs = 0;
        config.push_tls_addr.clear();
        config.mail.smtp_url = Some(smtp.url());
        config.mail.smtp_ca_file = smtp.ca_file.clone();
        config.mail.mail_dir = sandbox.dir("mail").join("unused");
        config
    }

    async fn start(smtps: bool, tune: impl FnOnce(&mut SystemConfig)) -> TestApp {
        let sandbox = Sandbox::new().await;
        let prefix = sandbox.prefix.clone();
        let vhost = Vhost { name: sandbox.vhost().to_string(), amqp_url: sandbox.amqp_url.clone() };
        let smtp = if smtps { SmtpSink::smtps(&sandbox.dir("mail")).await } else { SmtpSink::start().await };
        let mut config = Self::config(&sandbox, &smtp);
        tune(&mut config);
        let shutdown = CancellationToken::new();
        let listeners = Listeners::free_ports(&config, IpAddr::V4(Ipv4Addr::LOCALHOST)).await.unwrap();
        let system = System::start(&config, listeners, shutdown.clone()).await.unwrap();
        let wiring = system.wiring.clone();
        let https = system.gateway_https.expect("the gateway's HTTPS port");
        let app = TestApp {
            sandbox,
            gateway: wiring.url(Service::Gateway),
            gateway_https: format!("https://{https}"),
            identity: wiring.url(Service::Identity),
            http: reqwest::Client::new(),
            vhost,
            prefix,
            smtp,
            config,
            wiring,
            shutdown,
            system,
            tasks: Vec::new(),
        };
        app.wait_until_ready().await;
        app
    }

    /// The gateway's key, which every service of this app verifies.
    pub fn signer(&self) -> &runtime::auth::AssertionSigner {
        &self.wiring.signer
    }

    /// Runs `run` on a listener of its own, beside the system; once it is
    /// ready, its URL.
    async fn beside<F>(&mut self, run: impl FnOnce(TcpListener, CancellationToken) -> F) -> String
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        self.tasks.push(tokio::spawn(run(listener, self.shutdown.clone())));
        crate::client::ready(&self.http, &url).await;
        url
    }

    /// Another ordering replica on the same database and vhost; with
    /// `api_only` it serves the API but settles nothing. Its URL.
    pub async fn ordering_replica(&mut self, api_only: bool) -> String {
        let config = ordering::Config { api_only, ..self.config.ordering(&self.wiring) };
        self.beside(|l, stop| ordering::run(config, l, stop)).await
    }

    /// Another gateway to the same services, except ordering at `ordering_url`,
    /// with its own upstream timeout. Its URL (`.../api/v1` is added by callers).
    pub async fn gateway_to(&mut self, ordering_url: &str, upstream_timeout_secs: u64) -> String {
        self.gateway_with(|c| {
            c.ordering_url = ordering_url.to_string();
            c.upstream_timeout_secs = upstream_timeout_secs;
        })
        .await
    }

    /// Another gateway (without HTTPS), configured as the first one and then
    /// by `tweak`, once it is ready. Its URL.
    pub async fn gateway_with(&mut self, tweak: impl FnOnce(&mut gateway::Config)) -> String {
        let mut config = self.config.gateway(&self.wiring);
        tweak(&mut config);
        self.beside(|l, stop| gateway::run_with_tls(config, l, None, stop)).await
    }

    /// A service's own (internal) URL, as the gateway reaches it.
    pub fn service_url(&self, service: &str) -> String {
        let service = Service::ALL.into_iter().find(|s| s.name() == service);
        self.wiring.url(service.expect("a service of the system"))
    }

    /// What the gateway sends `service` (its name) to say that `user`
    /// calls `method` on `path` (the service's own): the value of
    /// `X-User-Assertion`, good for one request.
    pub fn assertion(&self, service: &str, method: Method, path: &str, user: &User) -> String {
        self.signer().sign(service, &method, path, &as_current(user))
    }

    /// Starts the shutdown of every service (as SIGTERM would); `stop` still cleans up.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    async fn wait_until_ready(&self) {
        let ordering_url = self.wiring.url(Service::Ordering);
        // Ready when the gateway can verify tokens (identity is up and the
        // gateway has its keys) and the consumers are connected.
        eventually(Duration::from_secs(30), || async {
            let r = self
                .http
                .post(format!("{}/api/v1/identity/logout", self.gateway))
                .bearer_auth("x.y.z")
                .send()
                .await
                .ok()?;
            // A malformed token is refused before the keys are needed: the
            // gateway's readiness says whether it has identity's keys yet.
            let gateway = self.http.get(format!("{}/health/ready", self.gateway)).send().await.ok()?;
            let ordering = self.http.get(format!("{ordering_url}/health/ready")).send().await.ok()?;
            let ready = gateway.status().is_success() && ordering.status().is_success();
            // Readiness leaves the broker out; its details say whether it is connected.
            let checks: Value = ordering.json().await.ok()?;
            let connected = checks["checks"]["broker"] == "connected";
            (r.status() == StatusCode::UNAUTHORIZED && ready && connected).then_some(())
        })
        .await;
    }

    /// Stops every service and removes the test's databases and vhost.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.system.join()).await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        // Dropping the rest removes the databases, the vhost and the mail
        // directory (the sandbox), as it does when a test fails.
    }
}

#[tokio::test]
async fn a_failing_test_leaves_no_database_vhost_or_mail_directory() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let app = TestApp::spawn().await;
        tx.send((app.prefix.clone(), app.sandbox.dir("mail"))).unwrap();
        panic!("the test fails before it stops the app");
    });
    assert!(failing.await.unwrap_err().is_panic());
    let (prefix, dir) = rx.await.unwrap();

    let pool = sqlx::PgPool::connect(&format!("{}/postgres", postgres_url())).await.unwrap();
    // A test helper's own lookup: the pattern is the test's prefix.
    let left: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{prefix}\\_%"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(left.is_empty(), "databases left behind: {left:?}");
    let vhost =
        reqwest::Client::new().get(format!("{}/vhosts/{prefix}", test_support::rabbitmq_api())).send().await.unwrap();
    assert_eq!(vhost.status(), StatusCode::NOT_FOUND, "the vhost {prefix} was left behind");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
