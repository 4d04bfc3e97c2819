//! The composition root: one description of the system (`SystemConfig`) and
//! the one place that turns it into each service's own configuration, either
//! to run the services in this process (`System::start`) or to run each one as
//! its own process (`SystemConfig::process_env`, the environment its binary
//! reads).
//!
//! Which services run, on which listeners, against which PostgreSQL server
//! (and database prefix), which RabbitMQ vhost, with throttles on or off and
//! where mail goes: all of it is in `SystemConfig`; nothing else writes a
//! service's `Config { … }`.

use runtime::{MessagingConfig, Tasks};
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One service of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Service {
    Gateway,
    Identity,
    Billing,
    Ordering,
    Notification,
    Push,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Gateway,
        Service::Identity,
        Service::Billing,
        Service::Ordering,
        Service::Notification,
        Service::Push,
    ];

    /// The services that keep a database of their own on the PostgreSQL server.
    pub const WITH_DATABASE: [Service; 4] =
        [Service::Identity, Service::Billing, Service::Ordering, Service::Notification];

    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Identity => "identity",
            Service::Billing => "billing",
            Service::Ordering => "ordering",
            Service::Notification => "notification",
            Service::Push => "push",
        }
    }

    /// Its port relative to the gateway's in the default layout (gateway,
    /// gateway + 1, ... + 5).
    fn offset(self) -> u16 {
        match self {
            Service::Gateway => 0,
            Service::Identity => 1,
            Service::Billing => 2,
            Service::Ordering => 3,
            Service::Notification => 4,
            Service::Push => 5,
        }
    }

    /// The prefix of its binary's environment variables (`IDENTITY_ADDR`, ...).
    fn env_prefix(self) -> &'static str {
        match self {
            Service::Gateway => "GATEWAY",
            Service::Identity => "IDENTITY",
            Service::Billing => "BILLING",
            Service::Ordering => "ORDERING",
            Service::Notification => "NOTIFICATION",
            Service::Push => "PUSH",
        }
    }

    fn task_name(self) -> &'static str {
        match self {
            Service::Push => "push-service",
            other => other.name(),
        }
    }
}

/// Whether the abuse throttles apply: logins and registrations per address,
/// account and device, orders/deposits/withdrawals per user, e-mails per
/// recipient, and the gateway's connections and requests per client. `off`
/// sets each of them to 0, which every one of them reads as "no limit".
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Throttles {
    On,
    Off,
}

