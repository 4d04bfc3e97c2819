//! The test harness: every test gets the whole system in-process on random
//! ports, with its own PostgreSQL databases, its own RabbitMQ vhost and its
//! own SMTP server (aiosmtpd), so tests run in parallel without seeing each
//! other's data or messages.

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::{Method, StatusCode};
use runtime::MessagingConfig;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

pub fn postgres_url() -> String {
    env_or("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
}

pub fn rabbitmq_api() -> String {
    env_or("TEST_RABBITMQ_API", "http://guest:guest@127.0.0.1:15672/api")
}

fn amqp_base() -> String {
    env_or("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
}

/// A RabbitMQ vhost of one test, deleted by `drop_vhost`.
pub struct Vhost {
    pub name: String,
    pub amqp_url: String,
}

pub async fn create_vhost(name: &str) -> Vhost {
    let http = reqwest::Client::new();
    let api = rabbitmq_api();
    let ok = |r: reqwest::Response| {
        assert!(r.status().is_success(), "RabbitMQ management API: {}", r.status());
    };
    ok(http
        .put(format!("{api}/vhosts/{name}"))
        .send()
        .await
        .expect("RabbitMQ management API (enable rabbitmq_management)"));
    ok(http
        .put(format!("{api}/permissions/{name}/guest"))
        .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .unwrap());
    Vhost { name: name.to_string(), amqp_url: format!("{}/{name}", amqp_base()) }
}

pub async fn drop_vhost(name: &str) {
    let _ = reqwest::Client::new().delete(format!("{}/vhosts/{name}", rabbitmq_api())).send().await;
}

fn management_url(segments: &[&str]) -> reqwest::Url {
    let mut url = reqwest::Url::parse(&rabbitmq_api()).unwrap();
    url.path_segments_mut().unwrap().extend(segments);
    url
}

/// The names of `service`'s connections to `vhost`, once the broker lists at
/// least one (its list lags a few seconds behind).
pub async fn broker_connections(vhost: &str, service: &str) -> Vec<String> {
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), || async {
        let list: Vec<Value> =
            http.get(management_url(&["vhosts", vhost, "connections"])).send().await.ok()?.json().await.ok()?;
        let names: Vec<String> = list
            .iter()
            .filter(|c| c["client_properties"]["connection_name"] == service)
            .filter_map(|c| Some(c["name"].as_str()?.to_string()))
            .collect();
        (!names.is_empty()).then_some(names)
    })
    .await
}

/// Closes connections from the broker's side, as a broker shutdown or an
/// operator does (the client gets CONNECTION_FORCED).
pub async fn close_broker_connections(names: &[String]) {
    let http = reqwest::Client::new();
    for name in names {
        let r = http.delete(management_url(&["connections", name])).header("x-reason", "test").send().await.unwrap();
        assert!(r.status().is_success(), "closing {name}: {}", r.status());
    }
}

pub async fn drop_database(name: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(&format!("{}/postgres", postgres_url())).await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::query(&sql).execute(&pool).await;
    }
}

/// Drops `databases` and `vhost` (and removes `dir`) from a `Drop`, which
/// cannot await: on a runtime of its own, in a thread of its own, so that it
/// also works while a failed test unwinds inside its tokio runtime.
pub fn clean_up_blocking(databases: Vec<String>, vhost: Option<String>, dir: Option<PathBuf>) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for db in databases {
                drop_database(&db).await;
            }
            if let Some(vhost) = vhost {
                drop_vhost(&vhost).await;
            }
        });
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    })
    .join();
}

/// What a [`TestApp`] leaves on the servers, removed when it is dropped:
/// after [`TestApp::stop`], or when the test fails before it.
struct Leftovers {
    prefix: String,
    vhost: String,
    smtp_dir: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let databases = SERVICES_WITH_DB.iter().map(|s| format!("{}_{s}", self.prefix)).collect();
        clean_up_blocking(databases, Some(self.vhost.clone()), Some(self.smtp_dir.clone()));
    }
}

/// A real SMTP server on loopback: Python's aiosmtpd writing a Maildir.
pub struct SmtpSink {
    pub port: u16,
    pub dir: PathBuf,
    /// With implicit TLS: the CA file its certificate chains to.
    pub ca_file: Option<PathBuf>,
    _process: tokio::process::Child,
}

