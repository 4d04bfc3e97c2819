//! The whole system of one test, in-process on random ports, with its own
//! PostgreSQL databases, RabbitMQ vhost and SMTP sink (a `test_support`
//! sandbox), so tests run in parallel without seeing each other's data or
//! messages. The services' configs for tests are built here, in one place.

use crate::client::{User, as_current};
use reqwest::{Method, StatusCode};
use runtime::MessagingConfig;
use serde_json::Value;
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
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    messaging: MessagingConfig,
    gateway_config: gateway::Config,
    /// The gateway's key for the assertions the services verify (generated
    /// per test, as the launcher does): tests mint assertions with it to call
    /// a service directly, as the gateway would.
    pub signer: runtime::auth::AssertionSigner,
    /// The databases, vhost and mail directory, removed when the app is
    /// dropped (after `stop`, or when the test fails). Declared last: dropped
    /// after the services' tasks and the SMTP sink.
    pub sandbox: Sandbox,
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

/// Limits a test sets differently from the defaults.
pub struct Tuning {
    pub abuse: identity::AbuseLimits,
    pub identity_limits: runtime::HttpLimits,
    /// The header the gateway reads the client's address from (as behind an ingress).
    pub gateway_client_ip_header: Option<String>,
    /// How long identity's access tokens are valid.
    pub token_ttl_secs: u64,
    /// E-mail over implicit TLS (`smtps://`, the sink's CA in `SMTP_CA_FILE`).
    pub smtps: bool,
    /// When ordering re-drives and gives up on pending orders.
    pub sweeper: ordering::sweeper::SweeperConfig,
    /// Orders, deposits and withdrawals per user a minute.
    pub per_user: runtime::http::PerUserLimits,
    /// E-mails one address may be sent an hour (0: no budget).
    pub emails_per_recipient_per_hour: u32,
    /// How e-mails are DKIM-signed (not at all by default).
    pub dkim: notification::DkimSettings,
    /// The e-mails' unsubscribe links (none by default).
    pub unsubscribe: notification::UnsubscribeConfig,
}

impl Default for Tuning {
    /// Production's limits, but many users register and log in from one
    /// address in a test.
    fn default() -> Self {
        Tuning {
            abuse: identity::AbuseLimits {
                login_per_address_per_minute: 10_000,
                register_per_address_per_minute: 10_000,
                ..Default::default()
            },
            identity_limits: Default::default(),
            gateway_client_ip_header: None,
            token_ttl_secs: 3600,
            smtps: false,
            sweeper: Default::default(),
            per_user: Default::default(),
            emails_per_recipient_per_hour: 20,
            dkim: Default::default(),
            unsubscribe: Default::default(),
        }
    }
}

impl Tuning {
    /// Ordering's sweeper leaves pending orders alone (for a year): for tests
    /// that leave an order pending on purpose, which it would re-drive or void.
    pub fn sweeper_off() -> Tuning {
        let year = 365 * 24 * 3600 * 1000;
        let sweeper =
            ordering::sweeper::SweeperConfig { redrive_after_ms: year, pending_timeout_ms: year, ..Default::default() };
        Tuning { sweeper, ..Default::default() }
    }
}