/// Everything that describes one order system.
#[derive(clap::Args, Clone, Debug)]
pub struct SystemConfig {
    /// The services this process runs (comma-separated); the gateway reaches
    /// the others at their configured addresses.
    #[arg(
        long,
        env = "SERVICES",
        value_delimiter = ',',
        default_value = "gateway,identity,billing,ordering,notification,push"
    )]
    pub services: Vec<Service>,

    /// PostgreSQL server; each service uses its own database on it.
    #[arg(long, env = "POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres_url: String,

    /// Prefix of the database names (`<prefix>identity`, ...), to run a
    /// second system on the same PostgreSQL server.
    #[arg(long, env = "DATABASE_PREFIX", default_value = "")]
    pub database_prefix: String,

    #[command(flatten)]
    pub messaging: MessagingConfig,

    /// Address of the public gateway.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub gateway_addr: SocketAddr,

    /// Interface the internal services listen on (ports: gateway + 1 ... + 5).
    #[arg(long, env = "INTERNAL_HOST", default_value = "127.0.0.1")]
    pub internal_host: IpAddr,

    /// `off`: every abuse throttle is turned off, whatever its own setting
    /// (for load tests); `on`: each as configured. Default: on, and off in a
    /// throwaway system (`run --throwaway`).
    #[arg(long, env = "THROTTLES", value_enum)]
    pub throttles: Option<Throttles>,

    #[command(flatten)]
    pub mail: notification::MailConfig,

    #[command(flatten)]
    pub web_push: notification::WebPushConfig,

    #[command(flatten)]
    pub idempotency: runtime::http::idempotency::IdempotencyConfig,

    #[command(flatten)]
    pub sweeper: ordering::sweeper::SweeperConfig,

    #[arg(long, env = "TOKEN_TTL_SECS", default_value_t = 3600)]
    pub token_ttl_secs: u64,

    /// How often identity reloads its signing keys (a rotation takes effect within it).
    #[arg(long, env = "SIGNING_KEY_RELOAD_SECS", default_value_t = 10)]
    pub signing_key_reload_secs: u64,

    #[arg(long, env = "SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub heartbeat_secs: u64,

    /// How long the push service, stopping, lets its event streams end
    /// (clients reconnect elsewhere meanwhile), in seconds.
    #[arg(long, env = "PUSH_DRAIN_SECS", default_value_t = 10)]
    pub push_drain_secs: u64,

    /// How the gateway (and the push service's own HTTPS port) check
    /// identity's tokens: revocations and keys refreshed, verified tokens
    /// remembered.
    #[command(flatten)]
    pub verifier: runtime::auth::tokens::VerifierConfig,

    /// HTTPS address of the gateway (HTTP/2 and HTTP/1.1); empty turns it off.
    #[arg(long, env = "GATEWAY_HTTPS_ADDR", default_value = "127.0.0.1:8443")]
    pub gateway_https_addr: String,

    /// HTTPS address of the push service itself; empty turns it off.
    #[arg(long, env = "PUSH_TLS_ADDR", default_value = "127.0.0.1:8086")]
    pub push_tls_addr: String,

    /// Use the push service at this URL (e.g. a separate `push-service`
    /// process) instead of starting one in this process.
    #[arg(long, env = "EXTERNAL_PUSH_URL")]
    pub external_push_url: Option<String>,

    #[command(flatten)]
    pub tls: runtime::auth::tls::TlsConfig,

    #[command(flatten)]
    pub limits: runtime::HttpLimits,
    /// The gateway's limits per connection and per client address.
    #[command(flatten)]
    pub connections: runtime::http::connections::ConnectionLimits,

    #[command(flatten)]
    pub abuse: identity::AbuseLimits,

    /// Orders, deposits and withdrawals per user a minute.
    #[command(flatten)]
    pub per_user: runtime::http::PerUserLimits,

    /// Header that carries the client's address, set by the proxy in front of
    /// the gateway (unset: the connection's peer).
    #[arg(long, env = "GATEWAY_CLIENT_IP_HEADER")]
    pub gateway_client_ip_header: Option<String>,

    /// The gateway reaches the push service over h2c (HTTP/2 without TLS);
    /// `false`: HTTP/1.1, one connection per event stream.
    #[arg(long, env = "GATEWAY_PUSH_H2C", default_value_t = true, action = clap::ArgAction::Set)]
    pub gateway_push_h2c: bool,

    /// Event streams per h2c connection from the gateway to the push service.
    #[arg(long, env = "GATEWAY_PUSH_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub gateway_push_streams_per_connection: usize,

    /// The gateway's key for the assertions the services verify; unset, a
    /// new pair is generated at start (set it when a push service runs as
    /// its own process with EXTERNAL_PUSH_URL: it needs the public half).
    #[command(flatten)]
    pub signing: runtime::auth::SigningKeyConfig,
}

/// Parses nothing but the defaults (and the environment, as the binary does).
#[derive(clap::Parser)]
struct Defaults {
    #[command(flatten)]
    config: SystemConfig,
}

impl SystemConfig {
    /// The configuration of `order-system` started without arguments: the
    /// defaults, with whatever the environment sets.
    pub fn from_env() -> SystemConfig {
        <Defaults as clap::Parser>::parse_from(["order-system"]).config
    }

    /// The defaults alone, whatever the environment sets (for tests and tools
    /// that describe a system entirely themselves).
    pub fn defaults() -> SystemConfig {
        Self::from_args_only(std::iter::empty::<&str>()).expect("the defaults parse")
    }

    /// `args` (flags, as on the command line) over the defaults, without the
    /// environment.
    pub fn from_args_only<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<SystemConfig, clap::Error> {
        let command = <Defaults as clap::CommandFactory>::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command.try_get_matches_from(std::iter::once("order-system").chain(args))?;
        Ok(<Defaults as clap::FromArgMatches>::from_arg_matches(&matches)?.config)
    }

    /// The URL of `database` (`identity`, ...) on the server, with the prefix.
    pub fn database_url(&self, service: Service) -> String {
        format!("{}/{}{}", self.postgres_url.trim_end_matches('/'), self.database_prefix, service.name())
    }

    /// The server's maintenance database, for creating and dropping the others.
    pub fn server_url(&self) -> String {
        format!("{}/postgres", self.postgres_url.trim_end_matches('/'))
    }