impl SmtpSink {
    /// `smtps`: implicit TLS with a certificate from a test authority.
    pub async fn start(dir: PathBuf, smtps: bool) -> SmtpSink {
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = tokio::process::Command::new("python3");
        command
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.join("maildir"));
        let mut ca_file = None;
        if smtps {
            let authority = runtime::tls::test_authority().unwrap();
            let (ca, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&ca, authority.ca_pem).unwrap();
            std::fs::write(&cert, authority.cert_pem).unwrap();
            std::fs::write(&key, authority.key_pem).unwrap();
            command.arg("--smtpscert").arg(cert).arg("--smtpskey").arg(key);
            ca_file = Some(ca);
        }
        let process = command.kill_on_drop(true).spawn().expect("python3 with aiosmtpd (pip install aiosmtpd)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return SmtpSink { port, dir, ca_file, _process: process };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("aiosmtpd did not start on port {port}");
    }

    /// Every message received so far, raw.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("maildir").join("new")) else {
            return vec![];
        };
        entries.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()).collect()
    }
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
    /// Declared last: dropped after the services' tasks and the SMTP sink.
    _leftovers: Leftovers,
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
        runtime::telemetry::init_for_tests();
        let prefix = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        let vhost = create_vhost(&prefix).await;
        let smtp = SmtpSink::start(std::env::temp_dir().join(format!("order-system-{prefix}")), tuning.smtps).await;
        let messaging = MessagingConfig {
            retry_delays_ms: vec![100, 300],
            metrics_refresh_ms: 200,
            ..MessagingConfig::local(&vhost.amqp_url)
        };
        let db = |service: &str| format!("{}/{prefix}_{service}", postgres_url());
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
                smtp_url: Some(match smtp.ca_file {
                    Some(_) => format!("smtps://localhost:{}", smtp.port),
                    None => format!("smtp://127.0.0.1:{}", smtp.port),
                }),
                mail_dir: smtp.dir.join("unused"),
                mail_from: "Order System <orders@localhost>".into(),
                emails_per_recipient_per_hour: tuning.emails_per_recipient_per_hour,
                smtp_username: None,
                smtp_password: None,
                smtp_ca_file: smtp.ca_file.clone(),
                dkim: tuning.dkim.clone(),
                unsubscribe: tuning.unsubscribe.clone(),
            },
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
            verifier: runtime::tokens::VerifierConfig { revocation_refresh_ms: 200, ..Default::default() },
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

        let _leftovers = Leftovers { prefix: prefix.clone(), vhost: vhost.name.clone(), smtp_dir: smtp.dir.clone() };
        let app = TestApp {
            _leftovers,
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
            database_url: format!("{}/{}_ordering", postgres_url(), self.prefix),
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
        // directory (`Leftovers`), as it does when a test fails.
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.gateway)
    }

    pub async fn call(
        &self,
        user: Option<&User>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self.http.request(method, self.url(path));
        if let Some(u) = user {
            req = req.bearer_auth(&u.token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("gateway answers")
    }

    pub async fn get<T: DeserializeOwned>(&self, user: &User, path: &str) -> T {
        let r = self.call(Some(user), Method::GET, path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.expect("JSON body")
    }

    pub async fn post(&self, user: &User, path: &str, body: Value) -> reqwest::Response {
        self.call(Some(user), Method::POST, path, Some(body)).await
    }

    /// A POST under an `Idempotency-Key` (a retry sends the same key), as
    /// sent: the caller awaits it, or races several.
    pub fn post_with_key(
        &self,
        user: &User,
        path: &str,
        key: &str,
        body: Value,
    ) -> impl Future<Output = reqwest::Result<reqwest::Response>> + use<> {
        self.http.post(self.url(path)).bearer_auth(&user.token).header("Idempotency-Key", key).json(&body).send()
    }

    pub async fn register(&self, email: &str, password: &str) -> reqwest::Response {
        self.call(
            None,
            Method::POST,
            "/identity/register",
            Some(json!({"email": email, "password": password, "firstName": "Test", "lastName": "User"})),
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.call(None, Method::POST, "/identity/login", Some(json!({"email": email, "password": password}))).await
    }

    /// A new user, registered and logged in.
    pub async fn user(&self) -> User {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let r = self.register(&email, "correct horse").await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let id: Uuid = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
        let r = self.login(&email, "correct horse").await;
        assert_eq!(r.status(), StatusCode::OK);
        let token = r.json::<Value>().await.unwrap()["accessToken"].as_str().unwrap().to_string();
        User { id, email, token }
    }

    pub async fn balance(&self, user: &User) -> f64 {
        self.get::<Value>(user, "/billing/account").await["amount"].as_f64().unwrap()
    }

    /// Polls the order until it leaves `pending`.
    pub async fn settled_order(&self, user: &User, id: &str) -> Value {
        eventually(Duration::from_secs(20), || async {
            let order: Value = self.get(user, &format!("/ordering/orders/{id}")).await;
            (order["status"] != "pending").then_some(order)
        })
        .await
    }

    /// Opens the user's event stream through the gateway; events arrive on the receiver.
    pub async fn subscribe(&self, user: &User) -> mpsc::UnboundedReceiver<SseEvent> {
        sse_events(self.http.get(self.url("/push/orders")).bearer_auth(&user.token).send().await.unwrap())
    }

    /// Publishes a raw message into the test's vhost, as a service would.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: Option<&str>,
        kind: &str,
        body: &[u8],
    ) {
        let conn = Connection::connect(&self.vhost.amqp_url, ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let mut props = BasicProperties::default().with_type(kind.into()).with_content_type("application/json".into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, lapin::Confirmation::Ack(None)), "published and routed");
        let _ = conn.close(200, "done".into()).await;
    }
}

pub struct User {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

/// `user` as the gateway names it in an assertion (the token's id and
/// expiry matter only to logout, which tests make through the gateway).
pub fn as_current(user: &User) -> runtime::auth::CurrentUser {
    runtime::auth::CurrentUser {
        id: user.id,
        email: user.email.clone(),
        token_id: Uuid::new_v4(),
        token_expires: chrono::Utc::now().timestamp() + 3600,
    }
}

/// The header name the gateway's assertion travels in.
pub const ASSERTION: &str = runtime::auth::ASSERTION_HEADER;

#[derive(Debug, Default, Clone)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: String,
}

/// Parses a `text/event-stream` response into events (comments skipped).
pub fn sse_events(resp: reqwest::Response) -> mpsc::UnboundedReceiver<SseEvent> {
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                for line in block.lines() {
                    if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
                        match field {
                            "id" => ev.id = value,
                            "event" => ev.event = value,
                            "data" => ev.data.push_str(&value),
                            _ => {}
                        }
                    }
                }
                if !ev.event.is_empty() && tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Waits until `count_sql` (a `SELECT count(*)` with one parameter, `arg`)
/// counts `expected` rows in `db`, or fails the test after `limit`.
pub async fn eventually_counts<A>(limit: Duration, db: &sqlx::PgPool, count_sql: &'static str, arg: A, expected: i64)
where
    A: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Clone + Send + 'static,
{
    eventually(limit, || async {
        let n: i64 = sqlx::query_scalar(count_sql).bind(arg.clone()).fetch_one(db).await.unwrap();
        (n == expected).then_some(())
    })
    .await
}

/// Retries `check` until it yields a value, or fails the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the seed's error body: `{code, message}` with the response's status.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, needle: &str) {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.expect("error body is JSON");
    assert_eq!(body["code"], status.as_u16(), "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(message.to_lowercase().contains(&needle.to_lowercase()), "{message:?} should mention {needle:?}");
}

impl TestApp {
    /// Messages ready in a queue of the test's vhost (the broker's own count,
    /// not the management API's sampled statistics).
    pub async fn queue_depth(&self, queue: &str) -> i64 {
        let conn = Connection::connect(&self.vhost.amqp_url, ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                Default::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "done".into()).await;
        i64::from(declared.message_count())
    }

    /// A connection to one of the test's service databases.
    pub async fn db(&self, service: &str) -> sqlx::PgPool {
        sqlx::PgPool::connect(&format!("{}/{}_{service}", postgres_url(), self.prefix)).await.unwrap()
    }
}

#[tokio::test]
async fn a_failing_test_leaves_no_database_vhost_or_mail_directory() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let app = TestApp::spawn().await;
        tx.send((app.prefix.clone(), app.smtp.dir.clone())).unwrap();
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
    let vhost = reqwest::Client::new().get(format!("{}/vhosts/{prefix}", rabbitmq_api())).send().await.unwrap();
    assert_eq!(vhost.status(), StatusCode::NOT_FOUND, "the vhost {prefix} was left behind");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// A TCP proxy in front of a service that a test can cut (refusing new
/// connections and closing open ones) and restore: the service becomes
/// unreachable for whoever talks to it through here.
pub struct CuttableProxy {
    pub url: String,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<std::sync::Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    pub async fn start(target: &str) -> CuttableProxy {
        use std::sync::atomic::Ordering;
        let target = target.trim_start_matches("http://").to_string();
        let (l, url) = listener().await;
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = std::sync::Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (on2, cut2) = (on.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                if !on2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let closed = cut2.lock().unwrap().clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.cancelled() => {}
                    }
                });
            }
        });
        CuttableProxy { url, on, cut, task }
    }

    /// The service is unreachable through the proxy from now on.
    pub fn cut(&self) {
        self.on.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.on.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