pub const SERVICES_WITH_DB: [&str; 4] = ["identity", "billing", "ordering", "notification"];

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Tuning::default()).await
    }

    pub async fn spawn_with(tuning: Tuning) -> TestApp {
        let sandbox = Sandbox::new().await;
        let prefix = sandbox.prefix.clone();
        let vhost = Vhost { name: sandbox.vhost().to_string(), amqp_url: sandbox.amqp_url.clone() };
        let mail_dir = sandbox.dir("mail");
        let smtp = if tuning.smtps { SmtpSink::smtps(&mail_dir).await } else { SmtpSink::start().await };
        let messaging = MessagingConfig {
            retry_delays_ms: vec![100, 300],
            metrics_refresh_ms: 200,
            ..MessagingConfig::local(&vhost.amqp_url)
        };
        let db = |service: &str| sandbox.database_url(service);
        let signer = runtime::auth::AssertionSigner::generate();
        let callers = runtime::auth::CallerKeys { verify_keys: signer.verify_keys() };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let (l, identity_url) = listener().await;
        let config = identity::Config {
            database_url: db("identity"),
            messaging: messaging.clone(),
            limits: tuning.identity_limits,
            token_ttl_secs: tuning.token_ttl_secs,
            jwt_private_key_pem: None,
            // The gateway sets it.
            abuse: identity::AbuseLimits { client_ip_header: Some("x-forwarded-for".into()), ..tuning.abuse },
            cookie_secure: false,
            signing_key_reload_secs: 1,
            addr: String::new(),
            callers: callers.clone(),
        };
        tasks.push(tokio::spawn(identity::run(config, l, shutdown.clone())));
        let (l, billing_url) = listener().await;
        let config = billing::Config {
            database_url: db("billing"),
            messaging: messaging.clone(),
            idempotency: Default::default(),
            limits: Default::default(),
            addr: String::new(),
            callers: callers.clone(),
            per_user: tuning.per_user.clone(),
        };
        tasks.push(tokio::spawn(billing::run(config, l, shutdown.clone())));
        let (l, ordering_url) = listener().await;
        let config = ordering::Config {
            database_url: db("ordering"),
            messaging: messaging.clone(),
            idempotency: Default::default(),
            api_only: false,
            sweeper: tuning.sweeper,
            limits: Default::default(),
            addr: String::new(),
            callers: callers.clone(),
            per_user: tuning.per_user.clone(),
        };
        tasks.push(tokio::spawn(ordering::run(config, l, shutdown.clone())));
        let (l, notification_url) = listener().await;
        let config = notification::Config {
            database_url: db("notification"),
            messaging: messaging.clone(),
            limits: Default::default(),
            mail: notification::MailConfig {
                smtp_url: Some(smtp.url()),
                mail_dir: mail_dir.join("unused"),
                mail_from: "Order System <orders@localhost>".into(),
                emails_per_recipient_per_hour: tuning.emails_per_recipient_per_hour,
                smtp_username: None,
                smtp_password: None,
                smtp_ca_file: smtp.ca_file.clone(),
                dkim: tuning.dkim.clone(),
                unsubscribe: tuning.unsubscribe.clone(),
            },
            web_push: Default::default(),
            addr: String::new(),
            callers: callers.clone(),
        };
        tasks.push(tokio::spawn(notification::run(config, l, shutdown.clone())));
        let (l, push_url) = listener().await;
        let config = push_service::Config {
            heartbeat_secs: 1,
            drain_secs: 0,
            ..push_service::Config::local(messaging.clone(), signer.verify_keys())
        };
        tasks.push(tokio::spawn(push_service::run(config, l, shutdown.clone())));
        let (l, gateway) = listener().await;
        let config = gateway::Config {
            addr: String::new(),
            identity_url: identity_url.clone(),
            billing_url,
            ordering_url: ordering_url.clone(),
            notification_url,
            push_url,
            push_h2c: true,
            push_streams_per_connection: 100,
            verifier: runtime::auth::tokens::VerifierConfig { revocation_refresh_ms: 200, ..Default::default() },
            upstream_timeout_secs: 30,
            client_ip_header: tuning.gateway_client_ip_header,
            https_addr: String::new(),
            tls: Default::default(),
            limits: Default::default(),
            connections: Default::default(),
            signing: runtime::auth::SigningKeyConfig::with(signer.clone()),
        };
        let gateway_config = config.clone();
        let https = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gateway_https = format!("https://{}", https.local_addr().unwrap());
        tasks.push(tokio::spawn(gateway::run_with_tls(config, l, Some(https), shutdown.clone())));

        let app = TestApp {
            sandbox,
            gateway,
            gateway_https,
            identity: identity_url,
            http: reqwest::Client::new(),
            vhost,
            prefix,
            smtp,
            shutdown,
            tasks,
            messaging,
            gateway_config,
            signer,
        };
        app.wait_until_ready(&ordering_url).await;
        app
    }

    /// Another ordering replica on the same database and vhost; with
    /// `api_only` it serves the API but settles nothing. Its URL.
    pub async fn ordering_replica(&mut self, api_only: bool) -> String {
        let (l, url) = listener().await;
        let config = ordering::Config {
            database_url: self.sandbox.database_url("ordering"),
            messaging: self.messaging.clone(),
            idempotency: Default::default(),
            api_only,
            sweeper: Default::default(),
            limits: Default::default(),
            addr: String::new(),
            callers: self.callers(),
            per_user: Default::default(),
        };
        self.tasks.push(tokio::spawn(ordering::run(config, l, self.shutdown.clone())));
        eventually(Duration::from_secs(30), || async {
            let r = self.http.get(format!("{url}/health/ready")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        url
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

    /// Another gateway, configured as the first one and then by `tweak`,
    /// once it is ready. Its URL.
    pub async fn gateway_with(&mut self, tweak: impl FnOnce(&mut gateway::Config)) -> String {
        let (l, url) = listener().await;
        let mut config = self.gateway_config.clone();
        tweak(&mut config);
        self.tasks.push(tokio::spawn(gateway::run_with_tls(config, l, None, self.shutdown.clone())));
        eventually(Duration::from_secs(30), || async {
            let r = self.http.get(format!("{url}/health/ready")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        url
    }

    /// A service's own (internal) URL, as the gateway reaches it.
    pub fn service_url(&self, service: &str) -> String {
        let c = &self.gateway_config;
        match service {
            "identity" => &c.identity_url,
            "billing" => &c.billing_url,
            "ordering" => &c.ordering_url,
            "notification" => &c.notification_url,
            "push" => &c.push_url,
            _ => panic!("no service {service}"),
        }
        .clone()
    }

    /// The gateway's public key, as every service of this app is configured.
    pub fn callers(&self) -> runtime::auth::CallerKeys {
        runtime::auth::CallerKeys { verify_keys: self.signer.verify_keys() }
    }

    /// What the gateway sends `service` (its name) to say that `user`
    /// calls `method` on `path` (the service's own): the value of
    /// `X-User-Assertion`, good for one request.
    pub fn assertion(&self, service: &str, method: Method, path: &str, user: &User) -> String {
        self.signer.sign(service, &method, path, &as_current(user))
    }

    /// Starts the shutdown of every service (as SIGTERM would); `stop` still cleans up.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    async fn wait_until_ready(&self, ordering_url: &str) {
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