    /// Whether this process runs `service`.
    pub fn runs(&self, service: Service) -> bool {
        self.services.contains(&service) && !(service == Service::Push && self.external_push_url.is_some())
    }

    /// The configured address of `service` (gateway + its offset).
    pub fn addr(&self, service: Service) -> SocketAddr {
        match service {
            Service::Gateway => self.gateway_addr,
            other => SocketAddr::new(self.internal_host, self.gateway_addr.port() + other.offset()),
        }
    }

    /// Every throttle off (0 = no limit), in every place that has one.
    pub fn without_throttles(mut self) -> SystemConfig {
        self.throttles = Some(Throttles::Off);
        self
    }

    fn throttles_off(&self) -> bool {
        self.throttles == Some(Throttles::Off)
    }

    /// The abuse limits with the throttles applied: `off` zeroes each.
    fn abuse(&self) -> identity::AbuseLimits {
        let mut abuse = self.abuse.clone();
        if self.throttles_off() {
            abuse.login_per_address_per_minute = 0;
            abuse.login_per_account_per_minute = 0;
            abuse.login_per_device_per_minute = 0;
            abuse.register_per_address_per_minute = 0;
        }
        abuse
    }

    fn per_user(&self) -> runtime::http::PerUserLimits {
        if !self.throttles_off() {
            return self.per_user.clone();
        }
        runtime::http::PerUserLimits {
            orders_per_user_per_minute: 0,
            deposits_per_user_per_minute: 0,
            withdrawals_per_user_per_minute: 0,
        }
    }

    fn mail(&self) -> notification::MailConfig {
        let mut mail = self.mail.clone();
        if self.throttles_off() {
            mail.emails_per_recipient_per_hour = 0;
        }
        mail
    }

    fn connections(&self) -> runtime::http::connections::ConnectionLimits {
        let mut connections = self.connections.clone();
        if self.throttles_off() {
            connections.max_connections_per_client = 0;
            connections.max_requests_per_client = 0;
        }
        connections
    }

    /// What every service behind the gateway shares: the broker, the HTTP
    /// limits, and the gateway's keys to check its callers with.
    pub fn common(&self, wiring: &Wiring) -> runtime::ServiceConfig {
        runtime::ServiceConfig {
            messaging: self.messaging.clone(),
            limits: wiring.limits.clone(),
            callers: wiring.callers(),
        }
    }

    pub fn identity(&self, wiring: &Wiring) -> identity::Config {
        identity::Config {
            database_url: self.database_url(Service::Identity),
            common: self.common(wiring),
            token_ttl_secs: self.token_ttl_secs,
            jwt_private_key_pem: std::env::var("JWT_PRIVATE_KEY_PEM").ok(),
            // Identity is reached through the gateway, which sets this header.
            abuse: identity::AbuseLimits { client_ip_header: Some("x-forwarded-for".into()), ..self.abuse() },
            cookie_secure: false,
            signing_key_reload_secs: self.signing_key_reload_secs,
            addr: wiring.addr(Service::Identity).to_string(),
        }
    }

    pub fn billing(&self, wiring: &Wiring) -> billing::Config {
        billing::Config {
            database_url: self.database_url(Service::Billing),
            common: self.common(wiring),
            idempotency: self.idempotency.clone(),
            addr: wiring.addr(Service::Billing).to_string(),
            per_user: self.per_user(),
        }
    }

    pub fn ordering(&self, wiring: &Wiring) -> ordering::Config {
        ordering::Config {
            database_url: self.database_url(Service::Ordering),
            common: self.common(wiring),
            idempotency: self.idempotency.clone(),
            api_only: false,
            sweeper: self.sweeper.clone(),
            addr: wiring.addr(Service::Ordering).to_string(),
            per_user: self.per_user(),
        }
    }

    pub fn notification(&self, wiring: &Wiring) -> notification::Config {
        notification::Config {
            database_url: self.database_url(Service::Notification),
            common: self.common(wiring),
            mail: self.mail(),
            web_push: self.web_push.clone(),
            addr: wiring.addr(Service::Notification).to_string(),
        }
    }

    pub fn push(&self, wiring: &Wiring) -> push_service::Config {
        push_service::Config {
            heartbeat_secs: self.heartbeat_secs,
            drain_secs: self.push_drain_secs,
            addr: wiring.addr(Service::Push).to_string(),
            tls_addr: self.push_tls_addr.clone(),
            tls: self.tls.clone(),
            // Its own HTTPS port faces browsers: it checks tokens itself (and
            // only then, as its binary's environment says).
            identity_url: (!self.push_tls_addr.is_empty()).then(|| wiring.url(Service::Identity)),
            verifier: self.verifier.clone(),
            common: self.common(wiring),
            ..push_service::Config::local(self.messaging.clone(), wiring.signer.verify_keys())
        }
    }

    pub fn gateway(&self, wiring: &Wiring) -> gateway::Config {
        gateway::Config {
            addr: wiring.addr(Service::Gateway).to_string(),
            identity_url: wiring.url(Service::Identity),
            billing_url: wiring.url(Service::Billing),
            ordering_url: wiring.url(Service::Ordering),
            notification_url: wiring.url(Service::Notification),
            push_url: wiring.url(Service::Push),
            push_h2c: self.gateway_push_h2c,
            push_streams_per_connection: self.gateway_push_streams_per_connection,
            verifier: self.verifier.clone(),
            upstream_timeout_secs: 30,
            client_ip_header: self.gateway_client_ip_header.clone(),
            https_addr: self.gateway_https_addr.clone(),
            tls: self.tls.clone(),
            limits: wiring.limits.clone(),
            connections: self.connections(),
            signing: runtime::auth::SigningKeyConfig::with(wiring.signer.clone()),
        }
    }

    /// The environment of `service`'s own binary (`identity`, `gateway`, ...)
    /// run as a process of its own, listening on `wiring.addr(service)` and
    /// reaching the others at `wiring.url(..)`: the same settings
    /// `System::start` gives it in this process, as its binary reads them.
    /// Settings of its own beyond these (log format) the caller adds.
    pub fn process_env(&self, service: Service, wiring: &Wiring) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![];
        let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
        let prefix = service.env_prefix();
        set("AMQP_URL", self.messaging.amqp_url.clone());
        if let Some(ca) = &self.messaging.amqp_ca_file {
            set("AMQP_CA_FILE", ca.display().to_string());
        }
        set("RETRY_DELAYS_MS", join(&self.messaging.retry_delays_ms));
        set(&format!("{prefix}_ADDR"), wiring.addr(service).to_string());
        if matches!(service, Service::Gateway | Service::Push) {
            let verifier = &self.verifier;
            set("REVOCATION_REFRESH_MS", verifier.revocation_refresh_ms.to_string());
            set("REVOCATION_MAX_AGE_SECS", verifier.revocation_max_age_secs.to_string());
            set("KEY_REFRESH_SECS", verifier.key_refresh_secs.to_string());
            set("TOKEN_CACHE_CAPACITY", verifier.token_cache_capacity.to_string());
        }
        match service {
            Service::Gateway => {
                set("INTERNAL_SIGNING_KEY", wiring.signer.private_key_text());
                set("GATEWAY_HTTPS_ADDR", self.gateway_https_addr.clone());
                for upstream in
                    [Service::Identity, Service::Billing, Service::Ordering, Service::Notification, Service::Push]
                {
                    set(&format!("{}_URL", upstream.env_prefix()), wiring.url(upstream));
                }
                let connections = self.connections();
                set("GATEWAY_MAX_CONNECTIONS_PER_CLIENT", connections.max_connections_per_client.to_string());
                set("GATEWAY_MAX_REQUESTS_PER_CLIENT", connections.max_requests_per_client.to_string());
            }
            other => {
                set("INTERNAL_VERIFY_KEY", wiring.signer.verify_keys().text());
                if Service::WITH_DATABASE.contains(&other) {
                    set(&format!("{prefix}_DATABASE_URL"), self.database_url(other));
                }
            }
        }
        match service {
            Service::Identity => {
                let abuse = self.abuse();
                set("LOGIN_PER_ADDRESS_PER_MINUTE", abuse.login_per_address_per_minute.to_string());
                set("LOGIN_PER_ACCOUNT_PER_MINUTE", abuse.login_per_account_per_minute.to_string());
                set("LOGIN_PER_DEVICE_PER_MINUTE", abuse.login_per_device_per_minute.to_string());
                set("REGISTER_PER_ADDRESS_PER_MINUTE", abuse.register_per_address_per_minute.to_string());
            }
            Service::Billing | Service::Ordering => {
                let per_user = self.per_user();
                set("ORDERS_PER_USER_PER_MINUTE", per_user.orders_per_user_per_minute.to_string());
                set("DEPOSITS_PER_USER_PER_MINUTE", per_user.deposits_per_user_per_minute.to_string());
                set("WITHDRAWALS_PER_USER_PER_MINUTE", per_user.withdrawals_per_user_per_minute.to_string());
            }
            Service::Notification => {
                let mail = self.mail();
                set("MAIL_DIR", mail.mail_dir.display().to_string());
                set("EMAILS_PER_RECIPIENT_PER_HOUR", mail.emails_per_recipient_per_hour.to_string());
            }
            Service::Push => {
                set("PUSH_TLS_ADDR", self.push_tls_addr.clone());
                // Only its HTTPS port checks tokens with identity.
                if !self.push_tls_addr.is_empty() {
                    set("PUSH_IDENTITY_URL", wiring.url(Service::Identity));
                }
                set("SSE_HEARTBEAT_SECS", self.heartbeat_secs.to_string());
                set("PUSH_DRAIN_SECS", self.push_drain_secs.to_string());
            }
            Service::Gateway => {}
        }
        env
    }
}

fn join(values: &[u64]) -> String {
    values.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// What the services of one system share once it is laid out: where each
/// one is, the gateway's signing key (the others verify it) and the pool
/// sizes that fit the PostgreSQL server.
#[derive(Clone)]
pub struct Wiring {
    addrs: std::collections::BTreeMap<Service, SocketAddr>,
    urls: std::collections::BTreeMap<Service, String>,
    pub signer: runtime::auth::AssertionSigner,
    pub limits: runtime::HttpLimits,
}

impl Wiring {
    /// Every service at its configured address, `signer` the gateway's key.
    pub fn new(config: &SystemConfig, signer: runtime::auth::AssertionSigner) -> Wiring {
        let mut wiring =
            Wiring { addrs: Default::default(), urls: Default::default(), signer, limits: config.limits.clone() };
        for service in Service::ALL {
            wiring.place(service, config.addr(service));
        }
        if let Some(push) = &config.external_push_url {
            wiring.urls.insert(Service::Push, push.clone());
        }
        wiring
    }

    /// `service` listens on `addr` (and is reached at `http://addr`).
    pub fn place(&mut self, service: Service, addr: SocketAddr) {
        self.addrs.insert(service, addr);
        self.urls.insert(service, format!("http://{addr}"));
    }

    /// `service` is reached at `url` (e.g. a balancer in front of its replicas).
    pub fn reach(&mut self, service: Service, url: String) {
        self.urls.insert(service, url);
    }

    /// `service` listens on `addr` but is reached elsewhere (one replica
    /// behind a balancer whose URL `reach` gave).
    pub fn listen_at(&mut self, service: Service, addr: SocketAddr) {
        self.addrs.insert(service, addr);
    }

    pub fn addr(&self, service: Service) -> SocketAddr {
        self.addrs[&service]
    }

    pub fn url(&self, service: Service) -> String {
        self.urls[&service].clone()
    }

    fn callers(&self) -> runtime::auth::CallerKeys {
        runtime::auth::CallerKeys { verify_keys: self.signer.verify_keys() }
    }
}

/// The listeners of the services this process runs, and the gateway's
/// HTTPS listener when it runs with HTTPS on.
pub struct Listeners {
    services: std::collections::BTreeMap<Service, TcpListener>,
    gateway_https: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Each service `config` runs, on its configured address.
    pub async fn configured(config: &SystemConfig) -> anyhow::Result<Listeners> {
        let mut services = std::collections::BTreeMap::new();
        for service in Service::ALL.into_iter().filter(|s| config.runs(*s)) {
            let addr = config.addr(service);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("{} cannot listen on {addr}: {e}", service.name()))?;
            services.insert(service, listener);
        }
        let gateway_https = match config.runs(Service::Gateway) {
            true => runtime::auth::tls::bind(&config.gateway_https_addr)?,
            false => None,
        };
        Ok(Listeners { services, gateway_https })
    }

    /// Each service `config` runs, on a free port of `host` the system
    /// chooses (port 0): never taken by another process between choosing
    /// and binding it. The gateway's HTTPS port too, unless it is off.
    pub async fn free_ports(config: &SystemConfig, host: IpAddr) -> anyhow::Result<Listeners> {
        let mut services = std::collections::BTreeMap::new();
        for service in Service::ALL.into_iter().filter(|s| config.runs(*s)) {
            services.insert(service, TcpListener::bind(SocketAddr::new(host, 0)).await?);
        }
        let https_on = config.runs(Service::Gateway) && !config.gateway_https_addr.trim().is_empty();
        let gateway_https = match https_on {
            true => Some(std::net::TcpListener::bind(SocketAddr::new(host, 0))?),
            false => None,
        };
        Ok(Listeners { services, gateway_https })
    }

    /// The address each service listens on.
    pub fn addrs(&self) -> anyhow::Result<Vec<(Service, SocketAddr)>> {
        self.services.iter().map(|(s, l)| Ok((*s, l.local_addr()?))).collect()
    }

    /// The address of the gateway's HTTPS listener, if any.
    pub fn gateway_https_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        Ok(self.gateway_https.as_ref().map(std::net::TcpListener::local_addr).transpose()?)
    }
}

/// A running system: the services' tasks and where they are.
pub struct System {
    tasks: Tasks,
    pub wiring: Wiring,
    /// Where the gateway's HTTPS listener is, when it has one.
    pub gateway_https: Option<SocketAddr>,
}

impl System {
    /// Starts each service that has a listener in `listeners`, configured
    /// from `config`; the gateway reaches the ones not run here at their
    /// configured addresses (or EXTERNAL_PUSH_URL). They stop when
    /// `shutdown` is cancelled; `join` waits for them.
    pub async fn start(
        config: &SystemConfig,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<System> {
        // The gateway signs who the caller is; the services verify it.
        let signer = config.signing.signer().unwrap_or_else(|_| {
            tracing::info!("no INTERNAL_SIGNING_KEY: a new key pair for the gateway's assertions");
            runtime::auth::AssertionSigner::generate()
        });
        let mut wiring = Wiring::new(config, signer);
        for (service, addr) in listeners.addrs()? {
            wiring.place(service, addr);
        }
        let gateway_https = listeners.gateway_https_addr()?;
        let databases = listeners.services.keys().filter(|s| Service::WITH_DATABASE.contains(s)).count();
        wiring.limits = fit_pools(config, u32::try_from(databases).unwrap_or(4)).await;
        let mut tasks = Tasks::new(shutdown.clone());
        let mut https = listeners.gateway_https;
        for (service, listener) in listeners.services {
            let name = service.task_name();
            let stop = shutdown.clone();
            match service {
                Service::Identity => tasks.spawn(name, identity::run(config.identity(&wiring), listener, stop)),
                Service::Billing => tasks.spawn(name, billing::run(config.billing(&wiring), listener, stop)),
                Service::Ordering => tasks.spawn(name, ordering::run(config.ordering(&wiring), listener, stop)),
                Service::Notification => {
                    tasks.spawn(name, notification::run(config.notification(&wiring), listener, stop))
                }
                Service::Push => tasks.spawn(name, push_service::run(config.push(&wiring), listener, stop)),
                Service::Gateway => {
                    tasks.spawn(name, gateway::run_with_tls(config.gateway(&wiring), listener, https.take(), stop))
                }
            }
            tracing::info!(service = service.name(), addr = %wiring.addr(service), "started");
        }
        Ok(System { tasks, wiring, gateway_https })
    }

    /// Waits for every service to stop; the first failure stops the others.
    pub async fn join(self) -> anyhow::Result<()> {
        self.tasks.join().await
    }
}

/// The services of this process share one PostgreSQL server: their pools
/// (and each one's LISTEN connections) must fit in what it accepts, or under
/// load a growing pool waits its whole acquire timeout (5 s) for connections
/// the server refuses (seen at 100 clients: orders stalled 5 s when the four
/// pools of 40 outgrew a server of 100). `DATABASE_POOL_SIZE` is shrunk to
/// fit, with a warning.
async fn fit_pools(config: &SystemConfig, services: u32) -> runtime::HttpLimits {
    /// Up to 3 LISTEN connections per service.
    const LISTENERS: u32 = 3;
    let mut limits = config.limits.clone();
    if services == 0 {
        return limits;
    }
    // A server that does not answer is waited for later, by each service.
    let server = config.server_url();
    let asked = tokio::time::timeout(std::time::Duration::from_secs(5), runtime::data::db::free_connections(&server));
    let free = match asked.await.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 5 s"))) {
        Ok(free) => free,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not ask PostgreSQL how many connections it accepts; pools as configured");
            return limits;
        }
    };
    let fitted = runtime::data::db::fitted_pool_size(limits.database_pool_size, services, LISTENERS, free);
    if fitted < limits.database_pool_size {
        tracing::warn!(
            requested = limits.database_pool_size,
            fitted,
            free,
            "PostgreSQL accepts {free} more connections: each service's pool is limited to {fitted} \
             (raise the server's max_connections for larger pools)"
        );
        limits.database_pool_size = fitted;
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> SystemConfig {
        SystemConfig::from_args_only(args.iter().copied()).expect("valid flags")
    }

    /// Run again as a child process with the environment set (setting it
    /// here would need unsafe code, which the workspace forbids).
    #[test]
    fn the_defaults_ignore_the_environment() {
        if std::env::var_os("SYSTEM_TEST_CHILD").is_some() {
            let defaults = SystemConfig::defaults();
            assert_eq!((defaults.gateway_addr.port(), defaults.database_prefix.as_str()), (8080, ""));
            let from_env = SystemConfig::from_env();
            assert_eq!((from_env.gateway_addr.port(), from_env.database_prefix.as_str()), (9999, "fromenv_"));
            return;
        }
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "system::tests::the_defaults_ignore_the_environment", "--test-threads=1"])
            .env("SYSTEM_TEST_CHILD", "1")
            .env("GATEWAY_ADDR", "127.0.0.1:9999")
            .env("DATABASE_PREFIX", "fromenv_")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&child.stdout);
        assert!(child.status.success() && out.contains("1 passed"), "{out}{}", String::from_utf8_lossy(&child.stderr));
    }

    #[test]
    fn a_bad_flag_is_an_error_not_a_default() {
        assert!(SystemConfig::from_args_only(["--throttles", "sometimes"]).is_err());
        assert!(SystemConfig::from_args_only(["--services", "nope"]).is_err());
    }

    fn wiring(config: &SystemConfig) -> Wiring {
        Wiring::new(config, runtime::auth::AssertionSigner::generate())
    }

    fn env_of(config: &SystemConfig, service: Service) -> std::collections::HashMap<String, String> {
        config.process_env(service, &wiring(config)).into_iter().collect()
    }

    #[test]
    fn the_services_sit_beside_the_gateway_and_use_prefixed_databases() {
        let c = config(&[
            "--gateway-addr",
            "127.0.0.1:9000",
            "--database-prefix",
            "x_",
            "--postgres-url",
            "postgres://pg:1/",
        ]);
        let w = wiring(&c);
        assert_eq!(w.url(Service::Billing), "http://127.0.0.1:9002");
        assert_eq!(w.url(Service::Push), "http://127.0.0.1:9005");
        assert_eq!(c.billing(&w).database_url, "postgres://pg:1/x_billing");
        assert_eq!(c.gateway(&w).ordering_url, "http://127.0.0.1:9003");
    }

    #[test]
    fn throttles_off_zeroes_every_throttle_in_process_and_in_the_environment() {
        let c =
            config(&["--login-per-account-per-minute", "7", "--orders-per-user-per-minute", "5"]).without_throttles();
        let w = wiring(&c);
        let abuse = c.identity(&w).abuse;
        assert_eq!(
            [
                abuse.login_per_address_per_minute,
                abuse.login_per_account_per_minute,
                abuse.login_per_device_per_minute,
                abuse.register_per_address_per_minute
            ],
            [0; 4]
        );
        assert_eq!(c.ordering(&w).per_user.orders_per_user_per_minute, 0);
        assert_eq!(c.billing(&w).per_user.deposits_per_user_per_minute, 0);
        assert_eq!(c.notification(&w).mail.emails_per_recipient_per_hour, 0);
        let gateway = c.gateway(&w).connections;
        assert_eq!((gateway.max_connections_per_client, gateway.max_requests_per_client), (0, 0));
        assert_eq!(env_of(&c, Service::Identity)["LOGIN_PER_ACCOUNT_PER_MINUTE"], "0");
        assert_eq!(env_of(&c, Service::Ordering)["ORDERS_PER_USER_PER_MINUTE"], "0");
        assert_eq!(env_of(&c, Service::Gateway)["GATEWAY_MAX_REQUESTS_PER_CLIENT"], "0");
    }

    #[test]
    fn throttles_on_keep_each_configured_limit() {
        let c = config(&["--login-per-account-per-minute", "7", "--orders-per-user-per-minute", "5"]);
        let w = wiring(&c);
        assert_eq!(c.identity(&w).abuse.login_per_account_per_minute, 7);
        assert_eq!(c.ordering(&w).per_user.orders_per_user_per_minute, 5);
        assert_eq!(env_of(&c, Service::Identity)["LOGIN_PER_ACCOUNT_PER_MINUTE"], "7");
        assert_eq!(env_of(&c, Service::Billing)["ORDERS_PER_USER_PER_MINUTE"], "5");
    }

    #[test]
    fn a_process_environment_is_what_its_binary_reads() {
        let c = config(&["--database-prefix", "p_", "--amqp-url", "amqp://u:p@h:1/v"]);
        let mut w = wiring(&c);
        w.reach(Service::Ordering, "http://balancer:7".into());
        let gateway: std::collections::HashMap<_, _> = c.process_env(Service::Gateway, &w).into_iter().collect();
        assert_eq!(gateway["ORDERING_URL"], "http://balancer:7");
        assert_eq!(gateway["AMQP_URL"], "amqp://u:p@h:1/v");
        assert!(gateway.contains_key("INTERNAL_SIGNING_KEY") && !gateway.contains_key("INTERNAL_VERIFY_KEY"));
        let ordering: std::collections::HashMap<_, _> = c.process_env(Service::Ordering, &w).into_iter().collect();
        assert_eq!(ordering["ORDERING_DATABASE_URL"], "postgres://postgres@127.0.0.1:5432/p_ordering");
        assert_eq!(ordering["ORDERING_ADDR"], "127.0.0.1:8083");
        assert!(ordering.contains_key("INTERNAL_VERIFY_KEY") && !ordering.contains_key("INTERNAL_SIGNING_KEY"));
        // The push service has no database.
        assert!(!env_of(&c, Service::Push).keys().any(|k| k.ends_with("_DATABASE_URL")));
    }

    #[tokio::test]
    async fn free_ports_include_the_gateways_https_port_unless_it_is_off() {
        let host = IpAddr::from([127, 0, 0, 1]);
        let on = Listeners::free_ports(&config(&[]), host).await.unwrap();
        assert!(on.gateway_https_addr().unwrap().is_some_and(|a| a.port() != 0));
        let off = Listeners::free_ports(&config(&["--gateway-https-addr", ""]), host).await.unwrap();
        assert_eq!(off.gateway_https_addr().unwrap(), None);
        let no_gateway = Listeners::free_ports(&config(&["--services", "identity"]), host).await.unwrap();
        assert_eq!(no_gateway.gateway_https_addr().unwrap(), None);
    }

    #[test]
    fn the_push_service_checks_tokens_only_on_its_own_https_port_and_as_the_gateway_does() {
        let c = config(&["--revocation-refresh-ms", "200", "--push-drain-secs", "0"]);
        let w = wiring(&c);
        let push = c.push(&w);
        assert_eq!(push.identity_url, Some(w.url(Service::Identity)));
        assert_eq!((push.verifier.revocation_refresh_ms, push.drain_secs), (200, 0));
        assert_eq!(c.gateway(&w).verifier.revocation_refresh_ms, 200);
        assert_eq!(env_of(&c, Service::Push)["REVOCATION_REFRESH_MS"], "200");
        assert_eq!(env_of(&c, Service::Push)["PUSH_DRAIN_SECS"], "0");
        assert_eq!(env_of(&c, Service::Gateway)["REVOCATION_REFRESH_MS"], "200");
        let behind_gateway = config(&["--push-tls-addr", ""]);
        assert_eq!(behind_gateway.push(&wiring(&behind_gateway)).identity_url, None);
        assert!(!env_of(&behind_gateway, Service::Push).contains_key("PUSH_IDENTITY_URL"));
    }

    #[test]
    fn an_external_push_service_is_not_run_here_and_is_reached_at_its_url() {
        let c = config(&["--external-push-url", "http://push:1"]);
        assert!(!c.runs(Service::Push) && c.runs(Service::Gateway));
        assert_eq!(wiring(&c).url(Service::Push), "http://push:1");
        let only = config(&["--services", "identity,gateway"]);
        assert!(only.runs(Service::Identity) && !only.runs(Service::Billing));
    }
}
